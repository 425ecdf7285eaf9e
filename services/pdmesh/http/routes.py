"""The OpenAI-compatible endpoints: `POST /v1/chat/completions`, `POST /v1/completions`,
`GET /v1/models`, `GET /health`.

A generation goes through the scheduler's `FrontDoor` exactly as gRPC `Generate` does. A refusal
before the first token (bad field, unknown key, full queue, no worker) is an HTTP status with an
OpenAI error body. A stream's headers go out with its first token, so those refusals keep their
status; an error after that is one `data: {"error": ...}` event before `[DONE]`. A client that
disconnects cancels its handler (aiohttp's handler cancellation), which cancels the decode call:
the KV is freed at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import Callable

from aiohttp import web

from pdmesh.errors import InvalidRequestError, PdmeshError
from pdmesh.http.error_response import BodyTooLargeError, error_body, error_response
from pdmesh.http.openai_request import OpenAIRequest, parse_chat, parse_completion
from pdmesh.http.openai_response import CompletionShape, models_list
from pdmesh.http.sse import EventStream
from pdmesh.scheduler.front_door import ClientStalledError, Credentials, FrontDoor, RequestRun
from pdmesh.scheduler.registry import WorkerRegistry

log = logging.getLogger(__name__)
REQUEST_ID_HEADER = "X-Request-Id"


class OpenAIRoutes:
    def __init__(self, front_door: FrontDoor, registry: WorkerRegistry, max_request_bytes: int):
        self.front_door = front_door
        self.registry = registry
        self.max_request_bytes = max_request_bytes
        self.started = int(time.time())

    def add_to(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_chat)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_completion)

    async def models(self, request: web.Request) -> web.Response:
        try:
            self.front_door.authenticate(_credentials(request))
        except PdmeshError as exc:
            return error_response(exc)
        return web.json_response(models_list(self.front_door.model, self.started))

    async def health(self, request: web.Request) -> web.Response:
        """200 while both roles have a routable worker (as gRPC health says SERVING), else 503."""
        if self.front_door.accepting and self.registry.can_serve():
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "unavailable"}, status=503, headers={"Retry-After": "1"})

    async def _generate(self, request: web.Request, parse: Callable[..., OpenAIRequest]) -> web.StreamResponse:
        credentials = _credentials(request)
        stream = EventStream(request, self.front_door.send)
        openai: OpenAIRequest | None = None
        try:
            self.front_door.authenticate(credentials)  # an unknown key hears 401 before anything about its body
            openai = self._parse(parse, await self._body(request), request.headers.get(REQUEST_ID_HEADER, ""))
            async with self.front_door.open(openai.generate, credentials) as run:
                shape = CompletionShape(openai.chat, run.spec.request_id, self.front_door.model.name)
                if openai.stream:
                    await self._stream(stream, run, shape, openai.include_usage)
                    return stream.response
                return await self._whole(run, shape)
        except ClientStalledError:
            if request.transport is not None:  # it reads nothing: drop the connection
                request.transport.close()
            return stream.response
        except Exception as exc:  # every failure is an answer; the server lives on
            if not isinstance(exc, PdmeshError):
                log.error("%s failed", request.path, exc_info=exc)
            param = _param(exc, openai)
            if stream.response is None:
                return error_response(exc, param)
            with contextlib.suppress(ConnectionError, PdmeshError):
                await stream.event(error_body(exc, param))
                await stream.close()
            return stream.response

    def _parse(self, parse: Callable[..., OpenAIRequest], body: object, request_id: str) -> OpenAIRequest:
        try:
            return parse(body, request_id)
        except PdmeshError:
            self.front_door.count_invalid()
            raise

    async def _body(self, request: web.Request) -> object:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            self.front_door.count_invalid()
            raise BodyTooLargeError(f"the request body is over {self.max_request_bytes:,} bytes "
                                    "(--max-request-bytes)", "body") from None
        try:
            return json.loads(raw)
        except ValueError as exc:
            self.front_door.count_invalid()
            raise InvalidRequestError(
                f"the request body is not JSON ({len(raw):,} bytes; {exc})", "body") from None

    async def _whole(self, run: RequestRun, shape: CompletionShape) -> web.Response:
        texts, last = [], None
        async for delta in run.deltas():
            texts.append(delta.text)
            last = delta
        return web.json_response(shape.whole("".join(texts), last))

    async def _stream(self, stream: EventStream, run: RequestRun, shape: CompletionShape,
                      include_usage: bool) -> None:
        async with contextlib.aclosing(run.deltas()) as deltas:
            async for delta in deltas:
                if stream.response is None:  # headers with the first token: refusals before it keep their status
                    await stream.open()
                    if shape.chat:
                        await stream.event(_with_usage(shape.role_chunk(), include_usage))
                if delta.text:
                    await stream.event(_with_usage(shape.chunk(delta.text), include_usage))
                if delta.finish_reason:
                    await stream.event(_with_usage(shape.chunk(None, delta.finish_reason), include_usage))
                    if include_usage:
                        await stream.event(shape.usage_chunk(delta))
        await stream.close()


def _with_usage(chunk: dict, include_usage: bool) -> dict:
    """With stream_options.include_usage every chunk carries `usage: null` but the last (OpenAI's shape)."""
    if include_usage:
        chunk["usage"] = None
    return chunk


def _credentials(request: web.Request) -> Credentials:
    """HTTP callers present API keys only; the mesh's own calls (cluster secret) use gRPC."""
    return Credentials(request.headers.get("Authorization"))


def _param(exc: BaseException, openai: OpenAIRequest | None) -> str | None:
    """The request field to name: max_completion_tokens when that is what set max_tokens."""
    field = getattr(exc, "field", None)
    if field == "max_tokens" and openai is not None:
        return openai.max_tokens_field
    return field or None
