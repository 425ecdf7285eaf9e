"""Output tokens/s of pdmesh's engine on a GPU: `tools/bench_engine.py --device cuda` runs this.

    python tools/bench_engine.py --device cuda [--models smollm2,llama-1b] [--streams 1,16,64]
                                 [--backends sdpa,flex] [--new-tokens 64] [--gpu-memory-utilization 0.3]

Per model, one child process (its GPU memory freed when it exits) builds the engine in bfloat16
(the CUDA default) with the KV pool sized from --gpu-memory-utilization, and for each decode
attention backend (sdpa gathers each context; flex reads blocks in place) and each stream count
runs that many prompts of 128 random token ids at once, each generating exactly --new-tokens
tokens greedily: one warm-up run (which also compiles flex), then the best of --repeats. Models:
- smollm2: SmolLM2-135M-Instruct, its real weights when the GGUF is in the pdmesh cache, else
  random weights of the same shape (GPU machines may have no network; throughput is the same);
- llama-1b: Llama-3.2-1B's shape (16 layers, hidden 2048, 32 heads, 8 KV heads, vocab 128,256),
  random weights, 1.24 B parameters.
vLLM runs the same prompts on the same GPU when it is installed (`import vllm` works).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

from bench_common import best_time, emit_result, format_table, log, ratio, run_child

HERE = Path(__file__).resolve().parent
PROMPT_TOKENS = 128
SHAPES = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                    num_kv_heads=3, head_dim=64, rope_theta=100000.0, tie_word_embeddings=True),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                     num_kv_heads=8, head_dim=64, rope_theta=500000.0, tie_word_embeddings=True),
}
CHILD_TIMEOUT_S = 1200


def add_args(p: argparse.ArgumentParser) -> None:
    """The GPU mode's flags, on bench_engine's parser."""
    p.add_argument("--models", default="smollm2,llama-1b", help=f"GPU mode: comma list of {', '.join(SHAPES)}")
    p.add_argument("--streams", default="1,16,64", help="GPU mode: concurrent sequences per run, comma list")
    p.add_argument("--backends", default="sdpa,flex", help="GPU mode: decode attention backends, comma list")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3, help="GPU mode: the engine's share")
    p.add_argument("--json-out", help="GPU mode: also write every result to this JSON file")
    p.add_argument("--gpu-child", help=argparse.SUPPRESS)  # child mode: one model


# -- child: one model, every backend and stream count ---------------------------------------------

def model_weights(name: str, device):
    """(ModelConfig, weights on the device in bfloat16, "real" | "random")."""
    import torch

    from pdmesh.engine.default_model import DEFAULT_MODEL_FILE, resolve_cache_dir
    from pdmesh.engine.model_config import ModelConfig

    gguf = resolve_cache_dir() / "models" / DEFAULT_MODEL_FILE
    if name == "smollm2" and gguf.is_file():
        from pdmesh.engine.checkpoint import load_checkpoint

        checkpoint = load_checkpoint(gguf, log=log)
        return checkpoint.config, checkpoint.weights, "real"
    config = ModelConfig(max_position_embeddings=4096, eos_token_ids=(0,), name=name, **SHAPES[name])
    generator = torch.Generator(device=device).manual_seed(0)

    def random(*shape):
        return (torch.randn(*shape, device=device, dtype=torch.bfloat16, generator=generator) * 0.02)

    d, q, kv, ffn = config.hidden_size, config.q_size, config.kv_size, config.intermediate_size
    weights = {"model.embed_tokens.weight": random(config.vocab_size, d),
               "model.norm.weight": torch.ones(d, device=device, dtype=torch.bfloat16)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        weights.update({p + "self_attn.q_proj.weight": random(q, d), p + "self_attn.k_proj.weight": random(kv, d),
                        p + "self_attn.v_proj.weight": random(kv, d), p + "self_attn.o_proj.weight": random(d, q),
                        p + "mlp.gate_proj.weight": random(ffn, d), p + "mlp.up_proj.weight": random(ffn, d),
                        p + "mlp.down_proj.weight": random(d, ffn),
                        p + "input_layernorm.weight": torch.ones(d, device=device, dtype=torch.bfloat16),
                        p + "post_attention_layernorm.weight": torch.ones(d, device=device, dtype=torch.bfloat16)})
    return config, weights, "random"


def prompts_for(streams: int, vocab: int) -> list[list[int]]:
    import random

    rng = random.Random(streams)
    return [[rng.randrange(10, vocab) for _ in range(PROMPT_TOKENS)] for _ in range(streams)]


def run_model(args: argparse.Namespace) -> dict:
    import torch

    from pdmesh.engine.device import memory_used_bytes, resolve_device
    from pdmesh.engine.engine_config import EngineConfig
    from pdmesh.engine.llm_engine import LLMEngine

    from bench_engine import pdmesh_generate

    device = resolve_device(args.device)
    start = time.perf_counter()
    config, weights, kind = model_weights(args.gpu_child, device)
    streams = [int(s) for s in args.streams.split(",")]
    rows, run_ids = [], itertools.count()
    for backend in args.backends.split(","):
        engine = LLMEngine(config, weights, EngineConfig(
            device=str(device), max_num_seqs=max(streams), max_model_len=2048, max_num_batched_tokens=8192,
            gpu_memory_utilization=args.gpu_memory_utilization, attention_backend=backend))
        log(f"{args.gpu_child} ({kind} weights), {backend}: {engine.num_total_blocks:,} KV blocks, "
            f"{memory_used_bytes(device) / 2**30:.1f} GiB held, ready in {time.perf_counter() - start:.0f}s")
        for n in streams:
            batch = prompts_for(n, config.vocab_size)
            pdmesh_generate(engine, batch, args.new_tokens, next(run_ids))  # warm-up (flex compiles here)
            elapsed, _ = best_time(lambda: pdmesh_generate(engine, batch, args.new_tokens, next(run_ids)),
                                   args.repeats)
            rows.append({"backend": engine.model.decode_backend, "asked": backend, "streams": n,
                         "tok_s": n * args.new_tokens / elapsed, "ms_per_step": 1000 * elapsed / args.new_tokens})
            log(f"   {n} streams: {rows[-1]['tok_s']:.0f} tok/s")
        del engine
        torch.cuda.empty_cache()
    return {"model": args.gpu_child, "weights": kind, "rows": rows,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
            "torch": torch.__version__}


def run_vllm(model: str, args: argparse.Namespace) -> dict:
    """vLLM on the same prompts, when installed: an HF folder of the same shape (random weights)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vLLM is not installed here"}
    with tempfile.TemporaryDirectory(prefix="bench_gpu.") as tmp:
        folder = Path(tmp) / model
        _write_hf_folder(model, folder)
        rows = []
        for n in (int(s) for s in args.streams.split(",")):
            prompts_file = Path(tmp) / f"prompts-{n}.json"
            prompts_file.write_text(json.dumps(prompts_for(n, SHAPES[model]["vocab_size"])))
            cmd = [sys.executable, str(HERE / "vllm_offline_bench.py"), "--model", str(folder), "--prompts-file",
                   str(prompts_file), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
                   "--dtype", "bfloat16", "--skip-tokenizer-init",
                   "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
            result = run_child(cmd, timeout=CHILD_TIMEOUT_S, label=f"vllm {model} {n}")
            rows.append({"streams": n, "tok_s": result.get("tok_s_n"), "error": result.get("error")})
        return {"rows": rows}


def _write_hf_folder(model: str, folder: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SHAPES[model]
    config = LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
                         intermediate_size=s["intermediate_size"], num_hidden_layers=s["num_layers"],
                         num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"],
                         rope_theta=s["rope_theta"], tie_word_embeddings=s["tie_word_embeddings"],
                         max_position_embeddings=4096, torch_dtype="bfloat16")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)


