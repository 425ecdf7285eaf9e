"""`pdmesh serve | scheduler | prefill | decode`: every flag is read here and nowhere else."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pdmesh.config import CpuPlacement, SchedulerConfig, WorkerConfig
from pdmesh.engine.engine_config import EngineConfig
from pdmesh.errors import PdmeshError


def _engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-model-len", type=int, default=0, help="longest prompt + output (default: the model's context)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="memory for KV blocks, GiB")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences in a running batch")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--engine", default="pdmesh", choices=["pdmesh", "echo"],
                   help="echo: emit tokens without a model (load tests only; output is meaningless)")
    p.add_argument("--echo-step-ms", type=float, default=0.0, help="echo engine: milliseconds per step")


def _service_flags(p: argparse.ArgumentParser, port_default: int) -> None:
    p.add_argument("--model", default=None, help="GGUF file or Hugging Face folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=port_default, help="gRPC port (0: a free one)")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus port (0: a free one, -1: off)")


def _worker_flags(p: argparse.ArgumentParser) -> None:
    _service_flags(p, port_default=0)
    p.add_argument("--scheduler", required=True, help="host:port of the scheduler to register with")
    p.add_argument("--worker-id", default="")
    p.add_argument("--threads", type=int, default=0, help="torch threads of the whole worker (0: all cores)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size: processes in this worker's group")
    p.add_argument("--nice", type=int, default=0, help="OS scheduling priority increment")
    p.add_argument("--kv-timeout", type=float, default=10.0, help="seconds any KV hand-off wait may take")
    p.add_argument("--held-kv-ttl", type=float, default=30.0, help="prefill: free unpulled KV after this long")
    p.add_argument("--prefill-timeout", type=float, default=30.0,
                   help="decode: seconds to wait for one prefill worker before trying the next")
    _engine_flags(p)


def _scheduler_flags(p: argparse.ArgumentParser) -> None:
    _service_flags(p, port_default=50051)
    p.add_argument("--max-model-len", type=int, default=0, help="longest prompt + output (default: the model's context)")
    p.add_argument("--max-prompt-tokens", type=int, default=0, help="longest prompt (0: max-model-len - 1)")
    p.add_argument("--max-output-tokens", type=int, default=0, help="ceiling for max_tokens (0: max-model-len - 1)")
    p.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request sets none")
    p.add_argument("--max-queued-requests", type=int, default=1024, help="admission queue bound, requests")
    p.add_argument("--max-queued-tokens", type=int, default=4_000_000,
                   help="admission queue bound, prompt + max_tokens summed")
    p.add_argument("--tenants-file", default=None, help="TOML file of tenants: api keys and rate limits")
    p.add_argument("--local-prefill-threshold", type=int, default=64,
                   help="prompts shorter than this are prefilled on the decode worker (0: never; "
                        "64 measured best on CPU, see README)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdmesh", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("PDMESH_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run scheduler + workers on this machine")
    _scheduler_flags(serve)
    serve.add_argument("--prefill-workers", type=int, default=1)
    serve.add_argument("--prefill-tp", type=int, default=1, help="tensor-parallel size of each prefill worker")
    serve.add_argument("--decode-tp", type=int, default=1, help="tensor-parallel size of each decode worker")
    serve.add_argument("--decode-workers", type=int, default=1)
    serve.add_argument("--prefill-threads", type=int, default=None, help="default: see README (CPU placement)")
    serve.add_argument("--prefill-nice", type=int, default=None)
    serve.add_argument("--decode-threads", type=int, default=None)
    serve.add_argument("--decode-nice", type=int, default=None)
    serve.add_argument("--kv-cache-gib", type=float, default=1.0)
    serve.add_argument("--block-size", type=int, default=16)
    serve.add_argument("--max-num-seqs", type=int, default=64)
    serve.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    serve.add_argument("--engine", default="pdmesh", choices=["pdmesh", "echo"],
                       help="echo: workers emit tokens without a model (load tests only)")
    serve.add_argument("--echo-step-ms", type=float, default=0.0, help="echo engine: milliseconds per step")
    serve.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for every service")
    serve.add_argument("--no-warmup", action="store_true", help="skip the warm-up request once ready")
    _scheduler_flags(sub.add_parser("scheduler", help="run the scheduler"))
    _worker_flags(sub.add_parser("prefill", help="run a prefill worker"))
    _worker_flags(sub.add_parser("decode", help="run a decode worker"))
    return parser


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    threads = args.threads
    if args.tp > 1:  # the worker's threads are shared by its ranks
        threads = max(1, (threads or os.cpu_count() or 1) // args.tp)
    engine = EngineConfig(max_model_len=args.max_model_len, block_size=args.block_size,
                          kv_cache_gib=args.kv_cache_gib, max_num_seqs=args.max_num_seqs, dtype=args.dtype)
    return WorkerConfig(role=args.command, scheduler_address=args.scheduler, model=args.model, host=args.host,
                        port=args.port, metrics_port=args.metrics_port, worker_id=args.worker_id, engine=engine,
                        engine_kind=args.engine, echo_step_delay_s=args.echo_step_ms / 1000, tp=args.tp,
                        cpu=CpuPlacement(threads, args.nice), kv_timeout_s=args.kv_timeout,
                        held_kv_ttl_s=args.held_kv_ttl, prefill_timeout_s=args.prefill_timeout)


def scheduler_config(args: argparse.Namespace) -> SchedulerConfig:
    return SchedulerConfig(model=args.model, host=args.host, port=args.port, metrics_port=args.metrics_port,
                           max_model_len=args.max_model_len, max_prompt_tokens=args.max_prompt_tokens,
                           max_output_tokens=args.max_output_tokens, default_max_tokens=args.default_max_tokens,
                           max_queued_requests=args.max_queued_requests, max_queued_tokens=args.max_queued_tokens,
                           tenants_file=args.tenants_file, local_prefill_threshold=args.local_prefill_threshold)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except PdmeshError as exc:
        print(f"pdmesh {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    from pdmesh.rpc.server import run

    if args.command == "serve":
        from pdmesh.launcher import serve
        return serve(args)
    if args.command == "scheduler":
        from pdmesh.scheduler.main import run_scheduler
        run(run_scheduler(scheduler_config(args)))
        return 0
    from pdmesh.worker.main import run_worker
    run_worker(worker_config(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
