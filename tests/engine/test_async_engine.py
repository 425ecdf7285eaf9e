"""The engine on its own thread behind the asyncio interface workers call."""

from __future__ import annotations

import asyncio

import pytest

from pdmesh.engine.async_engine import AsyncEngine
from pdmesh.engine.sampling_params import SamplingParams
from pdmesh.engine.sequence import EngineRequest
from pdmesh.errors import InvalidRequestError
from support.tiny_model import run_to_end


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


@pytest.fixture
def async_engine(make_engine):
    engine = AsyncEngine(make_engine())
    yield engine
    engine.stop()


def test_streams_tokens_as_they_come_and_equals_sync_engine(async_engine, make_engine):
    async def main():
        outputs = [o async for o in async_engine.generate(EngineRequest("a", [5, 6, 7], greedy(10)))]
        return outputs
    outputs = asyncio.run(main())
    assert sum(len(o.token_ids) for o in outputs) == 10 and all(o.token_ids for o in outputs)
    assert outputs[-1].finish_reason == "length" and not any(o.finished for o in outputs[:-1])
    sync = make_engine()
    sync.add_request(EngineRequest("a", [5, 6, 7], greedy(10)))
    assert [t for o in outputs for t in o.token_ids] == run_to_end(sync)["a"]


def test_a_slow_reader_gets_the_tokens_it_missed_in_one_output(async_engine, make_engine):
    async def main():
        outputs = []
        async for output in async_engine.generate(EngineRequest("slow", [5, 6, 7], greedy(10))):
            outputs.append(output)
            if len(outputs) == 1:
                await asyncio.sleep(1.0)  # the engine runs on; its tokens queue up meanwhile
        return outputs
    outputs = asyncio.run(main())
    assert len(outputs) < 10 and max(len(o.token_ids) for o in outputs) > 1  # coalesced
    assert outputs[0].queue_s is not None and outputs[-1].finish_reason == "length"
    sync = make_engine()
    sync.add_request(EngineRequest("slow", [5, 6, 7], greedy(10)))
    assert [t for o in outputs for t in o.token_ids] == run_to_end(sync)["slow"]


def test_concurrent_streams_and_cancel_frees_blocks_at_once(async_engine):
    engine = async_engine.engine

    async def consume(request_id: str, n: int, stop_after: int | None):
        got = []
        async for out in async_engine.generate(EngineRequest(request_id, [9, 10, 11], greedy(n))):
            got += out.token_ids
            if stop_after is not None and len(got) >= stop_after:
                break  # leaving the loop early aborts the request
        return got

    async def main():
        return await asyncio.gather(consume("full", 30, None), consume("cut", 200, 3))
    full, cut = asyncio.run(main())
    assert len(full) == 30 and len(cut) == 3
    deadline = 50
    while engine.num_free_blocks != engine.num_total_blocks and deadline:
        asyncio.run(asyncio.sleep(0.01))
        deadline -= 1
    assert engine.num_free_blocks == engine.num_total_blocks
    assert not engine.has_work()


def test_task_cancellation_aborts(async_engine):
    engine = async_engine.engine

    async def main():
        async def stream():
            async for _ in async_engine.generate(EngineRequest("c", [3, 4], greedy(300))):
                pass
        task = asyncio.create_task(stream())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if engine.num_free_blocks == engine.num_total_blocks:
                break
            await asyncio.sleep(0.01)
    asyncio.run(main())
    assert engine.num_free_blocks == engine.num_total_blocks


def test_prefill_then_export_and_release(async_engine):
    async def main():
        return await async_engine.prefill(EngineRequest("p", [5, 6, 7, 8], greedy(4)))
    output = asyncio.run(main())
    assert output.finish_reason == "prefilled" and len(output.token_ids) == 1
    kv = async_engine.export_kv("p")
    assert kv.shape[2] == 4
    assert async_engine.release_held("p")
    assert async_engine.engine.num_free_blocks == async_engine.engine.num_total_blocks


def test_bad_request_raises_before_streaming(async_engine):
    async def main():
        async for _ in async_engine.generate(EngineRequest("bad", [], greedy(4))):
            pass
    with pytest.raises(InvalidRequestError):
        asyncio.run(main())
