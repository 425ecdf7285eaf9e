"""The prefix cache on this machine: multi-turn chats sharing a long system prompt, and prompts that
share nothing, each with the cache on and off, through the engine in-process (SmolLM2, float32).

    python tools/bench_prefix_cache.py [--system-tokens 1000] [--conversations 4] [--turns 3]

Shared workload: every conversation starts with the same system prompt; each turn appends a user
message and the previous answer (a growing history). Unshared workload: prompts of the same lengths
made of fresh random tokens (nothing to reuse: the cache's overhead alone). Requests run one at a
time, turn by turn across the conversations, so TTFT is the prefill of one prompt. "prefill tokens"
are the prompt tokens the engine computed (the rest came from the cache). Token ids are drawn from
ordinary vocabulary ids, no chat template, with a fixed seed. The hand-off is not in this picture:
the mesh e2e test (tests/e2e/test_prefix_cache_mesh.py) checks that it carries only what the decode
worker lacks.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from bench_common import format_table  # noqa: E402

FIRST_ID, LAST_ID = 1_000, 10_000  # ordinary token ids, away from special tokens


def workloads(args) -> dict[str, list[list[int]]]:
    """The prompt of every request in order, by workload; the shared one's histories grow with
    placeholder answers here and with the real answers when run (see run())."""
    rng = random.Random(args.seed)
    system = [rng.randrange(FIRST_ID, LAST_ID) for _ in range(args.system_tokens)]
    users = [[[rng.randrange(FIRST_ID, LAST_ID) for _ in range(args.user_tokens)] for _ in range(args.turns)]
             for _ in range(args.conversations)]
    shared = []
    for turn in range(args.turns):
        for conv in range(args.conversations):
            shared.append((conv, turn, users[conv][turn]))
    lengths = [args.system_tokens + (turn + 1) * args.user_tokens + turn * args.output_tokens
               for _, turn, _ in shared]
    unshared = [[rng.randrange(FIRST_ID, LAST_ID) for _ in range(n)] for n in lengths]
    return {"shared": (system, shared), "unshared": unshared}


def run(engine, requests, output_tokens: int, shared: bool) -> dict:
    from pdmesh.engine.sampling_params import SamplingParams
    from pdmesh.engine.sequence import EngineRequest

    params = SamplingParams(max_tokens=output_tokens, ignore_eos=True)
    histories: dict[int, list[int]] = {}
    ttfts, prompt_tokens, outputs = [], 0, 0
    start = time.perf_counter()
    for i, request in enumerate(requests[1] if shared else requests):
        if shared:
            conv, _, user = request
            prompt = histories.get(conv, list(requests[0])) + user
        else:
            prompt = request
        sent = time.perf_counter()
        engine.add_request(EngineRequest(f"r{i}", prompt, params))
        answer, first = [], None
        while engine.has_work():
            for out in engine.step():
                if first is None and out.token_ids:
                    first = time.perf_counter() - sent
                answer += out.token_ids
        ttfts.append(first)
        prompt_tokens += len(prompt)
        outputs += len(answer)
        if shared:
            histories[conv] = prompt + answer
    seconds = time.perf_counter() - start
    _, hits = engine.prefix_cache_stats()
    return dict(requests=len(ttfts), p50=statistics.median(ttfts), p95=percentile(ttfts, 0.95),
                prompt_tokens=prompt_tokens, computed=prompt_tokens - hits, tok_s=outputs / seconds,
                free=engine.num_free_blocks == engine.num_total_blocks)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--user-tokens", type=int, default=40)
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from pdmesh.engine.checkpoint import load_checkpoint
    from pdmesh.engine.default_model import ensure_default_model
    from pdmesh.engine.engine_config import EngineConfig
    from pdmesh.engine.llm_engine import LLMEngine

    checkpoint = load_checkpoint(ensure_default_model(), log=lambda _: None)
    loads = workloads(args)
    rows, results = [], {}
    for name, requests in loads.items():
        for cache in (False, True):
            engine = LLMEngine(checkpoint.config, checkpoint.weights,
                               EngineConfig(kv_cache_gib=0.5, max_model_len=4096, dtype="float32", prefix_cache=cache))
            r = results[name, cache] = run(engine, requests, args.output_tokens, name == "shared")
            rows.append([name, "on" if cache else "off", r["requests"], f"{r['p50'] * 1000:.0f}",
                         f"{r['p95'] * 1000:.0f}", f"{r['computed']:,} of {r['prompt_tokens']:,}",
                         f"{r['tok_s']:.1f}", "yes" if r["free"] else "NO"])
    print(format_table(["workload", "prefix cache", "requests", "TTFT p50 ms", "TTFT p95 ms", "prefill tokens computed",
                        "output tok/s", "all blocks free after"], rows))
    shared_ratio = results["shared", True]["p50"] / results["shared", False]["p50"]
    unshared_ratio = results["unshared", True]["p50"] / results["unshared", False]["p50"]
    print(f"\nshared: TTFT p50 cache on / off = {shared_ratio:.2f}x (goal <= 0.3x); "
          f"unshared: {unshared_ratio:.2f}x (goal <= 1.03x)")


if __name__ == "__main__":
    main()
