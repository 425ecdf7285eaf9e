"""Whether the vLLM tests run: they need the `vllm` extra. Where the test command installed it
(tools/run_tests.sh sets PDMESH_REQUIRE_VLLM=1), a missing vLLM fails the tests instead of
skipping them, so CI never passes by skipping silently."""

from __future__ import annotations

import importlib.util
import os

import pytest


def needs_vllm() -> None:
    if importlib.util.find_spec("vllm") is not None:
        return
    if os.environ.get("PDMESH_REQUIRE_VLLM") == "1":
        pytest.fail("vLLM is required here (PDMESH_REQUIRE_VLLM=1) but cannot be imported: "
                    'pip install -e ".[vllm]"')
    pytest.skip('vLLM is not installed (pip install -e ".[vllm]")')
