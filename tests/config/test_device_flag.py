"""--device cuda on a machine without CUDA stops the command at once, saying why."""

from __future__ import annotations

import time

import pytest
import torch

from pdmesh import cli


@pytest.mark.parametrize("argv", [["decode", "--device", "cuda"], ["prefill", "--device", "cuda:0"],
                                  ["serve", "--device", "cuda", "--no-warmup"]])
def test_cuda_without_cuda_stops_before_loading_anything(argv, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("PDMESH_CLUSTER_SECRET", "device-test")
    start = time.monotonic()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"pdmesh {argv[0]}: --device {argv[2]}: CUDA is not available on this machine" in err
    assert "use --device cpu" in err
    assert time.monotonic() - start < 10  # no model was loaded, no child started
