"""A benchmark's results as a table (one column per target, and each target's ratio to the first)
and as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from pdmesh.bench.request_record import RequestRecord
from pdmesh.bench.summary import Summary

# (label, value of a summary, format); latencies in milliseconds
ROWS: list[tuple[str, Callable[[Summary], float | None], str]] = [
    ("requests/s", lambda s: s.request_throughput, "{:.2f}"),
    ("output tokens/s", lambda s: s.output_throughput, "{:.1f}"),
    ("total tokens/s", lambda s: s.total_throughput, "{:.1f}"),
    ("goodput requests/s", lambda s: s.goodput, "{:.2f}"),
] + [(f"{name} {stat} ms", (lambda s, n=attr, k=stat: _ms(getattr(getattr(s, n), k))), "{:.1f}")
     for name, attr in (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"), ("E2E", "e2e"))
     for stat in ("mean", "p50", "p95", "p99")]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def table(summaries: list[Summary], heading: str) -> str:
    header = ["", *(s.target for s in summaries), *(f"ratio {i + 1}/1" for i in range(1, len(summaries)))]
    rows = [["requests ok/sent", *(f"{s.num_ok}/{s.num_requests}" for s in summaries)],
            ["duration s", *(f"{s.duration_s:.2f}" for s in summaries)]]
    for label, value, fmt in ROWS:
        values = [value(s) for s in summaries]
        cells = ["-" if v is None else fmt.format(v) for v in values]
        ratios = [_ratio(v, values[0]) for v in values[1:]]
        rows.append([label, *cells, *ratios])
    rows.append(["statuses", *(", ".join(f"{k} {v}" for k, v in sorted(s.statuses.items())) for s in summaries)])
    widths = [max(len(str(r[i])) if i < len(r) else 0 for r in [header, *rows]) for i in range(len(header))]
    lines = [heading, "  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def _ratio(value: float | None, first: float | None) -> str:
    if value is None or not first:
        return "-"
    return f"x{value / first:.2f}"


def write_json(path: str | Path, heading: str, summaries: list[Summary],
               records: dict[str, list[RequestRecord]]) -> None:
    document = {"workload": heading, "results": [
        {"summary": s.to_json(), "requests": [_request_json(r) for r in records[s.target]]} for s in summaries]}
    Path(path).write_text(json.dumps(document, indent=1))


def _request_json(r: RequestRecord) -> dict:
    return {"index": r.index, "status": r.status, "prompt_tokens": r.prompt_tokens,
            "output_tokens": r.output_tokens, "ttft_s": r.ttft_s, "tpot_s": r.tpot_s, "e2e_s": r.e2e_s,
            "itls_s": [round(g, 6) for g in r.itls_s()]}
