"""Worker membership without sockets: breaker thresholds, heartbeat settlement of assignments."""

from __future__ import annotations

import pytest

from pdmesh.errors import UnavailableError
from pdmesh.scheduler.circuit_breaker import CircuitBreaker
from pdmesh.scheduler.registry import WorkerLoad, WorkerRegistry
from pdmesh.scheduler.router import Assignment, Router


def test_soft_failures_open_the_breaker_only_when_they_repeat():
    breaker = CircuitBreaker(threshold=3)
    assert not breaker.record_failure(0.0, hard=False) and breaker.closed
    assert not breaker.record_failure(0.5, hard=False) and breaker.closed
    assert breaker.record_failure(1.0, hard=False) and not breaker.closed
    assert not breaker.may_probe(1.0) and breaker.may_probe(60.0)
    assert breaker.record_success() and breaker.closed


def test_hard_failure_opens_at_once_and_backs_off_exponentially():
    breaker = CircuitBreaker()
    assert breaker.record_failure(10.0)
    first = breaker.probe_at - 10.0
    breaker.record_failure(10.0)
    assert breaker.probe_at - 10.0 > first


def registry_with(*loads: tuple[str, str, int]) -> WorkerRegistry:
    registry = WorkerRegistry(heartbeat_timeout_s=3.0)
    for worker_id, role, free in loads:
        registry.register(worker_id, role, f"127.0.0.1:{len(registry.workers) + 1000}", 1,
                          WorkerLoad(kv_blocks_free=free, kv_blocks_total=100, block_size=16))
    return registry


def test_failed_worker_leaves_routing_and_rejoins():
    registry = registry_with(("d1", "decode", 100), ("d2", "decode", 50), ("p1", "prefill", 0))
    router = Router(registry)
    assert router.pick_decode(32).worker_id == "d1"
    registry.report_failure(registry.workers["d1"], "probe refused")
    assert router.pick_decode(32).worker_id == "d2"
    registry.report_success(registry.workers["d1"])
    assert router.pick_decode(32).worker_id == "d1"


def test_started_requests_stay_counted_until_a_later_heartbeat():
    registry = registry_with(("d1", "decode", 100), ("p1", "prefill", 0))
    router = Router(registry)
    d1, p1 = registry.workers["d1"], registry.workers["p1"]
    assignment = Assignment(d1, p1, num_prompt_tokens=100, num_tokens=160)  # 10 blocks
    assert d1.pending_blocks == 10 and p1.pending_prompt_tokens == 100
    assignment.start(now=0.0)  # first token: prefill done, the decode worker holds the blocks
    assert p1.pending_prompt_tokens == 0 and d1.pending_blocks == 10
    registry.heartbeat("d1", WorkerLoad(kv_blocks_free=90, kv_blocks_total=100, block_size=16))
    assert d1.pending_blocks == 0 and d1.pending_requests == 0  # the report includes it now
    assert router.pick_decode(90 * 16).worker_id == "d1"


def test_worker_that_cannot_pair_is_refused_at_registration_naming_both_sides():
    from pdmesh.engine.kv_cache import KVLayout
    from pdmesh.errors import FailedPreconditionError
    from pdmesh.scheduler.pairing import Pairing

    fp32 = Pairing("SmolLM2-135M", "pdmesh", KVLayout(30, 3, 64, "float32", (0, 1, 2)))
    registry = WorkerRegistry(heartbeat_timeout_s=3.0)
    registry.register("decode-a", "decode", "127.0.0.1:1", 1, WorkerLoad(), pairing=fp32)
    registry.register("prefill-a", "prefill", "127.0.0.1:2", 2, WorkerLoad(),  # TP shards may differ
                      pairing=Pairing("SmolLM2-135M", "pdmesh", KVLayout(30, 3, 64, "float32", (0, 1))))
    for bad, what in ((Pairing("SmolLM2-135M", "pdmesh", KVLayout(30, 3, 64, "bfloat16", (0, 1, 2))), "KV dtype"),
                      (Pairing("Other-1B", "pdmesh", fp32.layout), "model"),
                      (Pairing("SmolLM2-135M", "echo", fp32.layout), "engine kind")):
        with pytest.raises(FailedPreconditionError) as err:
            registry.register("prefill-b", "prefill", "127.0.0.1:3", 1, WorkerLoad(), pairing=bad)
        message = str(err.value)
        assert f"prefill worker prefill-b cannot pair with decode worker decode-a: {what} differs" in message
        assert "decode-a: model SmolLM2-135M, engine pdmesh, KV 30 layers x 3 heads x 64 float32" in message
    assert "prefill-b" not in registry.workers
    registry.workers["decode-a"].last_heartbeat -= 10  # a dead peer does not block anyone
    registry.register("prefill-b", "prefill", "127.0.0.1:3", 1, WorkerLoad(),
                      pairing=Pairing("SmolLM2-135M", "echo", fp32.layout))


def test_router_pairs_only_workers_that_can_hand_kv_to_each_other():
    from pdmesh.scheduler.pairing import Pairing

    native, vllm = Pairing("SmolLM2-135M", "pdmesh"), Pairing("SmolLM2-135M", "vllm")
    registry = WorkerRegistry(heartbeat_timeout_s=3.0)
    registry.register("p-native", "prefill", "127.0.0.1:1001", 1, WorkerLoad(), pairing=native)
    registry.register("d-native", "decode", "127.0.0.1:1003", 1, WorkerLoad(), pairing=native)
    # vLLM workers that joined while the native ones were silent (registration only sees live peers).
    registry.workers["p-native"].last_heartbeat -= 60
    registry.workers["d-native"].last_heartbeat -= 60
    registry.register("p-vllm", "prefill", "127.0.0.1:1002", 1, WorkerLoad(queued_prompt_tokens=500), pairing=vllm)
    registry.register("d-vllm", "decode", "127.0.0.1:1004", 1, WorkerLoad(), pairing=vllm)
    registry.heartbeat("p-native", WorkerLoad(queued_prompt_tokens=0))
    router = Router(registry)
    d_vllm, d_native = registry.workers["d-vllm"], registry.workers["d-native"]
    assert router.pick_prefill(d_vllm).worker_id == "p-vllm"  # though more loaded
    assert router.pick_prefill_for(100, 64, d_vllm).worker_id == "p-vllm"
    assert router.pick_prefill(d_native).worker_id == "p-native"
    assert router.prefill_fallbacks(registry.workers["p-vllm"]) == []
    registry.workers["p-vllm"].last_heartbeat -= 60
    assert router.pick_prefill_for(100, 64, d_vllm) is None  # prefilled on the decode worker, never crossed
    with pytest.raises(UnavailableError, match="pairs with decode worker d-vllm"):
        router.pick_prefill(d_vllm)
