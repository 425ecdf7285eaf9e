"""vLLM offline throughput on fixed token-id prompts; run with vLLM's own interpreter.

    .venv-vllm/bin/python tools/vllm_offline_bench.py --model DIR --prompts-file P.json

Greedy, exactly --new-tokens tokens per sequence (min_tokens = max_tokens, ignore_eos), one
warm-up per batch size, then the best of --repeats timed `generate` calls for 1 sequence (the
first prompt) and for all prompts at once. The last stdout line is the JSON result (see
bench_common.emit_result). Uses only the standard library besides vLLM, so bench_common imports.
Set VLLM_CPU_OMP_THREADS_BIND / VLLM_CPU_KVCACHE_SPACE / VLLM_ENABLE_V1_MULTIPROCESSING in the
environment (bench_engine.py does).
"""

from __future__ import annotations

import argparse
import time

from bench_common import best_time, emit_result, load_prompts, log, tree_peak_rss_mb


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face model folder")
    parser.add_argument("--prompts-file", required=True, help="JSON list of token-id lists")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--eager", action="store_true", help="enforce_eager=True (no torch.compile)")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--skip-tokenizer-init", action="store_true", help="token-id prompts only (no tokenizer)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None, help="on a GPU: vLLM's share")
    return parser.parse_args()


def generate(llm, prompts: list[list[int]], params) -> list[list[int]]:
    from vllm.inputs import TokensPrompt

    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False)
    return [list(out.outputs[0].token_ids) for out in outputs]


def measure(llm, prompts: list[list[int]], params, repeats: int, new_tokens: int) -> tuple[float, list[list[int]]]:
    """(output tokens/s of the best timed run, that run's tokens), after one warm-up run."""
    generate(llm, prompts, params)
    elapsed, outputs = best_time(lambda: generate(llm, prompts, params), repeats)
    return len(prompts) * new_tokens / elapsed, outputs


def main() -> None:
    args = parse_args()
    prompts = load_prompts(args.prompts_file)
    start = time.perf_counter()
    from vllm import LLM, SamplingParams, __version__

    gpu = {} if args.gpu_memory_utilization is None else {"gpu_memory_utilization": args.gpu_memory_utilization}
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, enforce_eager=args.eager,
              seed=0, skip_tokenizer_init=args.skip_tokenizer_init, **gpu)
    load_s = time.perf_counter() - start
    import torch

    log(f"vllm {__version__} ready in {load_s:.1f}s ({'eager' if args.eager else 'compiled'}), "
        f"torch threads in this process: {torch.get_num_threads()}")
    params = SamplingParams(max_tokens=args.new_tokens, min_tokens=args.new_tokens, ignore_eos=True,
                            temperature=0.0)
    tok_s_1, _ = measure(llm, prompts[:1], params, args.repeats, args.new_tokens)
    tok_s_n, outputs = measure(llm, prompts, params, args.repeats, args.new_tokens)
    rss_mb, processes = tree_peak_rss_mb()  # one process with VLLM_ENABLE_V1_MULTIPROCESSING=0
    emit_result({"engine": "vllm", "version": __version__, "mode": "eager" if args.eager else "compiled",
                 "tok_s_1": tok_s_1, "tok_s_n": tok_s_n, "batch": len(prompts), "outputs": outputs,
                 "load_s": load_s, "torch_threads": torch.get_num_threads(), "rss_mb": rss_mb,
                 "processes": processes})


if __name__ == "__main__":  # required: vLLM may spawn its engine core
    main()
