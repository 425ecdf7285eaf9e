"""`pdmesh bench`: send the same seeded workload to each target, then print a table (and write
JSON and PNG plots when asked). Exit status 1 when some target answered no request at all."""

from __future__ import annotations

import asyncio

from pdmesh.bench.bench_config import BenchConfig
from pdmesh.bench.grpc_target import GrpcTarget
from pdmesh.bench.load_runner import Progress, Target, run_load
from pdmesh.bench.report import table, write_json
from pdmesh.bench.request_record import RequestRecord
from pdmesh.bench.summary import Summary, summarize
from pdmesh.bench.openai_target import OpenAITarget
from pdmesh.bench.workload import make_workload
from pdmesh.errors import InvalidRequestError

WARMUP_SEED_OFFSET = 1_000_003  # warm-up prompts differ from measured ones (no prefix-cache head start)


def make_target(address: str, config: BenchConfig) -> Target:
    common = dict(tls_ca=config.tls_ca, timeout_s=config.timeout_s, temperature=config.temperature,
                  ignore_eos=config.ignore_eos)
    if address.startswith(("http://", "https://")):
        return OpenAITarget(address, config.api_key, config.model, config.endpoint, **common)
    scheme, _, rest = address.rpartition("://")
    if scheme not in ("", "grpc", "grpcs"):
        raise InvalidRequestError(f"target {address!r}: use HOST:PORT, grpc://, grpcs://, http:// or https://",
                                  "target")
    if scheme == "grpcs" and not config.tls_ca:
        raise InvalidRequestError(f"target {address!r}: grpcs:// needs --tls-ca", "tls_ca")
    return GrpcTarget(rest, config.api_key, config.tls_ca if scheme == "grpcs" else None,
                      config.timeout_s, config.temperature, config.ignore_eos)


def describe(config: BenchConfig) -> str:
    loop = (f"open loop at {config.rate:g} req/s (gamma shape {config.burstiness:g})" if config.rate
            else f"closed loop, {config.concurrency} in flight")
    prefix = f", shared prefix {config.shared_prefix}" if config.shared_prefix else ""
    return (f"pdmesh bench: {config.num_requests} requests, {loop}, {config.lengths} lengths (prompt "
            f"{config.prompt_tokens}, output {config.output_tokens}{prefix}), seed {config.seed}")


async def bench_target(address: str, config: BenchConfig) -> tuple[Summary, list[RequestRecord]]:
    target = make_target(address, config)
    try:
        if isinstance(target, OpenAITarget):
            await target.resolve_model()
        warmup = make_workload(config, config.warmup, WARMUP_SEED_OFFSET)
        await run_load(target, warmup, config.concurrency, False, Progress("warm-up", len(warmup), False))
        requests = make_workload(config, config.num_requests)
        records = await run_load(target, requests, config.concurrency, config.rate > 0,
                                 Progress(address, len(requests), config.progress))
    finally:
        await target.close()
    return summarize(address, records, config.slo_ttft_s, config.slo_tpot_s), records


async def run_all(config: BenchConfig) -> tuple[list[Summary], dict[str, list[RequestRecord]]]:
    summaries, records = [], {}
    for address in config.targets():
        summary, runs = await bench_target(address, config)
        summaries.append(summary)
        records[address] = runs
    return summaries, records


def run_bench(config: BenchConfig) -> int:
    summaries, records = asyncio.run(run_all(config))
    heading = describe(config)
    print(table(summaries, heading), flush=True)
    if config.json_path:
        write_json(config.json_path, heading, summaries, records)
    if config.plot_path:
        from pdmesh.bench.plots import write_plots
        write_plots(config.plot_path, records)
    return 1 if any(s.num_ok == 0 for s in summaries) else 0
