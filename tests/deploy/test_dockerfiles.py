"""deploy/docker: hadolint passes, and each image is what the manifests expect: multi-stage,
a non-root numeric user, `pdmesh` as entrypoint, a gRPC health check, the ports they use."""

from __future__ import annotations

import re

import pytest

from pdmesh.config import SchedulerConfig
from pdmesh.engine.default_model import CACHE_ENV
from pdmesh.exporter.exporter_config import ExporterConfig
from support.deploy_files import DEPLOY, ROOT, flag_default, run, tool

DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile.*"))


def instructions(path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    return [tuple(line.split(None, 1)) for line in text.splitlines() if line and not line.startswith("#")]


def test_there_is_a_cpu_and_a_cuda_image():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.cuda"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    run(tool("hadolint"), str(dockerfile))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_shape(dockerfile):
    steps = instructions(dockerfile)
    assert sum(op == "FROM" for op, _ in steps) >= 2  # build stage + runtime stage
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    runtime = dict(steps[last_from:])  # the last of each instruction in the runtime stage
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", runtime["USER"])
    assert runtime["ENTRYPOINT"] == '["pdmesh"]'
    assert "pdmesh_debug.py" in runtime["HEALTHCHECK"] and "health" in runtime["HEALTHCHECK"]
    assert f"{CACHE_ENV}=/models" in runtime["ENV"] and "/models" in runtime["VOLUME"]
    exposed = {int(p) for p in runtime["EXPOSE"].split()}
    assert {SchedulerConfig().listen.port, flag_default("scheduler", "internal-port"), ExporterConfig().port} <= exposed


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_files_exist_and_pass_dockerignore(dockerfile):
    allowed = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for op, args in instructions(dockerfile):
        if op == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), source
                assert any(source == a or source.startswith(a + "/") for a in allowed), f"{source} is ignored"
