"""`pdmesh serve | scheduler | prefill | decode | exporter | bench | advise`: every flag comes from the config dataclasses
(`pdmesh.config`, `pdmesh.serve_config`, `pdmesh.engine.engine_config`) through
`pdmesh.config_loader`; this file only names which configs each command builds."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace
from typing import Any

from pdmesh import config_loader
from pdmesh.advise.advise_config import ADVISE_SKIPS_BENCH_FLAGS, AdviseConfig
from pdmesh.bench.bench_config import BenchConfig
from pdmesh.config import SchedulerConfig, WorkerConfig
from pdmesh.errors import PdmeshError
from pdmesh.exporter.exporter_config import ExporterConfig
from pdmesh.serve_config import SERVE_SKIPS_WORKER_FLAGS, ServeConfig

# command -> (help, {root name: config class}, {root name: flags of that root to leave out})
COMMANDS: dict[str, tuple[str, dict[str, type], dict[str, set[str]]]] = {
    "serve": ("run the scheduler and its workers on this machine, supervised",
              {"serve": ServeConfig, "scheduler": SchedulerConfig, "worker": WorkerConfig},
              {"worker": SERVE_SKIPS_WORKER_FLAGS}),
    "scheduler": ("run the scheduler: client API, admission, worker registry", {"scheduler": SchedulerConfig}, {}),
    "prefill": ("run a prefill worker", {"worker": WorkerConfig}, {}),
    "decode": ("run a decode worker", {"worker": WorkerConfig}, {}),
    "exporter": ("serve cluster-level metrics per role from cluster status and worker metrics",
                 {"exporter": ExporterConfig}, {}),
    "bench": ("load a pdmesh scheduler or any OpenAI-compatible server and report latency and throughput",
              {"bench": BenchConfig}, {}),
    "advise": ("sweep the request rate against a running mesh: find the knee, the phase that saturates first "
               "and the prefill:decode worker ratio the load wants",
               {"advise": AdviseConfig, "bench": BenchConfig}, {"bench": ADVISE_SKIPS_BENCH_FLAGS}),
}


def command_flags(command: str) -> dict[str, config_loader.Flag]:
    _, roots, skip = COMMANDS[command]
    return config_loader.collect(roots, skip)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdmesh", description=__doc__.split("\n")[0])
    parser.add_argument("--log-level", default=os.environ.get("PDMESH_LOG_LEVEL", "INFO"),
                        help="DEBUG, INFO, WARNING or ERROR (env PDMESH_LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", required=True)
    certs = sub.add_parser("certs", help="write a development CA and per-role certificates into DIR")
    certs.add_argument("dir", help="folder to write ca.pem, <role>.pem and <role>-key.pem into")
    certs.add_argument("--days", type=int, default=30, help="validity in days (default: 30)")
    certs.add_argument("--hosts", default="localhost,127.0.0.1",
                       help="comma-separated names and addresses clients dial (default: localhost,127.0.0.1)")
    for command, (text, _, _) in COMMANDS.items():
        p = sub.add_parser(command, help=text, description=text)
        p.add_argument("--config", default=os.environ.get("PDMESH_CONFIG"),
                       help="TOML file of settings: flag names as keys, e.g. kv-timeout = 5 (env PDMESH_CONFIG)")
        config_loader.add_flags(p, command_flags(command))
    return parser


def configs_from(args: argparse.Namespace, env: dict[str, str] | None = None) -> Any:
    """The config the command runs with: ServeConfig, SchedulerConfig, WorkerConfig, ExporterConfig or
    BenchConfig."""
    env = os.environ if env is None else env
    flags = command_flags(args.command)
    values = config_loader.resolve(flags, args, args.config, env)
    if args.command in ("prefill", "decode"):
        worker = config_loader.build(WorkerConfig, "worker", flags, values, role=args.command)
        return replace(worker, security=worker.security.with_secret(env))
    if args.command == "exporter":
        exporter = config_loader.build(ExporterConfig, "exporter", flags, values)
        return replace(exporter, security=exporter.security.with_secret(env))
    if args.command == "bench":
        return config_loader.build(BenchConfig, "bench", flags, values)
    if args.command == "advise":
        return config_loader.build(AdviseConfig, "advise", flags, values,
                                   bench=config_loader.build(BenchConfig, "bench", flags, values))
    scheduler = config_loader.build(SchedulerConfig, "scheduler", flags, values)
    scheduler = replace(scheduler, security=scheduler.security.with_secret(env))
    if args.command == "scheduler":
        return scheduler
    return config_loader.build(ServeConfig, "serve", flags, values, scheduler=scheduler,
                               worker=config_loader.build(WorkerConfig, "worker", flags, values))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "certs":
        from pdmesh.certs import write_dev_certs
        folder = write_dev_certs(args.dir, args.days, tuple(h for h in args.hosts.split(",") if h))
        print(f"wrote a development CA and scheduler/prefill/decode certificates to {folder} "
              f"(valid {args.days} days); use --tls-dir {folder}")
        return 0
    try:
        return _run(args.command, configs_from(args), args.log_level)
    except PdmeshError as exc:
        print(f"pdmesh {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _run(command: str, config: Any, log_level: str) -> int:
    if command == "serve":
        from pdmesh.launcher import serve
        return serve(config, log_level)
    if command == "exporter":
        from pdmesh.exporter.main import run_exporter
        return run_exporter(config)
    if command == "bench":
        from pdmesh.bench.main import run_bench
        return run_bench(config)
    if command == "advise":
        from pdmesh.advise.main import run_advise
        return run_advise(config)
    from pdmesh.child import run_service
    run_service(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
