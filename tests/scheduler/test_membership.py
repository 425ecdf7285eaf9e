"""Worker membership without sockets: breaker thresholds, heartbeat settlement of assignments."""

from __future__ import annotations

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


def test_a_worker_of_another_engine_kind_is_refused_naming_both_sides():
    import pytest

    from pdmesh.errors import FailedPreconditionError

    registry = WorkerRegistry(heartbeat_timeout_s=3.0)
    registry.register("d1", "decode", "127.0.0.1:1001", 1, WorkerLoad(), engine_kind="vllm")
    registry.register("p1", "prefill", "127.0.0.1:1002", 1, WorkerLoad(), engine_kind="vllm")
    with pytest.raises(FailedPreconditionError) as refused:
        registry.register("p2", "prefill", "127.0.0.1:1003", 1, WorkerLoad(), engine_kind="pdmesh")
    message = str(refused.value)
    assert "prefill worker p2 runs the pdmesh engine" in message and "worker d1 runs the vllm engine" in message
    assert "p2" not in registry.workers
    registry.register("p1", "prefill", "127.0.0.1:1002", 1, WorkerLoad(), engine_kind="vllm")  # re-registration
    registry.register("old", "prefill", "127.0.0.1:1004", 1, WorkerLoad())  # reports no kind: pairs with any


def test_router_pairs_only_workers_of_one_engine_kind():
    registry = WorkerRegistry(heartbeat_timeout_s=3.0)
    registry.register("p-native", "prefill", "127.0.0.1:1001", 1, WorkerLoad(queued_prompt_tokens=0),
                      engine_kind="pdmesh")
    # A vllm worker that joined while the native one was down (registration only sees healthy workers).
    registry.workers["p-native"].last_heartbeat -= 60
    registry.register("p-vllm", "prefill", "127.0.0.1:1002", 1, WorkerLoad(queued_prompt_tokens=500),
                      engine_kind="vllm")
    registry.heartbeat("p-native", WorkerLoad(queued_prompt_tokens=0))
    router = Router(registry)
    assert router.pick_prefill(engine_kind="vllm").worker_id == "p-vllm"  # though more loaded
    assert router.pick_prefill(engine_kind="pdmesh").worker_id == "p-native"
    assert router.prefill_fallbacks(registry.workers["p-vllm"]) == []
