"""README's table of exporter series is generated from the catalog and kept in step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_series_table_matches_the_catalog():
    assert subprocess.run([sys.executable, str(ROOT / "tools" / "gen_readme.py"), "--check"]).returncode == 0