# -- parent ---------------------------------------------------------------------------------------

def main(args: argparse.Namespace) -> None:
    if args.gpu_child:
        emit_result(run_model(args))
        return
    start = time.perf_counter()
    results = []
    for model in args.models.split(","):
        log(f"== {model} on {args.device} ==")
        cmd = [sys.executable, str(Path(__file__).resolve().parent / "bench_engine.py"), "--device", args.device,
               "--gpu-child", model, "--streams", args.streams, "--backends", args.backends,
               "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
               "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
        result = run_child(cmd, timeout=CHILD_TIMEOUT_S, label=model)
        result["vllm"] = run_vllm(model, args) if "error" not in result else {"skipped": "pdmesh run failed"}
        results.append(result)
    report(results, args)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))
    print(f"total {time.perf_counter() - start:.0f}s")


def report(results: list[dict], args: argparse.Namespace) -> None:
    headers = ["model", "weights", "decode attention", "streams", "tok/s", "ms/step", "vs vLLM"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r.get("model", "?"), "failed", "-", "-", "-", "-", "-"])
            continue
        vllm = {v["streams"]: v.get("tok_s") for v in r["vllm"].get("rows", [])}
        for row in r["rows"]:
            backend = row["backend"] + ("" if row["backend"] == row["asked"] else f" (asked {row['asked']})")
            rows.append([r["model"], r["weights"], backend, row["streams"], row["tok_s"], row["ms_per_step"],
                         ratio(row["tok_s"], vllm.get(row["streams"]))])
    gpu = next((r["gpu"] for r in results if "gpu" in r), args.device)
    print(f"\n{gpu}, bfloat16, greedy, {args.new_tokens} new tokens per stream after a {PROMPT_TOKENS}-token prompt, "
          f"best of {args.repeats} after 1 warm-up\n")
    print(format_table(headers, rows))
    for r in results:
        if "error" in r:
            print(f"FAILED {r['error']}")
        elif "skipped" in r["vllm"]:
            print(f"{r['model']}: vLLM skipped ({r['vllm']['skipped']})")
    sys.stdout.flush()

