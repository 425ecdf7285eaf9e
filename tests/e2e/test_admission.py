"""Admission control end to end on the echo mesh (see conftest: 64 decode KV blocks, a queue of 8)."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request

import grpc

from pdmesh.client import AsyncPdmeshClient
from pdmesh.rpc.errors import rich_details

def client(mesh, key="k-free", **kwargs) -> AsyncPdmeshClient:
    return AsyncPdmeshClient(mesh.address, api_key=key, retries=0, **kwargs)


async def run(mesh, key="k-free", tokens=22, priority=0, timeout_s=30.0, log=None, name=None):
    """One request: ("OK", chunks) or (status code, error), plus when its first chunk came."""
    async with client(mesh, key) as c:
        chunks = []
        try:
            async for chunk in c.stream(prompt_token_ids=list(range(100, 110)), max_tokens=tokens,
                                        priority=priority, timeout_s=timeout_s):
                if not chunks and log is not None:
                    log.append(name)
                chunks.append(chunk)
            return "OK", chunks
        except grpc.RpcError as exc:
            return exc.code().name, exc


async def occupy_kv(mesh, count=4):
    """Start `count` long requests (16 blocks each: the whole decode KV) and wait until they run."""
    tasks = [asyncio.create_task(run(mesh, tokens=246)) for _ in range(count)]
    await wait_status(mesh, lambda s: sum(w.running for w in s.workers if w.role == "decode") >= count,
                      f"{count} long requests running")
    return tasks


async def wait_status(mesh, predicate, what: str, timeout_s: float = 30.0):
    """Poll the scheduler's cluster status (off the event loop) until predicate(status) holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        with mesh.client(api_key=mesh.admin_key) as c:
            status = await asyncio.to_thread(c.cluster_status)
        if predicate(status):
            return status
        assert time.monotonic() < deadline, f"{what} not seen in {timeout_s}s: {status}"
        await asyncio.sleep(0.05)


async def wait_queued(mesh, count: int):
    """Wait until the scheduler's admission queue holds `count` requests."""
    await wait_status(mesh, lambda s: s.queued >= count, f"{count} queued requests")


def wait_idle(mesh):
    workers = mesh.wait_all_blocks_free(timeout_s=30)
    assert all(w.kv_blocks_free == w.kv_blocks_total for w in workers), workers


def test_burst_beyond_capacity(echo_mesh):
    async def burst():
        sent = time.monotonic()

        async def timed():
            result = await run(echo_mesh)
            return result, time.monotonic() - sent
        return await asyncio.gather(*(timed() for _ in range(64)))
    results = asyncio.run(burst())
    codes = [code for (code, _), _ in results]
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert codes.count("OK") >= 32 and codes.count("RESOURCE_EXHAUSTED") >= 1
    for (code, detail), elapsed in results:
        if code == "OK":
            assert detail[-1].completion_tokens == 22 and detail[-1].finish_reason == "length"
        else:
            assert elapsed < 1.0
            assert "max-queued-requests is 8" in detail.details()
            assert rich_details(detail)["retry_delay_s"] > 0
    wait_idle(echo_mesh)


def test_priority_orders_the_queue_and_displaces_when_full(echo_mesh):
    async def scenario():
        long = await occupy_kv(echo_mesh)
        order = []
        lows = [asyncio.create_task(run(echo_mesh, tokens=5, log=order, name=f"low{i}")) for i in range(2)]
        await wait_queued(echo_mesh, 2)
        high = asyncio.create_task(run(echo_mesh, tokens=5, priority=5, log=order, name="high"))
        await wait_queued(echo_mesh, 3)
        fillers = [asyncio.create_task(run(echo_mesh, tokens=5)) for _ in range(5)]
        await wait_queued(echo_mesh, 8)  # the queue is full
        urgent = await asyncio.wait_for(asyncio.shield(asyncio.create_task(
            run(echo_mesh, tokens=5, priority=9))), 30)
        results = await asyncio.gather(*long, *lows, high, *fillers)
        return order, urgent, results
    order, urgent, results = asyncio.run(scenario())
    assert urgent[0] == "OK"
    assert order[0] == "high" and sorted(order[1:]) == ["low0", "low1"]  # queued later, ran first
    displaced = [r for r in results if r[0] != "OK"]
    assert len(displaced) == 1 and displaced[0][0] == "RESOURCE_EXHAUSTED"
    assert "displaced from a full queue by a priority 9 request" in displaced[0][1].details()
    wait_idle(echo_mesh)


