"""Shared pieces of the benchmark scripts: the prompt set, child processes that report one JSON
line, peak RSS, timing and table printing.

The children of a benchmark each run one engine in isolation (so its peak RSS is its own) and
print one JSON object as their last stdout line; `run_child` parses it back in the parent.
"""

from __future__ import annotations

import collections
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

# 16 plain-text prompts (no chat template: SmolLM2's template alone is ~30 tokens), 5-40 tokens each
# with SmolLM2's tokenizer; different lengths so prefill batches are ragged like real traffic. All of
# them make SmolLM2 (fp32, greedy) write 64 tokens without choosing EOS, so engines that suppress EOS
# (min_tokens) and engines that only ignore it (ignore_eos) pick the same tokens.
PROMPT_TEXTS = (
    "The city of Paris is known for its",
    "The old lighthouse keeper looked out over the stormy sea and",
    "Once upon a time, in a small village at the edge of a dark forest, there lived",
    "A refrigerator works by moving heat from the inside to the outside. The key parts are",
    "List three reasons why people enjoy gardening:",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The most important discovery in the history of medicine was",
    "Here are some tips for writing clean Python code:\n1.",
    "Q: What is the boiling point of water at sea level?\nA:",
    "Here is a recipe for a simple tomato soup. Ingredients:",
    "In 1969, the first humans landed on the Moon. The mission was called",
    "A good way to learn a new programming language is to",
    "Dear hiring manager, I am writing to apply for the position of software engineer at your company, "
    "because",
    "The three laws of thermodynamics can be summarized as follows. First,",
    "Photosynthesis is the process by which plants",
    "Summarize the plot of Romeo and Juliet in two sentences. The story",
)
MIN_PROMPT_TOKENS, MAX_PROMPT_TOKENS = 5, 40
RESULT_KEY = "bench_result"  # marks the JSON line a child prints for its parent


def make_prompts(encode: Callable[[str], list[int]], count: int = len(PROMPT_TEXTS)) -> list[list[int]]:
    """Token ids of the first `count` prompts; raises ValueError if one falls outside 5-40 tokens."""
    prompts = [list(encode(text)) for text in PROMPT_TEXTS[:count]]
    for text, ids in zip(PROMPT_TEXTS, prompts):
        if not MIN_PROMPT_TOKENS <= len(ids) <= MAX_PROMPT_TOKENS:
            raise ValueError(f"prompt {text!r} has {len(ids)} tokens, outside "
                             f"{MIN_PROMPT_TOKENS}-{MAX_PROMPT_TOKENS}")
    return prompts


def save_prompts(prompts: list[list[int]], path: Path) -> None:
    path.write_text(json.dumps(prompts))


def load_prompts(path: str | Path) -> list[list[int]]:
    return [list(map(int, ids)) for ids in json.loads(Path(path).read_text())]


# -- measuring ------------------------------------------------------------------------------------

def peak_rss_mb(include_children: bool = False) -> float:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB), in MiB. With
    include_children, the larger of it and the largest waited-for child's peak."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if include_children:
        peak = max(peak, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return peak / 1024


def tree_peak_rss_mb() -> tuple[float, int]:
    """(sum of the peak RSS (VmHWM) of this process and its live descendants in MiB, how many
    processes). For engines that run in helper processes (vLLM's engine core); shared pages are
    counted once per process, so this overstates a multi-process total somewhat."""
    pids, total_kib = _descendants(os.getpid()), 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:  # it exited meanwhile
            continue
        total_kib += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)
    return total_kib / 1024, len(pids)


def _descendants(pid: int) -> list[int]:
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                stack += [int(child) for child in children.read_text().split()]
            except OSError:
                continue
    return found


def best_time(run: Callable[[], object], repeats: int) -> tuple[float, object]:
    """(shortest wall time of `repeats` calls of `run`, the result of that call)."""
    best, result = float("inf"), None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        out = run()
        elapsed = time.perf_counter() - start
        if elapsed < best:
            best, result = elapsed, out
    return best, result


def log(message: str) -> None:
    """Progress goes to stderr so stdout stays free for the result line."""
    print(message, file=sys.stderr, flush=True)


# -- child processes ------------------------------------------------------------------------------

def emit_result(result: dict) -> None:
    """Print `result` as the child's last stdout line."""
    sys.stdout.flush()
    print(json.dumps({RESULT_KEY: result}), flush=True)


def parse_result(stdout: str) -> dict | None:
    """The last result line in `stdout` (libraries may print after it), or None."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{") and RESULT_KEY in line:
            try:
                return json.loads(line)[RESULT_KEY]
            except (ValueError, KeyError, TypeError):
                continue
    return None


def run_child(argv: Sequence[str], env: dict[str, str] | None = None, timeout: float | None = None,
              label: str = "child") -> dict:
    """Run `argv`, echo its stderr as it comes, and return its result dict; on failure a dict with
    "error" (exit status or missing result line, and the last lines of its stderr)."""
    try:
        proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **(env or {})})
    except OSError as exc:
        return {"error": f"cannot start {label}: {exc}"}
    stdout: list[str] = []
    stderr_tail: collections.deque[str] = collections.deque(maxlen=8)
    readers = [threading.Thread(target=_drain, args=(proc.stdout, stdout.append), daemon=True),
               threading.Thread(target=_drain, args=(proc.stderr, lambda line: _echo(line, stderr_tail)),
                                daemon=True)]
    for reader in readers:
        reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return {"error": f"{label} timed out after {timeout:.0f}s"}
    for reader in readers:
        reader.join()
    result = parse_result("".join(stdout))
    if result is None or proc.returncode != 0:
        reason = f"exit status {proc.returncode}" if proc.returncode else "no result line"
        tail = " | ".join(line.strip() for line in stderr_tail if line.strip())
        return {**(result or {}), "error": f"{label}: {reason}; last stderr: {tail}"}
    return result


def _drain(stream, sink: Callable[[str], None]) -> None:
    for line in stream:
        sink(line)


def _echo(line: str, tail: collections.deque) -> None:
    sys.stderr.write(line)
    sys.stderr.flush()
    tail.append(line)


# -- output ---------------------------------------------------------------------------------------

def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table, columns padded to their widest cell."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if value >= 10 else f"{value:.2f}"
    return str(value)


def ratio(value: float | None, reference: float | None) -> str:
    if not value or not reference:
        return "-"
    return f"{value / reference:.2f}x"


def compare_outputs(ours: list[list[int]], theirs: list[list[int]], n: int) -> tuple[int, list[tuple[int, int]]]:
    """(how many sequences have equal first `n` tokens, [(sequence index, first differing position)])."""
    matches, diffs = 0, []
    for i, (a, b) in enumerate(zip(ours, theirs)):
        a, b = list(a[:n]), list(b[:n])
        if a == b:
            matches += 1
        else:
            pos = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            diffs.append((i, pos))
    return matches, diffs
