"""A server-sent event stream (`text/event-stream`) of JSON events, ended by `data: [DONE]`."""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

from aiohttp import web

HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class EventStream:
    def __init__(self, request: web.Request, send: Callable[[Awaitable[None]], Awaitable[None]]):
        """send: awaits one write (the front door's, which cuts off a client that stopped reading)."""
        self.request = request
        self.send = send
        self.response: web.StreamResponse | None = None  # set once the headers are out

    async def open(self) -> None:
        self.response = web.StreamResponse(status=200, headers=HEADERS)
        await self.response.prepare(self.request)

    async def event(self, payload: dict[str, Any]) -> None:
        await self.send(self.response.write(b"data: " + json.dumps(payload, separators=(",", ":")).encode()
                                            + b"\n\n"))

    async def close(self) -> None:
        await self.send(self.response.write(b"data: [DONE]\n\n"))
        await self.response.write_eof()
