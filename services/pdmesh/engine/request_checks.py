"""Checks every engine makes of a request before it can run, with the same messages everywhere."""

from __future__ import annotations

import asyncio
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
    early, drop it from the engine's open `streams` and `abort` it if it did not finish."""
    finished = False
    try:
        while not finished:
            output = await queue.get()
            finished = output.finished
            yield output
    finally:
        streams.pop(request_id, None)
        if not finished:
            abort(request_id)
