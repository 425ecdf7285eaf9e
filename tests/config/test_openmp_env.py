"""--omp-wait-policy: checked when parsed, handed to every worker whole, and set before torch loads."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pdmesh.cli import build_parser, configs_from
from pdmesh.config import CpuPlacement
from pdmesh.errors import InvalidRequestError


def serve_config(*flags: str):
    return configs_from(build_parser().parse_args(["serve", *flags]), env={})


def test_a_policy_openmp_does_not_know_is_refused_by_name():
    with pytest.raises(InvalidRequestError) as caught:
        CpuPlacement(omp_wait_policy="busy")
    assert caught.value.field == "omp_wait_policy" and "'busy'" in str(caught.value)
    assert "passive, active" in str(caught.value)


def test_serve_gives_each_worker_the_policy_with_its_role_placement():
    default, active = serve_config(), serve_config("--omp-wait-policy", "active", "--decode-threads", "1")
    for role, nice in (("prefill", 10), ("decode", 0)):
        assert default.worker_config(role, 0).cpu.omp_wait_policy == "passive"
        cpu = active.worker_config(role, 0).cpu
        assert cpu.omp_wait_policy == "active" and cpu.nice == nice
    assert active.worker_config("decode", 0).cpu.threads == 1
    assert default.worker_config("decode", 0).cpu.openmp_env() == {"OMP_WAIT_POLICY": "PASSIVE"}


def test_the_environment_is_set_before_torch_loads_and_a_late_call_says_so():
    script = ("import sys, os\n"
              "from pdmesh.child import set_openmp_env\n"
              "from pdmesh.config import CpuPlacement\n"
              "assert 'torch' not in sys.modules, 'pdmesh.child loaded torch'\n"
              "set_openmp_env(CpuPlacement(omp_wait_policy='active'))\n"
              "import torch\n"
              "print(os.environ['OMP_WAIT_POLICY'])\n"
              "set_openmp_env(CpuPlacement())\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "OMP_WAIT_POLICY": "PASSIVE"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ACTIVE"]
    assert "torch is loaded already: --omp-wait-policy passive has no effect here" in done.stderr
