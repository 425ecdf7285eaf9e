"""The knee and the verdict on sweeps recorded by `pdmesh advise` against a SmolLM2 mesh (1 prefill,
1 decode worker, this machine): long prompts with short outputs, and short prompts with long ones."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pdmesh.advise.advise_config import AdviseConfig
from pdmesh.advise.knee import find_knee
from pdmesh.advise.sweep_step import SweepStep
from pdmesh.advise.verdict import decide, describe, ratio

DATA = Path(__file__).parent / "data"
LIMITS = AdviseConfig()


def recorded(name: str) -> list[SweepStep]:
    return [SweepStep.from_json(s) for s in json.loads((DATA / f"{name}.json").read_text())]


def verdict_of(steps: list[SweepStep]):
    return decide(steps, LIMITS.ttft_rise, LIMITS.flat_gain, LIMITS.busy_limit)


@pytest.mark.parametrize("name, phase", [("long_prompts", "prefill"), ("long_outputs", "decode")])
def test_each_mix_names_its_own_bottleneck(name, phase):
    steps = recorded(name)
    verdict = verdict_of(steps)
    assert verdict.phase == phase, describe(verdict, steps)
    assert verdict.reasons and verdict.demand is not None
    lines = describe(verdict, steps)
    assert lines[1].startswith(f"saturates first: {phase}, at ")
    assert any(line.startswith("ratio: the measured load wants prefill:decode workers = ") for line in lines)


@pytest.mark.parametrize("name", ["long_prompts", "long_outputs"])
def test_no_knee_before_ttft_rises(name):
    steps = recorded(name)
    knee = find_knee(steps, LIMITS.ttft_rise, LIMITS.flat_gain)
    assert knee is not None, [s.ttft_p95_s for s in steps]
    before = steps[:knee]
    assert find_knee(before, LIMITS.ttft_rise, LIMITS.flat_gain) is None
    # throughput that kept up with the offered rate is no knee, however TTFT grew
    kept_up = [dataclasses.replace(s, throughput=s.rate) for s in steps]
    assert find_knee(kept_up, LIMITS.ttft_rise, LIMITS.flat_gain) is None


def test_a_colocated_mesh_gets_no_ratio():
    steps = [dataclasses.replace(s, signals=dataclasses.replace(s.signals, prefill_workers=0, prefill_busy=None))
             for s in recorded("long_prompts")]
    verdict = verdict_of(steps)
    assert verdict.phase == "colocated" and verdict.demand is None
    assert "colocated" in describe(verdict, steps)[-1]


@pytest.mark.parametrize("prefill, decode, expected", [(0.9, 0.45, "2:1"), (0.2, 0.8, "1:4"), (0.5, 0.5, "1:1"),
                                                       (0.0, 0.5, "-")])
def test_ratio_in_small_whole_numbers(prefill, decode, expected):
    assert ratio(prefill, decode) == expected
