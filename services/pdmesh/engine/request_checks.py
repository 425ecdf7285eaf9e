"""Checks every engine makes of a request before it can run, with the same messages everywhere."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import AsyncIterator, Callable

from pdmesh.engine.sequence import EngineOutput
from pdmesh.errors import InvalidRequestError


def check_prompt_ids(prompt_ids: list[int], vocab_size: int) -> None:
    """A prompt must be non-empty and every token id inside the vocabulary."""
    if not prompt_ids:
        raise InvalidRequestError("prompt is empty", "prompt")
    bad = next((t for t in prompt_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(f"token id {bad} is outside the vocabulary [0, {vocab_size})", "prompt_token_ids")


async def stream_outputs(queue: asyncio.Queue, streams: dict, request_id: str,
                         abort: Callable[[str], None]) -> AsyncIterator[EngineOutput]:
    """Yield a request's outputs from `queue` until one is final; then, or when the caller leaves
    early, drop it from the engine's open `streams` and `abort` it if it did not finish.
    Outputs that queued up while the caller was busy (writing the last one out) come as one, so
    a slow reader gets fewer, larger messages instead of falling further behind."""
    finished = False
    try:
        while not finished:
            output = await queue.get()
            while not output.finished and not queue.empty():
                output = coalesce(output, queue.get_nowait())
            finished = output.finished
            yield output
    finally:
        streams.pop(request_id, None)
        if not finished:
            abort(request_id)


def coalesce(first: EngineOutput, then: EngineOutput) -> EngineOutput:
    """One output carrying the tokens of both; `then`'s ending (finish, error, handle), `first`'s
    queue time and cached prompt tokens."""
    return dataclasses.replace(then, token_ids=first.token_ids + then.token_ids,
                               queue_s=first.queue_s if first.queue_s is not None else then.queue_s,
                               num_cached_tokens=first.num_cached_tokens or then.num_cached_tokens)
