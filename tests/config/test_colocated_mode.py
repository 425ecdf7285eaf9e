"""Colocated mode without sockets: how serve's flags turn it on, and what the scheduler then needs."""

from __future__ import annotations

import pytest

from pdmesh.cli import build_parser, configs_from
from pdmesh.config import COLOCATED_THRESHOLD, SchedulerConfig
from pdmesh.errors import InvalidRequestError
from pdmesh.scheduler.registry import WorkerLoad, WorkerRegistry
from pdmesh.scheduler.router import Router


def serve_config(*flags: str):
    return configs_from(build_parser().parse_args(["serve", *flags]), env={})


def test_no_prefill_workers_makes_the_scheduler_colocated():
    config = serve_config("--prefill-workers", "0").with_mode()
    assert config.colocated and config.scheduler.colocated
    assert config.scheduler.prefill_threshold() == COLOCATED_THRESHOLD
    disaggregated = serve_config().with_mode()
    assert not disaggregated.scheduler.colocated
    assert disaggregated.scheduler.prefill_threshold() == SchedulerConfig().local_prefill_threshold


@pytest.mark.parametrize("flags, field", [(("--colocated",), "prefill_workers"),
                                          (("--decode-workers", "0"), "decode_workers")])
def test_contradictory_plans_are_refused(flags, field):
    with pytest.raises(InvalidRequestError) as caught:
        serve_config(*flags)
    assert caught.value.field == field


def test_colocated_scheduler_serves_with_decode_workers_alone():
    for needs_prefill, serves in ((True, False), (False, True)):
        registry = WorkerRegistry(heartbeat_timeout_s=3.0, needs_prefill=needs_prefill)
        registry.register("d1", "decode", "127.0.0.1:1000", 1,
                          WorkerLoad(kv_blocks_free=100, kv_blocks_total=100, block_size=16))
        assert registry.can_serve() is serves


def test_colocated_threshold_routes_even_a_long_prompt_locally():
    registry = WorkerRegistry(heartbeat_timeout_s=3.0)
    registry.register("p1", "prefill", "127.0.0.1:1001", 1, WorkerLoad(block_size=16))
    router = Router(registry)
    assert router.pick_prefill_for(100_000, COLOCATED_THRESHOLD) is None
    assert router.pick_prefill_for(100_000, 64).worker_id == "p1"
