"""Write every command's flags into README.md from the parser itself (one source for the docs).

    python tools/gen_flags_doc.py            # rewrite the block between the markers in README.md
    python tools/gen_flags_doc.py --check    # exit 1 if README.md's block differs from the parser

The block sits between `<!-- flags:begin -->` and `<!-- flags:end -->`; the test suite runs --check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pdmesh.cli import COMMANDS, command_flags

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- flags:begin -->", "<!-- flags:end -->"


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


def render(readme: str) -> str:
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{flags_markdown()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    current = README.read_text()
    wanted = render(current)
    if args.check:
        if wanted != current:
            print("README.md's flag tables differ from the parser: run python tools/gen_flags_doc.py",
                  file=sys.stderr)
            return 1
        return 0
    README.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
