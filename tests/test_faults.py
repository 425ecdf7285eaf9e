"""PDMESH_FAULTS: parsed once at start, bad specs refused with the bad part named, probabilities obeyed."""

from __future__ import annotations

import pytest

from pdmesh import faults
from pdmesh.cli import build_parser, configs_from
from pdmesh.errors import InvalidRequestError


@pytest.fixture(autouse=True)
def no_faults():
    yield
    faults.install(faults.Faults())


def test_spec_from_the_issue_parses():
    f = faults.parse("kv_corrupt=0.5,kv_truncate=0.1,kv_delay_ms=3000,prefill_crash=0.05")
    assert f == faults.Faults(kv_corrupt=0.5, kv_truncate=0.1, kv_delay_ms=3000, prefill_crash=0.05)
    assert f.active and not faults.parse("").active


@pytest.mark.parametrize("spec, message", [
    ("kv_corupt=0.5", "'kv_corupt=0.5' is not NAME=VALUE"),
    ("kv_corrupt", "'kv_corrupt' is not NAME=VALUE"),
    ("kv_corrupt=lots", "kv_corrupt='lots' is not a number"),
    ("kv_corrupt=1.5", "kv_corrupt is a probability in [0, 1], got 1.5"),
    ("kv_delay_ms=-1", "kv_delay_ms must be >= 0"),
])
def test_bad_spec_is_a_clear_error(spec, message):
    with pytest.raises(InvalidRequestError, match="PDMESH_FAULTS: " + message.replace("[", r"\[").replace("(", r"\(")):
        faults.parse(spec)


def test_read_from_the_environment_once_by_every_worker_command():
    for command in ("prefill", "decode", "serve"):
        args = build_parser().parse_args([command])
        config = configs_from(args, {"PDMESH_FAULTS": "kv_corrupt=1"})
        worker = config if command != "serve" else config.worker
        assert faults.parse(worker.faults).kv_corrupt == 1.0
    with pytest.raises(InvalidRequestError, match="PDMESH_FAULTS"):
        configs_from(build_parser().parse_args(["decode"]), {"PDMESH_FAULTS": "nonsense=1"})


def test_off_unless_installed_and_probabilities_hold():
    assert not any(faults.hit(name) for name in ("kv_corrupt", "kv_truncate", "prefill_crash"))
    assert faults.delay_s() == 0
    faults.install(faults.parse("kv_corrupt=1,kv_truncate=0.25,kv_delay_ms=1500"))
    assert all(faults.hit("kv_corrupt") for _ in range(100))
    assert 150 < sum(faults.hit("kv_truncate") for _ in range(1000)) < 350
    assert faults.delay_s() == 1.5
