"""Write README.md's generated blocks from the code itself (one source for the docs):
every command's flags (from the parser) and the metrics exporter's series (from its catalog).

    python tools/gen_readme.py            # rewrite each block between its markers in README.md
    python tools/gen_readme.py --check    # exit 1 if any block differs from the code

Blocks sit between `<!-- NAME:begin -->` and `<!-- NAME:end -->`; the test suite runs --check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from pdmesh.cli import COMMANDS, command_flags
from pdmesh.exporter.series import CATALOG

README = Path(__file__).resolve().parents[1] / "README.md"


def flags_markdown() -> str:
    lines = []
    for command, (text, _, _) in COMMANDS.items():
        lines += [f"**`pdmesh {command}`**: {text}.", "", "| flag | default | what it sets |", "|---|---|---|"]
        for flag in command_flags(command).values():
            default = "unset" if flag.default in (None, "") else flag.default
            choices = f" ({' / '.join(map(str, flag.choices))})" if flag.choices else ""
            lines.append(f"| `--{flag.name}` | `{default}` | {flag.help}{choices} |")
        lines.append("")
    lines.append("Every flag can also come from the environment (`PDMESH_<FLAG>`, e.g. `PDMESH_KV_TIMEOUT=5`) or "
                 "from a TOML file given with `--config` (`kv-timeout = 5`); the command line wins over the "
                 "environment, which wins over the file.")
    return "\n".join(lines)


def series_markdown() -> str:
    lines = ["| series | type | labels | meaning | vLLM series of the same meaning |", "|---|---|---|---|---|"]
    for spec in CATALOG:
        labels = ", ".join(spec.labels) or "-"
        lines.append(f"| `{spec.name}` | {spec.kind} | {labels} | {spec.help} | {spec.vllm or '-'} |")
    return "\n".join(lines)


BLOCKS: dict[str, Callable[[], str]] = {"flags": flags_markdown, "series": series_markdown}


def render(readme: str) -> str:
    for name, make in BLOCKS.items():
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        head, rest = readme.split(begin, 1)
        _, tail = rest.split(end, 1)
        readme = f"{head}{begin}\n{make()}\n{end}{tail}"
    return readme


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    current = README.read_text()
    wanted = render(current)
    if args.check:
        if wanted != current:
            print("README.md's generated blocks differ from the code: run python tools/gen_readme.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
