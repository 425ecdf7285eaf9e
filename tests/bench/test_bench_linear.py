"""tools/bench_linear.py on the default model with tiny settings: both parts print, each row of a
batch gets the kernel's bits as when alone, and the engine's tokens are the same both ways."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_linear.py"


def test_bench_linear_prints_both_parts_and_the_paths_agree(smollm2_path):
    done = subprocess.run([sys.executable, str(TOOL), "--batches", "1,5", "--widths", "2", "--rounds", "1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in done.stdout.splitlines()
            if line.startswith("| ") and line[2].isdigit()]
    assert [r[0] for r in rows] == ["1", "5", "2"], done.stdout
    assert all(float(r[1]) > 0 and float(r[2]) > 0 and r[4] == "yes" for r in rows), done.stdout
