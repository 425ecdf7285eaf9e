"""The one path every client request takes, whatever protocol it came in by (gRPC or HTTP):
authenticate, check and tokenize (build_spec), admit, stream through the mesh, finish.

    async with front_door.open(request, credentials, timeout_s) as run:   # refusals raise here
        async for delta in run.deltas():
            ...                                                           # write it to the client

`open` raises a PdmeshError before anything is sent, so each protocol can turn a refusal into
its own status (a gRPC code, an HTTP status); leaving the block, however it is left, gives back
what the request held: unused tokens to its tenant, KV on the workers (the decode call is
cancelled), the running count. Outcomes and refusals are counted the same way for every protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable

from pdmesh import metrics, tracing
from pdmesh.errors import DeadlineError, PdmeshError, ResourceExhaustedError, UnavailableError
from pdmesh.scheduler.admission_control import AdmissionControl
from pdmesh.scheduler.generate_request import GenerateRequest
from pdmesh.scheduler.request_spec import Caps, GenerationSpec, ModelInfo, build_spec
from pdmesh.scheduler.router import Assignment
from pdmesh.scheduler.stream import Delta, MeshStream
from pdmesh.scheduler.tenants import Tenant

# Ways a request ends without an error of its own: the client left (cancelled its call, closed its
# connection) or its task was cancelled.
CLIENT_GONE = (asyncio.CancelledError, GeneratorExit, ConnectionError)


class ClientStalledError(ResourceExhaustedError):
    """The client stopped reading its stream."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a caller presented: an `authorization` value (`Bearer <key>`) and/or the cluster secret."""

    authorization: str | None = None
    cluster_secret: str | None = None


class RequestRun:
    """One admitted request: its spec and its stream of deltas; records how it ended."""

    def __init__(self, spec: GenerationSpec, tenant: Tenant, assignment: Assignment, stream: MeshStream,
                 arrived: float, timeout_s: float | None):
        self.spec = spec
        self.tenant = tenant
        self.outcome = "error"  # a finish_reason, or cancelled / stalled / error
        self.num_generated = 0
        self._assignment = assignment
        self._stream = stream
        self._arrived = arrived
        self._timeout_s = timeout_s
        self._started = False

    async def deltas(self) -> AsyncIterator[Delta]:
        """The request's stream (once); leaving early cancels the worker call, which frees its KV."""
        self._started = True
        deltas = self._stream.run(self.spec, self._assignment, self._arrived, self._timeout_s)
        async with contextlib.aclosing(deltas):
            async for delta in deltas:
                self.num_generated += len(delta.token_ids)
                if delta.finish_reason:
                    self.outcome = delta.finish_reason
                yield delta

    def close(self) -> None:
        if not self._started:  # admitted but never streamed: stop counting it against its workers
            self._assignment.settle()


class FrontDoor:
    def __init__(self, model: ModelInfo, caps: Caps, admission: AdmissionControl, stream: MeshStream,
                 stall_timeout_s: float = 30.0):
        self.model = model
        self.stall_timeout_s = stall_timeout_s
        self.caps = caps
        self.admission = admission
        self.stream = stream
        self.num_running = 0
        self.accepting = True

    @contextlib.asynccontextmanager
    async def open(self, request: GenerateRequest, credentials: Credentials,
                   timeout_s: float | None = None) -> AsyncIterator[RequestRun]:
        """Admit `request` (or raise why not) and hold it until the block is left."""
        arrived = time.perf_counter()
        if not self.accepting:
            raise UnavailableError("the scheduler is shutting down")
        tenant = self.authenticate(credentials)
        with tracing.span("tokenize"):
            spec = self.check(request)
        with tracing.span("admission", prompt_tokens=len(spec.prompt_ids), tenant=tenant.name):
            assignment = await self._admit(spec, tenant, timeout_s)
        run = RequestRun(spec, tenant, assignment, self.stream, arrived, timeout_s)
        self._started(spec)
        try:
            yield run
        except ClientStalledError:
            run.outcome = "stalled"
            metrics.REJECTIONS.labels(reason="client_stalled").inc()
            raise
        except CLIENT_GONE:
            if run.outcome == "error":
                run.outcome = "cancelled"
            raise
        finally:
            run.close()
            self.admission.finish(tenant, spec.params.max_tokens - run.num_generated)
            self._finished(run.outcome)

    async def _admit(self, spec: GenerationSpec, tenant: Tenant, timeout_s: float | None) -> Assignment:
        """Wait in the admission queue; a cancel or deadline there is counted (nothing is held yet)."""
        try:
            return await self.admission.admit(spec, tenant, timeout_s)
        except (asyncio.CancelledError, DeadlineError) as exc:
            cause = "cancel" if isinstance(exc, asyncio.CancelledError) else "deadline"
            metrics.ABANDONED.labels(phase="queued", cause=cause).inc()
            raise

    def authenticate(self, credentials: Credentials) -> Tenant:
        """The caller's tenant, or UnauthenticatedError (counted)."""
        return self.admission.authenticate(credentials.authorization, credentials.cluster_secret)

    def check(self, request: GenerateRequest) -> GenerationSpec:
        try:
            return build_spec(request, self.model, self.caps)
        except PdmeshError:
            self.count_invalid()
            raise

    @staticmethod
    def count_invalid() -> None:
        """A request refused for its content (a protocol edge may find that before build_spec)."""
        metrics.REJECTIONS.labels(reason="invalid").inc()

    async def send(self, write: Awaitable[None]) -> None:
        """Await one write to the client; a client that has read nothing for stall_timeout_s (flow
        control holds the write) is cut off, so a reader that never reads holds no KV for long.
        Not wait_for(): it would wait for the cancelled write, which only ends when the client reads."""
        task = asyncio.ensure_future(write)
        done, _ = await asyncio.wait((task,), timeout=self.stall_timeout_s)
        if not done:
            task.cancel()
            raise ClientStalledError(f"the client read nothing of its stream for {self.stall_timeout_s:g}s "
                                     "(--client-stall-timeout); the request was cancelled")
        task.result()

    def _started(self, spec: GenerationSpec) -> None:
        self.num_running += 1
        metrics.RUNNING.set(self.num_running)
        metrics.PROMPT_TOKENS.inc(len(spec.prompt_ids))

    def _finished(self, outcome: str) -> None:
        metrics.REQUESTS.labels(outcome=outcome).inc()
        self.num_running -= 1
        metrics.RUNNING.set(self.num_running)
