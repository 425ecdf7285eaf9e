"""A small Python client for backend services: sync and asyncio, streaming, typed results.

    from pdmesh.client import PdmeshClient
    with PdmeshClient("127.0.0.1:50051") as client:
        for chunk in client.stream(messages=[{"role": "user", "content": "Hi!"}], max_tokens=32):
            print(chunk.text, end="", flush=True)
        print(client.generate(prompt="1, 2, 3,", max_tokens=8).text)

Every call takes a deadline (timeout_s). A call that fails with UNAVAILABLE before its first chunk
is retried with exponential backoff (tenacity); once text has arrived it is never retried, so a
stream is never duplicated.

A failed call raises a typed error (`pdmesh.client_errors`, importable from here), each a
`PdmeshClientError` with the server's details decoded:

    from pdmesh.client import InvalidRequestError, RetryLaterError
    try:
        client.generate(prompt=long_text, max_tokens=64)
    except InvalidRequestError as exc:      # INVALID_ARGUMENT
        print(exc.field, exc.limit, exc.value)   # prompt 8191 9214
    except RetryLaterError as exc:          # RESOURCE_EXHAUSTED (queue full, rate limit) or UNAVAILABLE
        time.sleep(exc.retry_after_s or 1)

InvalidRequestError (field, limit, value), NotFoundError (unknown model), ResourceExhaustedError
and UnavailableError (both RetryLaterError: retry_after_s), UnauthenticatedError,
PermissionDeniedError, DeadlineExceededError; any other status is a plain PdmeshClientError.
Each is also a grpc.RpcError (`code()`, `details()` and `trailing_metadata()` are the call's).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import AsyncIterator, Iterator

import grpc
from tenacity import (AsyncRetrying, Retrying, retry_if_exception, stop_after_attempt,
                      wait_exponential)

from pdmesh.client_errors import (DeadlineExceededError, InvalidRequestError, NotFoundError,  # noqa: F401
                                  PdmeshClientError, PermissionDeniedError, ResourceExhaustedError, RetryLaterError,
                                  UnauthenticatedError, UnavailableError, typed)
from pdmesh.gen.pdmesh.v1 import scheduler_pb2, scheduler_pb2_grpc
from pdmesh.rpc import cluster_auth


@dataclass(frozen=True, slots=True)
class Route:
    """The path an answer took: which workers made it and what was done again on the way."""

    prefill_worker_id: str  # "" when the decode worker prefilled the prompt itself
    decode_worker_ids: tuple[str, ...]  # more than one after a resume
    prefill_fallbacks: int
    resumes: int
    kv_recomputes: int


@dataclass(frozen=True, slots=True)
class Chunk:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "" until the last chunk
    prompt_tokens: int  # set on the last chunk
    completion_tokens: int  # set on the last chunk
    request_id: str
    route: Route | None = None  # set on the last chunk


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    request_id: str
    route: Route | None = None


def build_request(prompt: str | None = None, messages: list[dict[str, str]] | None = None,
                  prompt_token_ids: list[int] | None = None, **params) -> scheduler_pb2.GenerateRequest:
    """params: max_tokens, temperature, top_p, top_k, seed, stop, ignore_eos, priority, request_id, model."""
    request = scheduler_pb2.GenerateRequest(prompt=prompt or "", prompt_token_ids=prompt_token_ids or [],
                                            messages=[scheduler_pb2.ChatMessage(**m) for m in messages or []])
    for name, value in params.items():
        if value is None:
            continue
        if name == "stop":
            request.stop.extend([value] if isinstance(value, str) else value)
        else:
            setattr(request, name, value)
    return request


def _route(pb: scheduler_pb2.Route) -> Route:
    return Route(pb.prefill_worker_id, tuple(pb.decode_worker_ids), pb.prefill_fallbacks, pb.resumes,
                 pb.kv_recomputes)


def _chunk(pb: scheduler_pb2.GenerateResponse) -> Chunk:
    return Chunk(pb.text, tuple(pb.token_ids), pb.finish_reason, pb.usage.prompt_tokens,
                 pb.usage.completion_tokens, pb.request_id, _route(pb.route) if pb.HasField("route") else None)


def join(chunks: list[Chunk]) -> Completion:
    last = chunks[-1]
    return Completion("".join(c.text for c in chunks), tuple(t for c in chunks for t in c.token_ids),
                      last.finish_reason, last.prompt_tokens, last.completion_tokens, last.request_id, last.route)


@contextlib.contextmanager
def _typed_errors() -> Iterator[None]:
    """A failed call's grpc.RpcError, raised as its typed PdmeshClientError."""
    try:
        yield
    except PdmeshClientError:
        raise
    except grpc.RpcError as exc:
        raise typed(exc) from exc


