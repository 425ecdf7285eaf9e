"""`pdmesh advise`: sweep the request rate against a running mesh with `pdmesh bench`'s load,
read the workers' own signals at each rate, then print one table, the knee and the verdict."""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path

from pdmesh.advise.advise_config import AdviseConfig
from pdmesh.advise.cluster_probe import ClusterProbe
from pdmesh.advise.sweep_step import SweepStep
from pdmesh.advise.verdict import decide, describe
from pdmesh.bench.main import bench_target
from pdmesh.bench.request_record import RequestRecord
from pdmesh.bench.summary import Summary
from pdmesh.client import PdmeshClient
from pdmesh.config import SECRET_ENV
from pdmesh.errors import InvalidRequestError

COLUMNS = (  # (header, value of a step, format)
    ("rate", lambda s: s.rate, "{:g}"), ("ok", lambda s: f"{s.num_ok}/{s.num_requests}", "{}"),
    ("req/s", lambda s: s.throughput, "{:.2f}"), ("out tok/s", lambda s: s.output_tps, "{:.1f}"),
    ("TTFT p50 s", lambda s: s.ttft_p50_s, "{:.2f}"), ("TTFT p95 s", lambda s: s.ttft_p95_s, "{:.2f}"),
    ("TPOT p50 ms", lambda s: None if s.tpot_p50_s is None else s.tpot_p50_s * 1e3, "{:.0f}"),
    ("prefill busy", lambda s: s.signals.prefill_busy, "{:.0%}"),
    ("prefill cores", lambda s: s.signals.prefill_cores, "{:.2f}"),
    ("backlog tok", lambda s: s.signals.prefill_backlog_tokens, "{:,.0f}"),
    ("backlog s", lambda s: s.signals.prefill_backlog_s, "{:.1f}"),
    ("decode busy", lambda s: s.signals.decode_busy, "{:.0%}"),
    ("decode cores", lambda s: s.signals.decode_cores, "{:.2f}"),
    ("batch", lambda s: s.signals.decode_batch, "{:.1f}"), ("waiting", lambda s: s.signals.decode_queued, "{:.1f}"),
    ("KV max", lambda s: s.signals.kv_usage, "{:.0%}"),
    ("hand-off p95 ms", lambda s: None if s.signals.handoff_p95_s is None else s.signals.handoff_p95_s * 1e3,
     "{:.0f}"),
)


async def measure(config: AdviseConfig, probe: ClusterProbe, rate: float, index: int) -> SweepStep:
    """Step `index` of the sweep: its own seed (seed + index), so no step's prompts repeat an earlier
    step's, which the workers' prefix caches would otherwise answer from memory."""
    load = replace(config.bench, rate=rate, num_requests=config.requests_at(rate), progress=False,
                   warmup=config.bench.warmup if index == 0 else 0, seed=config.bench.seed + index)
    done = asyncio.Event()
    watching = asyncio.create_task(probe.watch(done))
    try:
        summary, records = await bench_target(config.bench.target, load)
    finally:
        done.set()
    return step_of(rate, summary, await watching, records)


def step_of(rate: float, s: Summary, signals, records: list[RequestRecord]) -> SweepStep:
    failures = Counter(f"{r.status}: {r.error}" if r.error else r.status for r in records if not r.ok)
    return SweepStep(rate, s.num_requests, s.num_ok, s.request_throughput, s.output_throughput, s.ttft.p50,
                     s.ttft.p95, s.tpot.p50, signals, dict(failures.most_common()))


def failure_lines(step: SweepStep, most: int = 3) -> list[str]:
    """Why requests failed at a step, the commonest reasons first."""
    reasons = list(step.failures.items())
    lines = [f"    failed at {step.rate:g} req/s: {count} x {reason}" for reason, count in reasons[:most]]
    if len(reasons) > most:
        lines.append(f"    ... and {sum(c for _, c in reasons[most:])} more, for {len(reasons) - most} other reasons")
    return lines


async def sweep(config: AdviseConfig, client: PdmeshClient) -> list[SweepStep]:
    probe = ClusterProbe(client, config.poll_s)
    steps: list[SweepStep] = []
    for rate in config.rate_list():
        steps.append(await measure(config, probe, rate, len(steps)))
        print("\n".join([table(steps[-1:], header=not steps[1:]), *failure_lines(steps[-1])]), flush=True)
        if decide(steps, config.ttft_rise, config.flat_gain, config.busy_limit).knee is not None:
            break
    return steps


def table(steps: list[SweepStep], header: bool = True) -> str:
    cells = [["-" if (v := value(s)) is None else fmt.format(v) for _, value, fmt in COLUMNS] for s in steps]
    widths = [max(len(h), 7) for h, _, _ in COLUMNS]
    lines = ["  ".join(h.rjust(w) for (h, _, _), w in zip(COLUMNS, widths))] if header else []
    return "\n".join(lines + ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells])


def run_advise(config: AdviseConfig) -> int:
    target = config.bench.target
    if target.startswith(("http://", "https://", "grpcs://")):
        raise InvalidRequestError("pdmesh advise reads cluster status over the scheduler's gRPC port: "
                                  f"give --target HOST:PORT, got {target!r}", "target")
    address = target.removeprefix("grpc://")
    config = replace(config, bench=replace(config.bench, target=address))
    load = config.bench
    print(f"pdmesh advise: {address}, {load.lengths} lengths (prompt {load.prompt_tokens}, output "
          f"{load.output_tokens}), Poisson arrivals at {config.rates} req/s, {config.step_s:g} s each, "
          f"seeds {load.seed}, {load.seed + 1}, ... (one per rate); stops at the knee", flush=True)
    with PdmeshClient(address, api_key=config.bench.api_key or None,
                      cluster_secret=os.environ.get(SECRET_ENV, "")) as client:
        steps = asyncio.run(sweep(config, client))
    for line in describe(decide(steps, config.ttft_rise, config.flat_gain, config.busy_limit), steps):
        print(line, flush=True)
    if config.json_path:
        Path(config.json_path).write_text(json.dumps([s.to_json() for s in steps], indent=1))
    return 0 if any(s.num_ok for s in steps) else 1
