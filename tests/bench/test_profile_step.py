"""tools/profile_step.py on the default model with tiny settings: it runs, and its table adds up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "profile_step.py"


def test_profile_step_prints_a_row_per_kind_and_batch(smollm2_path):
    done = subprocess.run([sys.executable, str(TOOL), "--batches", "1,2", "--steps", "2", "--context", "8",
                           "--top", "3"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [float(v) for v in line.split("|")[2:-1]]
            for line in done.stdout.splitlines() if line.startswith("| ") and "ms per decode step" not in line}
    assert rows["step (wall, unprofiled)"][0] > 0 and rows["tokens/s"][1] > 0
    assert rows["linear"][0] > 0 and rows["attention"][1] > 0  # the op kinds were found in the profile
    assert "batch 2: the 3 costliest ops" in done.stdout
