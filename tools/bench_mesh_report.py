"""The tables tools/bench_mesh.py prints, one per part."""

from __future__ import annotations

from bench_common import format_table, ratio


def ms(x: float | None) -> float | None:
    return None if x is None else x * 1000


ITL_HEADERS = ["", "undisturbed tok/s", "undisturbed p50", "p99", "max", "long-prompt p50", "p99", "max",
               "gaps", "long TTFT s"]


def print_tables(R: dict, long_tokens: int) -> None:
    p1, p2, p3, p4, p5 = R["p1"], R["p2"], R.get("p3"), R.get("p4"), R["p5"]
    if p1:
        get = lambda k, n: (p1.get(k) or {}).get(n)  # noqa: E731
        _show("Part 1: throughput, tok/s, 64 greedy tokens per stream, best of rounds (goals: mesh/engine >= 0.9 "
              "at 16 and 64; mesh/vLLM >= 1.0 at 1 and 16). engine: LLMEngine on the main thread; "
              "thread: AsyncEngine, as in a worker",
              ["streams", "mesh", "engine", "thread", "vLLM", "mesh/engine", "mesh/thread", "mesh/vLLM"],
              [[n] + [get(k, n) for k in ("mesh", "engine", "thread", "vllm")]
               + [ratio(get("mesh", n), get(k, n)) for k in ("engine", "thread", "vllm")]
               for n in sorted({n for v in p1.values() if v for n in v})])
    if p2:
        _show(f"Part 2: inter-token gaps of 4 running streams, ms; prompts of 1-2k tokens (max_tokens "
              f"{long_tokens}) arriving", ITL_HEADERS, [_itl_row(k, v) for k, v in p2.items() if v])
        m, v = (p2.get("mesh") or {}).get("long", {}), (p2.get("vllm") or {}).get("long", {})
        print(f"mesh p99 / vLLM p99 under long prompts: {ratio(m.get('p99'), v.get('p99'))} (goal <= 0.1x)\n")
    if p3:
        _show("Part 3: scheduler overhead, TTFT of a 1-token request, ms (goal: difference of p50s <= 5 ms)",
              ["path", "p50", "p90"], p3)
    if p4:
        _show("Part 4: KV hand-off of a 1,000-token prompt, medians (goal: hand-off / prefill <= 10%)",
              ["mode", "prefill ms", "hand-off ms", "hand-off/prefill", "MB", "GB/s"], p4)
    if p5:
        _show("Part 5: placement of the prefill worker (decode: nice 0, all cores), part 2's load",
              ITL_HEADERS, [_itl_row(k, v) for k, v in p5.items() if v])
    for note in R["notes"]:
        print(f"note: {note}")


def _itl_row(name: str, r: dict) -> list:
    b, g = r["base"], r["long"]
    return [name, r["tok_s"], ms(b["p50"]), ms(b["p99"]), ms(b["max"]), ms(g["p50"]), ms(g["p99"]), ms(g["max"]),
            f"{b['n']}/{g['n']}", r["long_ttft"]] + ([f"errors: {r['errors'][:2]}"] if r["errors"] else [])


def _show(title: str, headers: list[str], rows: list[list]) -> None:
    width = max([len(headers)] + [len(r) for r in rows])
    print(f"\n{title}\n" + format_table(headers + [""] * (width - len(headers)),
                                        [r + [None] * (width - len(r)) for r in rows]) + "\n")
