"""Rows of the chaos table: each chaos test that passes appends what it measured, one JSON object a
line, to the file named by PDMESH_CHAOS_REPORT (unset: nothing is written). tools/chaos_report.py
sets it, runs the chaos tests and prints the rows, so the README's numbers come from one command."""

from __future__ import annotations

import json
import os

REPORT_ENV = "PDMESH_CHAOS_REPORT"


def record(event: str, row: dict, recovery_s: float | None = None) -> None:
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"event": event, **row, "recovery_s": recovery_s}) + "\n")
