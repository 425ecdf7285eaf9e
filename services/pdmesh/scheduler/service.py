"""The Scheduler (client API) and Registry (worker membership) gRPC servicers."""

from __future__ import annotations

import time

from pdmesh.gen.pdmesh.v1 import registry_pb2, registry_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from pdmesh.rpc.cluster_auth import CLUSTER_SECRET_KEY
from pdmesh.scheduler.pairing import Pairing
from pdmesh.scheduler.registry import WorkerLoad, WorkerRegistry
from pdmesh.scheduler.front_door import Credentials, FrontDoor
from pdmesh.scheduler.generate_request import ChatMessage, GenerateRequest
from pdmesh.scheduler.request_spec import check_model, prompt_ids_from
from pdmesh.scheduler.stream import Delta, Route
from pdmesh.worker.convert import layout_from_pb


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    """pdmesh.v1.Scheduler: protobuf in and out; every request goes through the FrontDoor."""

    def __init__(self, front_door: FrontDoor, registry: WorkerRegistry, restarts: int = 0):
        self.front_door = front_door
        self.model = front_door.model
        self.admission = front_door.admission
        self.registry = registry
        self.restarts = restarts

    async def Generate(self, request, context):
        async with self.front_door.open(request_from_pb(request), _credentials(context),
                                        context.time_remaining()) as run:
            try:
                async for delta in run.deltas():
                    await self.front_door.send(context.write(_response_to_pb(delta, run.spec.request_id)))
            finally:
                if run.outcome == "error" and context.cancelled():
                    run.outcome = "cancelled"

    async def ListModels(self, request, context):
        self.front_door.authenticate(_credentials(context))  # with tenants on, a key is needed as for Generate
        m = self.model
        return scheduler_pb2.ListModelsResponse(models=[scheduler_pb2.Model(
            id=m.name, max_model_len=m.max_model_len, vocab_size=m.config.vocab_size)])

    async def CountTokens(self, request, context):
        self.front_door.authenticate(_credentials(context))
        check_model(self.model, request.model)
        ids = prompt_ids_from(self.model, request.prompt, request.messages, [])
        return scheduler_pb2.CountTokensResponse(num_tokens=len(ids), token_ids=ids)

    async def GetClusterStatus(self, request, context):
        credentials = _credentials(context)
        self.admission.authorize_admin(credentials.authorization, credentials.cluster_secret)
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
                device=w.device, gpu_memory_used_bytes=w.load.gpu_memory_used_bytes,
                kv_blocks_cached=w.load.kv_blocks_cached,
                prefix_cache_queried_tokens=w.load.prefix_cache_queried_tokens,
                prefix_cache_hit_tokens=w.load.prefix_cache_hit_tokens,
                ranks=[scheduler_pb2.WorkerRank(rank=r, pid=pid, kv_head_ids=list(heads))
                       for r, pid, heads in w.ranks]))
        return scheduler_pb2.ClusterStatus(workers=workers, running=self.front_door.num_running,
                                           queued=self.admission.dispatcher.queue.num_requests,
                                           scheduler_restarts=self.restarts,
                                           colocated=not self.registry.needs_prefill)


class RegistryServicer(registry_pb2_grpc.RegistryServicer):
    def __init__(self, registry: WorkerRegistry, heartbeat_interval_s: float, on_change):
        self.registry = registry
        self.heartbeat_interval_s = heartbeat_interval_s
        self.on_change = on_change

    async def Register(self, request, context):
        self.registry.register(request.worker_id, request.role, request.address, request.tp_size,
                               load_from_pb(request.load), request.metrics_address,
                               [(r.rank, r.pid, tuple(r.kv_head_ids)) for r in request.tp_ranks], request.restarts,
                               Pairing(request.model, request.engine or "pdmesh",
                                       layout_from_pb(request.layout) if request.HasField("layout") else None),
                               request.device or "cpu")
        await self.on_change()
        return registry_pb2.RegisterResponse(heartbeat_interval_s=self.heartbeat_interval_s)

    async def Heartbeat(self, request, context):
        self.registry.heartbeat(request.worker_id, load_from_pb(request.load))
        return registry_pb2.HeartbeatResponse()


def _credentials(context) -> Credentials:
    """What the call's metadata presents: authorization and the cluster secret."""
    found = dict(context.invocation_metadata() or ())
    return Credentials(found.get("authorization"), found.get(CLUSTER_SECRET_KEY))


def request_from_pb(pb: scheduler_pb2.GenerateRequest) -> GenerateRequest:
    return GenerateRequest(
        prompt=pb.prompt, messages=tuple(ChatMessage(m.role, m.content) for m in pb.messages),
        prompt_token_ids=tuple(pb.prompt_token_ids), model=pb.model,
        max_tokens=pb.max_tokens if pb.HasField("max_tokens") else None, temperature=pb.temperature,
        top_p=pb.top_p if pb.HasField("top_p") else None, top_k=pb.top_k,
        seed=pb.seed if pb.HasField("seed") else None, stop=tuple(pb.stop), ignore_eos=pb.ignore_eos,
        priority=pb.priority, request_id=pb.request_id)


def _response_to_pb(delta: Delta, request_id: str) -> scheduler_pb2.GenerateResponse:
    response = scheduler_pb2.GenerateResponse(text=delta.text, token_ids=delta.token_ids,
                                              finish_reason=delta.finish_reason, request_id=request_id)
    if delta.finish_reason:
        response.usage.prompt_tokens = delta.prompt_tokens
        response.usage.completion_tokens = delta.completion_tokens
        if delta.route is not None:
            response.route.CopyFrom(route_to_pb(delta.route))
    return response


def load_from_pb(pb) -> WorkerLoad:
    return WorkerLoad(running=pb.running, queued=pb.queued, queued_prompt_tokens=pb.queued_prompt_tokens,
                      kv_blocks_free=pb.kv_blocks_free, kv_blocks_total=pb.kv_blocks_total,
                      block_size=pb.block_size or 16, state=pb.state or "serving",
                      requests_total=pb.requests_total, gpu_memory_used_bytes=pb.gpu_memory_used_bytes,
                      kv_blocks_cached=pb.kv_blocks_cached,
                      prefix_cache_queried_tokens=pb.prefix_cache_queried_tokens,
                      prefix_cache_hit_tokens=pb.prefix_cache_hit_tokens,
                      cached_block_hashes=frozenset(pb.cached_block_hashes))


def route_to_pb(route: Route) -> scheduler_pb2.Route:
    return scheduler_pb2.Route(prefill_worker_id=route.prefill_worker_id, decode_worker_ids=route.decode_worker_ids,
                               prefill_fallbacks=route.prefill_fallbacks, resumes=route.resumes,
                               kv_recomputes=route.kv_recomputes)