def _unavailable(exc: BaseException) -> bool:
    return isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.UNAVAILABLE


def _tls(tls_ca: str | None) -> grpc.ChannelCredentials | None:
    if tls_ca is None:
        return None
    with open(tls_ca, "rb") as f:
        return grpc.ssl_channel_credentials(f.read())


class _Settings:
    def __init__(self, address: str, timeout_s: float, retries: int, api_key: str | None, cluster_secret: str = ""):
        self.address = address
        self.timeout_s = timeout_s
        self.metadata = ((("authorization", f"Bearer {api_key}"),) if api_key else ()) + cluster_auth.metadata(
            cluster_secret)
        self.retry = dict(retry=retry_if_exception(_unavailable), stop=stop_after_attempt(retries + 1),
                          wait=wait_exponential(multiplier=0.1, max=2.0), reraise=True)


class PdmeshClient(_Settings):
    """Blocking client; one gRPC channel, thread-safe."""

    def __init__(self, address: str = "127.0.0.1:50051", timeout_s: float = 120.0, retries: int = 3,
                 api_key: str | None = None, tls_ca: str | None = None, cluster_secret: str = ""):
        """tls_ca: a CA certificate (PEM file) to speak TLS to a client port that has it;
        cluster_secret: call as the mesh itself (the metrics exporter does, for cluster status)."""
        super().__init__(address, timeout_s, retries, api_key, cluster_secret)
        tls = _tls(tls_ca)
        self.channel = grpc.secure_channel(address, tls) if tls else grpc.insecure_channel(address)
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)

    def stream(self, prompt: str | None = None, *, timeout_s: float | None = None, **kwargs) -> Iterator[Chunk]:
        request = build_request(prompt, **kwargs)
        timeout = timeout_s or self.timeout_s
        with _typed_errors():
            for attempt in Retrying(**self.retry):
                with attempt:
                    responses = self.stub.Generate(request, timeout=timeout, metadata=self.metadata)
                    first = next(responses)  # UNAVAILABLE before any text: retried
            yield _chunk(first)
            for response in responses:
                yield _chunk(response)

    def generate(self, prompt: str | None = None, **kwargs) -> Completion:
        return join(list(self.stream(prompt, **kwargs)))

    def count_tokens(self, prompt: str | None = None, messages: list[dict[str, str]] | None = None) -> list[int]:
        request = scheduler_pb2.CountTokensRequest(
            prompt=prompt or "", messages=[scheduler_pb2.ChatMessage(**m) for m in messages or []])
        with _typed_errors():
            return list(self.stub.CountTokens(request, timeout=self.timeout_s, metadata=self.metadata).token_ids)

    def list_models(self) -> list[scheduler_pb2.Model]:
        with _typed_errors():
            return list(self.stub.ListModels(scheduler_pb2.ListModelsRequest(), timeout=self.timeout_s,
                                             metadata=self.metadata).models)

    def cluster_status(self) -> scheduler_pb2.ClusterStatus:
        with _typed_errors():
            return self.stub.GetClusterStatus(scheduler_pb2.GetClusterStatusRequest(), timeout=self.timeout_s,
                                              metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "PdmeshClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncPdmeshClient(_Settings):
    """asyncio client (grpc.aio); create and use it inside one event loop."""

    def __init__(self, address: str = "127.0.0.1:50051", timeout_s: float = 120.0, retries: int = 3,
                 api_key: str | None = None, tls_ca: str | None = None, cluster_secret: str = ""):
        super().__init__(address, timeout_s, retries, api_key, cluster_secret)
        tls = _tls(tls_ca)
        self.channel = grpc.aio.secure_channel(address, tls) if tls else grpc.aio.insecure_channel(address)
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)

    async def stream(self, prompt: str | None = None, *, timeout_s: float | None = None,
                     **kwargs) -> AsyncIterator[Chunk]:
        request = build_request(prompt, **kwargs)
        timeout = timeout_s or self.timeout_s
        with _typed_errors():
            async for attempt in AsyncRetrying(**self.retry):
                with attempt:
                    call = self.stub.Generate(request, timeout=timeout, metadata=self.metadata)
                    first = await call.read()
            response = first
            while response is not grpc.aio.EOF:  # read() only: grpc.aio forbids mixing it with async for
                yield _chunk(response)
                response = await call.read()

    async def generate(self, prompt: str | None = None, **kwargs) -> Completion:
        return join([chunk async for chunk in self.stream(prompt, **kwargs)])

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncPdmeshClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