def test_tenants_share_the_queue_fairly(echo_mesh):
    async def scenario():
        long = await occupy_kv(echo_mesh)
        order = []
        flood = [asyncio.create_task(run(echo_mesh, "k-flood", tokens=246, log=order, name="flood"))
                 for _ in range(6)]
        await wait_queued(echo_mesh, 6)
        small = [asyncio.create_task(run(echo_mesh, "k-small", tokens=246, log=order, name="small"))
                 for _ in range(2)]
        results = await asyncio.gather(*long, *flood, *small)
        return order, results
    order, results = asyncio.run(scenario())
    assert all(code == "OK" for code, _ in results)
    assert order[:4].count("small") == 2, order  # not behind all six of the flood
    wait_idle(echo_mesh)


def test_tenant_keys_and_rate_limits(echo_mesh):
    async def scenario():
        burst = await asyncio.gather(*(run(echo_mesh, "k-acme", tokens=1) for _ in range(4)))
        return burst, [await run(echo_mesh, key, tokens=1) for key in ("wrong-key", None)]
    burst, strangers = asyncio.run(scenario())
    assert sorted(code for code, _ in burst) == ["OK", "OK", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"]
    assert [code for code, _ in strangers] == ["UNAUTHENTICATED", "UNAUTHENTICATED"]
    limited = next(detail for code, detail in burst if code != "OK")
    assert "tenant 'acme' is over its rate of 0.5 requests/s" in limited.details()
    assert 0 < rich_details(limited)["retry_delay_s"] <= 2.1  # one request at 0.5/s
    wait_idle(echo_mesh)


def test_deadlines_in_the_queue_and_mid_stream_free_every_block(echo_mesh):
    async def scenario():
        long = await occupy_kv(echo_mesh)
        queued = await run(echo_mesh, tokens=5, timeout_s=0.5)
        await asyncio.gather(*long)
        mid = await run(echo_mesh, tokens=200, timeout_s=1.0)
        return queued, mid
    queued, mid = asyncio.run(scenario())
    assert queued[0] == "DEADLINE_EXCEEDED", queued
    assert mid[0] == "DEADLINE_EXCEEDED", mid
    wait_idle(echo_mesh)


def test_early_rejection_when_the_predicted_start_is_past_the_deadline(echo_mesh):
    async def scenario():
        long = await occupy_kv(echo_mesh)
        behind = [asyncio.create_task(run(echo_mesh, tokens=246)) for _ in range(4)]
        await wait_queued(echo_mesh, 4)
        started = time.monotonic()
        hopeless = await run(echo_mesh, tokens=5, timeout_s=2.0)
        elapsed = time.monotonic() - started
        await asyncio.gather(*long, *behind)
        return hopeless, elapsed
    hopeless, elapsed = asyncio.run(scenario())
    assert hopeless[0] == "DEADLINE_EXCEEDED"
    message = hopeless[1].details()
    assert "predicted start" in message or "passed while the request was queued" in message
    wait_idle(echo_mesh)


def test_metrics_count_rejections_by_reason(echo_mesh):
    """Runs after the tests above: their refusals show up on the scheduler's /metrics by reason."""
    log = echo_mesh.log_path.read_text()
    assert "max-queued-requests 8" in log  # limits printed at start
    port = re.search(r"pdmesh scheduler serving .* metrics :(\d+)\)", log).group(1)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    counts = {m.group(1): float(m.group(2))
              for m in re.finditer(r'pdmesh_rejections_total\{reason="(\w+)"\} ([\d.e+]+)', body)}
    for reason in ("queue_full", "displaced", "rate_limited", "unauthenticated", "deadline"):
        assert counts.get(reason, 0) >= 1, (reason, counts)
    assert "pdmesh_queue_time_seconds_bucket" in body and "pdmesh_queue_depth" in body
    assert float(re.search(r"pdmesh_rejected_tokens_total ([\d.e+]+)", body).group(1)) > 0
