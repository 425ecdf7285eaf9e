"""The Scheduler (client API) and Registry (worker membership) gRPC servicers."""

from __future__ import annotations

import asyncio
import contextlib
import time

from pdmesh import metrics
from pdmesh.errors import PdmeshError, ResourceExhaustedError, UnavailableError
from pdmesh.gen.pdmesh.v1 import registry_pb2, registry_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from pdmesh.rpc.cluster_auth import CLUSTER_SECRET_KEY
from pdmesh.scheduler.registry import WorkerLoad, WorkerRegistry
from pdmesh.scheduler.admission_control import AdmissionControl
from pdmesh.scheduler.request_spec import Caps, ModelInfo, build_spec, check_model, prompt_ids_from
from pdmesh.scheduler.stream import MeshStream


class ClientStalledError(ResourceExhaustedError):
    """The client stopped reading its stream."""


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, model: ModelInfo, caps: Caps, registry: WorkerRegistry, admission: AdmissionControl,
                 stream: MeshStream, restarts: int = 0, stall_timeout_s: float = 30.0):
        self.model = model
        self.restarts = restarts
        self.stall_timeout_s = stall_timeout_s
        self.caps = caps
        self.registry = registry
        self.admission = admission
        self.stream = stream
        self.running = 0
        self.accepting = True

    async def Generate(self, request, context):
        arrived = time.perf_counter()
        if not self.accepting:
            raise UnavailableError("the scheduler is shutting down")
        tenant = self.admission.authenticate(*_credentials(context))
        try:
            spec = build_spec(request, self.model, self.caps)
        except PdmeshError:
            metrics.REJECTIONS.labels(reason="invalid").inc()
            raise
        assignment = await self.admission.admit(spec, tenant, context.time_remaining())
        self.running += 1
        metrics.RUNNING.set(self.running)
        metrics.PROMPT_TOKENS.inc(len(spec.prompt_ids))
        outcome, generated = "error", 0
        deltas = self.stream.run(spec, assignment, arrived, context.time_remaining())
        try:
            async with contextlib.aclosing(deltas):  # leaving early cancels the worker call: KV freed
                async for delta in deltas:
                    generated += len(delta.token_ids)
                    response = scheduler_pb2.GenerateResponse(text=delta.text, token_ids=delta.token_ids,
                                                              finish_reason=delta.finish_reason,
                                                              request_id=spec.request_id)
                    if delta.finish_reason:
                        outcome = delta.finish_reason
                        response.usage.prompt_tokens = delta.prompt_tokens
                        response.usage.completion_tokens = delta.completion_tokens
                    await self._send(context, response)
        except ClientStalledError:
            outcome = "stalled"
            raise
        finally:
            if outcome == "error" and context.cancelled():
                outcome = "cancelled"
            self.admission.finish(tenant, spec.params.max_tokens - generated)
            metrics.REQUESTS.labels(outcome=outcome).inc()
            self.running -= 1
            metrics.RUNNING.set(self.running)

    async def _send(self, context, response) -> None:
        """Write one message; a client that has read nothing for stall_timeout_s (HTTP/2 flow
        control holds the write) is cut off, so a reader that never reads holds no KV for long.
        Not wait_for(): it would wait for the cancelled write, which only ends when the client reads."""
        write = asyncio.ensure_future(context.write(response))
        done, _ = await asyncio.wait((write,), timeout=self.stall_timeout_s)
        if not done:
            write.cancel()
            metrics.REJECTIONS.labels(reason="client_stalled").inc()
            raise ClientStalledError(f"the client read nothing of its stream for {self.stall_timeout_s:g}s "
                                     "(--client-stall-timeout); the request was cancelled")
        write.result()

    async def ListModels(self, request, context):
        m = self.model
        return scheduler_pb2.ListModelsResponse(models=[scheduler_pb2.Model(
            id=m.name, max_model_len=m.max_model_len, vocab_size=m.config.vocab_size)])

    async def CountTokens(self, request, context):
        check_model(self.model, request.model)
        ids = prompt_ids_from(self.model, request.prompt, request.messages, [])
        return scheduler_pb2.CountTokensResponse(num_tokens=len(ids), token_ids=ids)

    async def GetClusterStatus(self, request, context):
        self.admission.authorize_admin(*_credentials(context))
        now = time.monotonic()
        workers = []
        for w in self.registry.workers.values():
            healthy = self.registry.healthy(w, now)
            state = w.load.state if healthy or w.load.state == "draining" else "down"
            workers.append(scheduler_pb2.WorkerStatus(
                worker_id=w.worker_id, role=w.role, address=w.address, healthy=healthy,
                running=w.load.running, queued=w.load.queued, kv_blocks_free=w.load.kv_blocks_free,
                kv_blocks_total=w.load.kv_blocks_total, queued_prompt_tokens=w.load.queued_prompt_tokens,
                tp_size=w.tp_size, last_heartbeat_age_s=w.age(now), state=state,
                metrics_address=w.metrics_address, requests_total=w.load.requests_total, restarts=w.restarts,
                ranks=[scheduler_pb2.WorkerRank(rank=r, pid=pid, kv_head_ids=list(heads))
                       for r, pid, heads in w.ranks]))
        return scheduler_pb2.ClusterStatus(workers=workers, running=self.running,
                                           queued=self.admission.dispatcher.queue.num_requests,
                                           scheduler_restarts=self.restarts)


class RegistryServicer(registry_pb2_grpc.RegistryServicer):
    def __init__(self, registry: WorkerRegistry, heartbeat_interval_s: float, on_change):
        self.registry = registry
        self.heartbeat_interval_s = heartbeat_interval_s
        self.on_change = on_change

    async def Register(self, request, context):
        self.registry.register(request.worker_id, request.role, request.address, request.tp_size,
                               load_from_pb(request.load), request.metrics_address,
                               [(r.rank, r.pid, tuple(r.kv_head_ids)) for r in request.tp_ranks], request.restarts,
                               request.engine_kind)
        await self.on_change()
        return registry_pb2.RegisterResponse(heartbeat_interval_s=self.heartbeat_interval_s)

    async def Heartbeat(self, request, context):
        self.registry.heartbeat(request.worker_id, load_from_pb(request.load))
        return registry_pb2.HeartbeatResponse()


def _credentials(context) -> tuple[str | None, str | None]:
    """(authorization, cluster secret) from the call's metadata."""
    found = dict(context.invocation_metadata() or ())
    return found.get("authorization"), found.get(CLUSTER_SECRET_KEY)


def load_from_pb(pb) -> WorkerLoad:
    return WorkerLoad(running=pb.running, queued=pb.queued, queued_prompt_tokens=pb.queued_prompt_tokens,
                      kv_blocks_free=pb.kv_blocks_free, kv_blocks_total=pb.kv_blocks_total,
                      block_size=pb.block_size or 16, state=pb.state or "serving",
                      requests_total=pb.requests_total)
