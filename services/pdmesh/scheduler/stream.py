"""One client request through the mesh: call the decode worker, detokenize, stop strings, and
carry on elsewhere when a worker is lost.

The scheduler detokenizes incrementally (text deltas never split a character) and applies stop
strings itself, so workers deal in token ids only. If the decode worker fails (crash, hang
caught by keepalive, drain) the stream moves to another decode worker: before the first token
that is a plain retry; after it, the prompt plus the tokens already sent is prefilled there and
the stream resumes from the next token (seeded sampling continues from the same output index).
The client sees one stream either way. Leaving early (stop string, cancel, deadline) cancels the
decode call, which aborts the request on the workers and frees its KV.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import grpc

from pdmesh import metrics, tracing
from pdmesh.engine.detokenizer import IncrementalDetokenizer
from pdmesh.errors import (DeadlineError, InvalidRequestError, PdmeshError, ResourceExhaustedError,
                           UnavailableError)
from pdmesh.gen.pdmesh.v1 import decode_pb2, decode_pb2_grpc
from pdmesh.rpc.channels import internal_channel
from pdmesh.rpc.cluster_auth import ClusterCredentials
from pdmesh.scheduler.prefix_affinity import PromptBlocks
from pdmesh.scheduler.registry import WorkerRegistry
from pdmesh.scheduler.request_spec import GenerationSpec, ModelInfo
from pdmesh.scheduler.router import Assignment, Router
from pdmesh.scheduler.stop_strings import StopStringMatcher
from pdmesh.worker.convert import sampling_to_pb

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 4  # decode workers one request may try
REASSIGN_WAIT_S = 10.0  # how long a moved request waits for room on another decode worker
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


@dataclass(slots=True)
class Route:
    """The path of one answer through the mesh (GenerateResponse.route on the last chunk)."""

    prefill_worker_id: str = ""  # of the last decode worker's prefill; empty: it prefilled locally
    decode_worker_ids: list[str] = field(default_factory=list)
    prefill_fallbacks: int = 0
    kv_recomputes: int = 0

    @property
    def resumes(self) -> int:
        return max(0, len(self.decode_worker_ids) - 1)

    def add_prefill(self, info) -> None:
        """Fold in a decode worker's PrefillInfo (its first chunk)."""
        self.prefill_worker_id = info.prefill_worker_id
        self.prefill_fallbacks += info.prefill_fallbacks
        self.kv_recomputes += info.kv_recomputes


@dataclass(slots=True)
class Delta:
    """A piece of the client's stream; finish_reason, usage and route only on the last one."""

    text: str
    token_ids: list[int]
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    route: Route | None = None


@dataclass
class _Progress:
    """What the client has been sent so far; survives a move to another decode worker."""

    detokenizer: IncrementalDetokenizer
    stops: StopStringMatcher
    generated: list[int] = field(default_factory=list)
    last_chunk: float | None = None
    failed_decode: set[str] = field(default_factory=set)
    route: Route = field(default_factory=Route)


class WorkerClients:
    """One channel and DecodeWorker stub per address, reused across requests."""

    def __init__(self, credentials: ClusterCredentials):
        self.credentials = credentials
        self._stubs: dict[str, decode_pb2_grpc.DecodeWorkerStub] = {}

    def decode(self, address: str) -> decode_pb2_grpc.DecodeWorkerStub:
        if address not in self._stubs:
            self._stubs[address] = decode_pb2_grpc.DecodeWorkerStub(internal_channel(address, self.credentials))
        return self._stubs[address]


