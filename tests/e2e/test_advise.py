"""`pdmesh advise` against a real (echo-model) mesh: it sweeps, reads cluster status and worker
metrics, and prints a table and a verdict."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from support.mesh import start_mesh


def test_advise_sweeps_a_mesh_and_prints_a_verdict(tmp_path):
    mesh = start_mesh(tmp_path / "serve.log", "--engine", "echo", "--echo-step-ms", "20", "--max-model-len", "512",
                      "--prefill-workers", "1", "--decode-workers", "1", "--local-prefill-threshold", "0",
                      "--no-warmup")
    try:
        out = advise(mesh, "--rates", "2,4,8", "--step", "3", "--prompt-tokens", "64", "--output-tokens", "8",
                     "--json", str(tmp_path / "steps.json"))
        # Each rate sends prompts of its own (seed + step): none is answered from a prefix cache
        assert sum(w.prefix_cache_hit_tokens for w in mesh.workers()) == 0
        # Every request over the output cap (511): advise says why each step's requests failed
        refused = advise(mesh, "--rates", "2", "--step", "2", "--prompt-tokens", "64", "--output-tokens", "600")
    finally:
        assert mesh.stop() == 0
    assert out.returncode == 0, out.stdout + out.stderr
    print(out.stdout)
    lines = out.stdout.splitlines()
    assert any(line.startswith("knee: ") for line in lines), out.stdout
    assert any(line.startswith("saturates first: ") for line in lines), out.stdout
    steps = json.loads((tmp_path / "steps.json").read_text())
    assert steps[0]["rate"] == 2 and steps[0]["num_ok"] == steps[0]["num_requests"] == 6
    signals = steps[0]["signals"]
    assert (signals["prefill_workers"], signals["decode_workers"]) == (1, 1)
    assert signals["decode_busy"] > 0 and signals["handoff_p95_s"] is not None  # read from the workers' metrics
    assert signals["decode_cores"] > 0 and signals["prefill_cores"] > 0  # their processes' CPU
    assert "decode cores" in lines[1] and steps[0]["failures"] == {}

    assert refused.returncode == 1, refused.stdout + refused.stderr
    failed = [line.strip() for line in refused.stdout.splitlines() if line.strip().startswith("failed at 2 req/s")]
    assert len(failed) == 1 and failed[0].startswith("failed at 2 req/s: 4 x INVALID_ARGUMENT: "), refused.stdout
    assert failed[0].endswith("max_tokens is 600; max-output-tokens is 511"), failed  # the value and the limit


def advise(mesh, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pdmesh.cli", "advise", "--target", mesh.address, *flags],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))
