"""The chaos table of the README, measured: runs the chaos tests and prints one row per event.

    python tools/chaos_report.py [extra pytest args, e.g. -k sigstop]

Runs `python -m pytest tests/e2e/test_chaos.py` with PDMESH_CHAOS_REPORT naming a temporary file;
each chaos test that passes appends its row there (tests/support/chaos_log.py), so a failed test
has no row. Prints pytest's summary, then a Markdown table: requests sent and failed; the slowest
request's latency (what the event cost a client); streams resumed and requests retried by the
scheduler; prefills the live decode workers moved to another worker; the scheduler's mean time
from a worker's last sign of life to its leaving routing; and the recovery time the event names.
Exits with pytest's status. About 4 minutes on a loaded 2-core box.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_common import format_table

ROOT = Path(__file__).resolve().parent.parent
HEADERS = ["event", "sent", "failed", "slowest request s", "resumed", "retried", "prefill fallbacks", "detection s",
           "recovery s"]
KEYS = ["event", "sent", "failed", "slowest_s", "resumed", "retried", "fallbacks", "detection_s", "recovery_s"]


def run_chaos_tests(report: Path, pytest_args: list[str]) -> int:
    env = {**os.environ, "PDMESH_CHAOS_REPORT": str(report)}
    command = [sys.executable, "-m", "pytest", "-q", "tests/e2e/test_chaos.py", *pytest_args]
    return subprocess.run(command, cwd=ROOT, env=env).returncode


def read_rows(report: Path) -> list[dict]:
    if not report.exists():
        return []
    return [json.loads(line) for line in report.read_text().splitlines() if line.strip()]


def table_row(row: dict) -> list[object]:
    # Counters arrive as Prometheus floats; they are whole numbers.
    return [int(row[k]) if k in ("resumed", "retried", "fallbacks") else row.get(k) for k in KEYS]


def main() -> int:
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "chaos.jsonl"
        status = run_chaos_tests(report, sys.argv[1:])
        rows = read_rows(report)
    print()
    print(format_table(HEADERS, [table_row(r) for r in rows]))
    return status


if __name__ == "__main__":
    sys.exit(main())