class MeshStream:
    def __init__(self, model: ModelInfo, registry: WorkerRegistry, router: Router, clients: WorkerClients,
                 local_prefill_threshold: int):
        self.model = model
        self.registry = registry
        self.router = router
        self.clients = clients
        self.local_prefill_threshold = local_prefill_threshold

    async def run(self, spec: GenerationSpec, assignment: Assignment, arrived: float,
                  timeout_s: float | None) -> AsyncIterator[Delta]:
        """Stream one admitted request, starting on its assignment. arrived: perf_counter()."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        progress = _Progress(IncrementalDetokenizer(self.model.tokenizer, skip_special_tokens=True),
                             StopStringMatcher(list(spec.stop)))
        for attempt in range(MAX_ATTEMPTS):
            try:
                async for delta in self._attempt(spec, assignment, attempt, progress, arrived, deadline):
                    yield delta
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE or attempt + 1 == MAX_ATTEMPTS:
                    raise worker_error(exc, assignment.decode.address) from exc
                self._count_failure(assignment, exc, progress)
            assignment = await self._reassign(spec, progress, deadline)

    async def _attempt(self, spec: GenerationSpec, assignment: Assignment, attempt: int, progress: _Progress,
                       arrived: float, deadline: float | None) -> AsyncIterator[Delta]:
        offset = len(progress.generated)
        request = decode_pb2.DecodeRequest(
            request_id=spec.request_id if attempt == 0 else f"{spec.request_id}.{attempt}",
            prompt_token_ids=spec.prompt_ids + progress.generated, output_offset=offset,
            sampling=sampling_to_pb(dataclasses.replace(spec.params, max_tokens=spec.params.max_tokens - offset)))
        if assignment.prefill is not None:
            request.prefill_address = assignment.prefill.address
            request.fallback_prefill_addresses.extend(self.router.prefill_fallbacks(assignment.prefill))
        call = self.clients.decode(assignment.decode.address).Generate(request, timeout=_left(deadline),
                                                                       metadata=tracing.inject(
                                                                           self.clients.credentials.metadata()))
        progress.route.decode_worker_ids.append(assignment.decode.worker_id)
        started = False
        try:
            async for chunk in call:
                if not started:
                    started = True
                    assignment.start(time.monotonic())
                delta = self._delta(spec, chunk, progress, arrived)
                yield delta
                if delta.finish_reason:
                    return
        finally:
            if not started:  # never ran there: stop counting it against that worker now
                assignment.settle()
            call.cancel()
        raise UnavailableError(f"decode worker {assignment.decode.address} ended the stream without finishing it")

    def _delta(self, spec: GenerationSpec, chunk, progress: _Progress, arrived: float) -> Delta:
        now = time.perf_counter()
        if progress.last_chunk is None:
            metrics.TIME_TO_FIRST_TOKEN.observe(now - arrived)
        else:
            metrics.INTER_TOKEN_LATENCY.observe(now - progress.last_chunk)
        progress.last_chunk = now
        if chunk.HasField("prefill"):
            progress.route.add_prefill(chunk.prefill)
        token_ids = list(chunk.token_ids)
        progress.generated += token_ids
        stops = progress.stops
        text = stops.feed(progress.detokenizer.add(token_ids))
        finish = "stop" if stops.stopped else chunk.finish_reason
        if not finish:
            return Delta(text, token_ids)
        if not stops.stopped:
            text += stops.feed(progress.detokenizer.flush()) + stops.flush()
        metrics.E2E_LATENCY.observe(now - arrived)
        metrics.GENERATION_TOKENS.inc(len(progress.generated))
        route = progress.route
        log.debug("request %s route: prefill %s, decode %s, prefill_fallbacks %d, resumes %d, kv_recomputes %d",
                  spec.request_id, route.prefill_worker_id or "local", ",".join(route.decode_worker_ids),
                  route.prefill_fallbacks, route.resumes, route.kv_recomputes)
        return Delta(text, token_ids, finish, len(spec.prompt_ids), len(progress.generated), route)

    def _count_failure(self, assignment: Assignment, exc: grpc.aio.AioRpcError, progress: _Progress) -> None:
        decode = assignment.decode
        progress.failed_decode.add(decode.worker_id)
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            self.registry.report_failure(decode, f"stream failed: {exc.details()}")
        if progress.generated:
            metrics.RESUMED_STREAMS.inc()
        else:
            metrics.RETRIES.labels(role="decode").inc()

    async def _reassign(self, spec: GenerationSpec, progress: _Progress, deadline: float | None) -> Assignment:
        """Another decode worker (and prefill worker) for the rest of the stream; waits for room."""
        prompt_len = len(spec.prompt_ids) + len(progress.generated)
        give_up = time.monotonic() + REASSIGN_WAIT_S
        while True:
            try:
                prompt = PromptBlocks(list(spec.prompt_ids) + list(progress.generated))
                decode = self.router.pick_decode(spec.num_tokens, frozenset(progress.failed_decode), prompt)
                prefill = self.router.pick_prefill_for(prompt_len, self.local_prefill_threshold, decode, prompt)
                return self.router.assign(decode, prefill, prompt_len, spec.num_tokens, prompt)
            except (ResourceExhaustedError, UnavailableError) as exc:
                now = time.monotonic()
                if now > give_up or (deadline is not None and now > deadline):
                    raise UnavailableError(f"request {spec.request_id} lost its decode worker and no other "
                                           f"could take it: {exc}") from exc
                progress.failed_decode.clear()  # a worker that failed earlier may be back
                await asyncio.sleep(0.1)


def _left(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineError("the request's deadline passed")
    return left


def worker_error(exc: grpc.aio.AioRpcError, address: str) -> PdmeshError:
    """A worker's status, re-raised as the matching pdmesh error (so the client sees the same code)."""
    message = f"{exc.details()} (worker {address})"
    code = exc.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequestError(message)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhaustedError(message)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineError(message)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return UnavailableError(message)
    return PdmeshError(f"{code.name}: {message}")
