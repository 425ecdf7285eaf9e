"""Write the table of `pdmesh exporter`'s series into README.md from pdmesh.exporter.series.

    python tools/gen_series_doc.py            # rewrite the block between the markers in README.md
    python tools/gen_series_doc.py --check    # exit 1 if README.md's block differs from the catalog

The block sits between `<!-- series:begin -->` and `<!-- series:end -->`; the test suite runs --check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pdmesh.exporter.series import CATALOG

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- series:begin -->", "<!-- series:end -->"


def series_markdown() -> str:
    lines = ["| series | type | labels | meaning | vLLM series of the same meaning |", "|---|---|---|---|---|"]
    for spec in CATALOG:
        labels = ", ".join(spec.labels) or "-"
        lines.append(f"| `{spec.name}` | {spec.kind} | {labels} | {spec.help} | {spec.vllm or '-'} |")
    return "\n".join(lines)


def render(readme: str) -> str:
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{series_markdown()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    current = README.read_text()
    wanted = render(current)
    if args.check:
        if wanted != current:
            print("README.md's exporter series table differs from pdmesh.exporter.series: "
                  "run python tools/gen_series_doc.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
