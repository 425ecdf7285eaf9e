"""The chaos table of the README, measured: runs the chaos tests and prints one row per event.

    python tools/chaos_report.py [--readme] [extra pytest args, e.g. -k sigstop]

Runs `python -m pytest tests/e2e/test_serve_supervision.py tests/e2e/test_chaos.py` with
PDMESH_CHAOS_REPORT naming a temporary file; each chaos test that passes appends its row there
(tests/support/chaos_log.py), so a failed test has no row. Prints pytest's summary, then a
Markdown table: requests sent and failed; the slowest request's latency (what the event cost a
client); streams resumed and requests retried by the scheduler; prefills the live decode workers
moved to another worker; restarts by `pdmesh serve`; the scheduler's mean time from a worker's last
sign of life to its leaving routing; and the recovery time the event names. `--readme` also writes
the table into README.md between `<!-- chaos:begin -->` and `<!-- chaos:end -->`.
Exits with pytest's status. About 8 minutes on a loaded 2-core box.
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
TESTS = ["tests/e2e/test_serve_supervision.py", "tests/e2e/test_chaos.py"]
HEADERS = ["event", "sent", "failed", "slowest request s", "resumed", "retried", "prefill fallbacks", "restarts",
           "detection s", "recovery s"]
KEYS = ["event", "sent", "failed", "slowest_s", "resumed", "retried", "fallbacks", "restarts", "detection_s",
        "recovery_s"]
COUNTS = ("resumed", "retried", "fallbacks", "restarts")
BEGIN, END = "<!-- chaos:begin -->", "<!-- chaos:end -->"


def run_chaos_tests(report: Path, pytest_args: list[str]) -> int:
    env = {**os.environ, "PDMESH_CHAOS_REPORT": str(report)}
    command = [sys.executable, "-m", "pytest", "-q", *TESTS, *pytest_args]
    return subprocess.run(command, cwd=ROOT, env=env).returncode


def read_rows(report: Path) -> list[dict]:
    if not report.exists():
        return []
    return [json.loads(line) for line in report.read_text().splitlines() if line.strip()]


def table_row(row: dict) -> list[object]:
    # Counters arrive as Prometheus floats; they are whole numbers.
    return [int(row[k]) if k in COUNTS and row.get(k) is not None else row.get(k, "-") for k in KEYS]


def write_readme(table: str) -> None:
    readme = ROOT / "README.md"
    head, rest = readme.read_text().split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


def main(argv: list[str]) -> int:
    to_readme = "--readme" in argv
    pytest_args = [a for a in argv if a != "--readme"]
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "chaos.jsonl"
        status = run_chaos_tests(report, pytest_args)
        rows = read_rows(report)
    table = format_table(HEADERS, [table_row(r) for r in rows])
    print()
    print(table)
    if to_readme and status == 0:
        write_readme(table)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
