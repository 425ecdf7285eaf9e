"""The skinny linear kernel against oneDNN's packed GEMM, in one process, on SmolLM2's own weights.

    python tools/bench_linear.py [--batches 1,2,4,8,16,32,64] [--widths 1,8,16] [--rounds 3]

Part 1 times every linear of one decode step (30 layers of qkv, o, gate_up, down, then the LM
head) at each batch size, both ways, alternating, best of --rounds; it also checks that each row
of a batch gets the same bits from the kernel as when run alone. Part 2 runs the whole engine
(greedy, 64 new tokens per sequence, bench_common's prompts) at each width with the kernel on and
off in alternating rounds, best of --rounds, and compares the tokens. The engine uses the kernel up
to SKINNY_MAX_ROWS rows (pdmesh/engine/linear.py); here both parts force one path or the other.
OpenMP waits as in a worker (--omp-wait-policy's default) unless OMP_WAIT_POLICY is set.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path[:0] = [str(TOOLS)]

from pdmesh.config import CpuPlacement  # noqa: E402

for key, value in CpuPlacement().openmp_env().items():  # before torch loads
    os.environ.setdefault(key, value)

import torch  # noqa: E402

import pdmesh.engine.linear as linear  # noqa: E402
from bench_common import format_table, log, make_prompts, ratio  # noqa: E402
from bench_engine import pdmesh_generate  # noqa: E402
from pdmesh.engine import cpu_kernels  # noqa: E402
from pdmesh.engine.checkpoint import load_checkpoint  # noqa: E402
from pdmesh.engine.engine_config import EngineConfig  # noqa: E402
from pdmesh.engine.llm_engine import LLMEngine  # noqa: E402


def best_of(rounds: int, fns: dict) -> dict:
    """Each fn's best wall time over `rounds`, the fns alternating within a round."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def step_linears(layers: list, kernels, batches: list[int], rounds: int) -> list[list]:
    rows = []
    for batch in batches:
        xs = [torch.randn(batch, layer.in_features) for layer in layers]

        def onednn():
            for layer, x in zip(layers, xs):
                torch.ops.mkldnn._linear_pointwise(x, layer.packed, layer.bias, "none", [], "")

        def skinny():
            for layer, x in zip(layers, xs):
                kernels.skinny_linear(x, layer.weight, layer.bias)
        onednn(), skinny()  # warm-up
        t = best_of(rounds, {"onednn": onednn, "skinny": skinny})
        whole = kernels.skinny_linear(xs[0], layers[0].weight, layers[0].bias)
        alone = all(torch.equal(kernels.skinny_linear(xs[0][i:i + 1], layers[0].weight, layers[0].bias), whole[i:i + 1])
                    for i in range(batch))
        rows.append([batch, t["onednn"] * 1e3, t["skinny"] * 1e3, ratio(t["onednn"], t["skinny"]),
                     "yes" if alone else "NO"])
    return rows


def engine_widths(engine, layers: list, prompts: list[list[int]], widths: list[int], rounds: int) -> list[list]:
    rows, run_ids = [], itertools.count()
    saved = linear.SKINNY_MAX_ROWS
    for width in widths:
        batch, outputs = (prompts * -(-width // len(prompts)))[:width], {}

        def run(skinny: bool):
            def go():
                linear.SKINNY_MAX_ROWS = 1 << 30 if skinny else 0
                outputs[skinny] = pdmesh_generate(engine, batch, 64, next(run_ids))
            return go
        try:
            run(True)(), run(False)()  # warm-up
            t = best_of(rounds, {"skinny": run(True), "onednn": run(False)})
        finally:
            linear.SKINNY_MAX_ROWS = saved
        tokens = width * 64
        rows.append([width, tokens / t["onednn"], tokens / t["skinny"], ratio(t["onednn"], t["skinny"]),
                     "yes" if outputs[True] == outputs[False] else "NO"])
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,2,4,8,16,32,64", help="part 1: rows of x")
    p.add_argument("--widths", default="1,8,16", help="part 2: sequences decoded together (empty: skip)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per case; the best counts")
    args = p.parse_args(argv)
    kernels = cpu_kernels.load()
    if kernels is None:
        raise SystemExit(f"pdmesh's CPU kernels could not be built: {cpu_kernels.failure()}")
    started = time.perf_counter()
    ck = load_checkpoint(None, log=log)
    engine = LLMEngine(ck.config, ck.weights, EngineConfig(kv_cache_gib=1.0))
    model = engine.model
    layers = [lin for layer in model.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    layers.append(model.lm_head)
    if any(lin.packed is None for lin in layers):
        raise SystemExit("oneDNN packing is not available here: nothing to compare the kernel with")
    print(f"Part 1: the linears of one decode step ({len(layers)} calls, {sum(l.weight.numel() for l in layers) * 4 / 1e6:.0f} MB "
          f"of float32 weights), ms, best of {args.rounds}\n")
    print(format_table(["rows", "oneDNN packed", "skinny kernel", "skinny speed-up", "each row as alone"],
                       step_linears(layers, kernels, [int(b) for b in args.batches.split(",") if b], args.rounds)))
    widths = [int(w) for w in args.widths.split(",") if w]
    if widths:
        prompts = make_prompts(ck.tokenizer.encode)
        print(f"\nPart 2: the engine, greedy, 64 new tokens per sequence, tok/s, best of {args.rounds}\n")
        print(format_table(["sequences", "oneDNN packed", "skinny kernel", "skinny speed-up", "same tokens"],
                           engine_widths(engine, layers, prompts, widths, args.rounds)))
    print(f"\n({time.perf_counter() - started:.0f} s, {torch.get_num_threads()} torch threads, OMP_WAIT_POLICY "
          f"{os.environ.get('OMP_WAIT_POLICY')}, load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
