"""How a config field says it is a command-line flag: `field(default=..., metadata=option("help"))`.

Kept at the bottom of the package (it imports nothing of pdmesh) so that every config dataclass,
the engine's included, can declare its own flags. `pdmesh.config_loader` turns these declarations
into argparse flags, `PDMESH_<FLAG>` environment variables and `--config` TOML keys.
"""

from __future__ import annotations

from dataclasses import dataclass

KEY = "pdmesh_option"


@dataclass(frozen=True, slots=True)
class Option:
    help: str
    flag: str | None = None  # the flag's name without dashes; None: the field's name with - for _
    choices: tuple | None = None
    prefix: str = ""  # on a nested dataclass field: prepended to each of its flags ("prefill-")


def option(help: str, *, flag: str | None = None, choices: tuple | None = None) -> dict:
    """Metadata for a field that is a flag: `help` is what `--help` prints. One setting read by
    two configs (`--model` by the scheduler and the workers) is one `option(...)` object, defined
    once and given to both fields."""
    return {KEY: Option(help, flag, choices)}


def group(prefix: str = "") -> dict:
    """Metadata for a nested config field: its flags appear (with `prefix`) among the parent's."""
    return {KEY: Option("", prefix=prefix)}
