"""What the deploy/ checks share: the real tools (kubectl kustomize, docker-compose, promtool),
the rendered objects, and the contract between manifests and code (flags, env names, ports).

Flags the security work is adding (names fixed in its issue) are used by the manifests already.
They are listed once, in PENDING_FLAGS: while `command_flags` lacks one, the checks accept it;
as soon as the CLI declares it, it is checked like any other flag (and its default port with it),
so nothing has to be edited to turn those checks on.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pdmesh.cli import COMMANDS, build_parser, command_flags
from pdmesh.engine.default_model import CACHE_ENV

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("cpu", "gpu")

# flag -> the commands that will have it (and, for ports, the default the manifests use meanwhile)
PENDING_FLAGS: dict[str, set[str]] = {}  # every flag the manifests use exists now
PENDING_DEFAULTS: dict[str, int] = {}


def tool(name: str) -> str:
    """Path of a required tool; tools/run_tests.sh installs them, so in CI a missing one fails."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (tools/run_tests.sh installs it)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    return path


def run(*argv: str, cwd: Path = ROOT) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def kustomize(overlay: str) -> list[dict]:
    """The objects `kubectl kustomize deploy/k8s/overlays/<overlay>` renders."""
    text = run(tool("kubectl"), "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay))
    return [doc for doc in yaml.safe_load_all(text) if doc]


def compose_config() -> dict:
    text = run(tool("docker-compose"), "-f", str(DEPLOY / "compose" / "compose.yaml"), "config")
    return yaml.safe_load(text)


def of_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def known_env(command: str) -> set[str]:
    """PDMESH_* names `command` reads: its flags' variables, those its --help names (PDMESH_CONFIG,
    PDMESH_LOG_LEVEL), the model cache, and those of pending flags the CLI does not declare yet."""
    names = {flag.env for flag in command_flags(command).values()} | {CACHE_ENV}
    names |= {word.strip("().,;`") for word in help_text(command).split() if word.startswith("PDMESH_")}
    return names | {"PDMESH_" + name.replace("-", "_").upper() for name in pending_flags(command)}


def help_text(command: str) -> str:
    """`pdmesh --help` and `pdmesh <command> --help`, as printed."""
    text = build_parser().format_help()
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        build_parser().parse_args([command, "--help"])
    return text + out.getvalue()


def known_flags(command: str) -> set[str]:
    return set(command_flags(command)) | pending_flags(command)


def pending_flags(command: str) -> set[str]:
    """Pending flags of `command` that no command of the CLI declares yet."""
    declared = {name for c in COMMANDS for name in command_flags(c)}
    return {name for name, commands in PENDING_FLAGS.items() if command in commands and name not in declared}


def flag_default(command: str, name: str):
    flags = command_flags(command)
    return flags[name].default if name in flags else PENDING_DEFAULTS[name]


def flags_in(argv: list[str]) -> set[str]:
    return {arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--")}
