"""The PrefillWorker gRPC servicer: protobuf in, engine and KVSender calls, protobuf out."""

from __future__ import annotations

import json
import time

from pdmesh import metrics
from pdmesh.engine.engine_protocol import Engine
from pdmesh.engine.sequence import EngineRequest
from pdmesh.errors import UnavailableError
from pdmesh.gen.pdmesh.v1 import prefill_pb2, prefill_pb2_grpc, worker_pb2
from pdmesh.kvtransfer.layout_check import check_layouts
from pdmesh.prefill.kv_sender import KVSender
from pdmesh.worker.convert import layout_from_pb, layout_to_pb, sampling_from_pb
from pdmesh.worker.runtime import WorkerState


class PrefillWorkerServicer(prefill_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, state: WorkerState, sender: KVSender):
        self.state = state
        self.engine: Engine = state.engine
        self.sender = sender

    async def OpenKVChannel(self, request, context):
        layout = self.engine.layout
        check_layouts(sender=layout, receiver=layout_from_pb(request.layout))
        channel = await self.sender.open_channel(request.store_host, request.store_port, request.channel_id)
        return prefill_pb2.OpenKVChannelResponse(layout=layout_to_pb(layout), backend=channel.backend)

    async def Prefill(self, request, context):
        if self.state.draining:
            raise UnavailableError(f"prefill worker {self.state.worker_id} is draining")
        layout = self.engine.layout
        check_layouts(sender=layout, receiver=layout_from_pb(request.layout))
        self.state.requests_total += 1
        prompt = list(request.prompt_token_ids)
        start = time.perf_counter()
        self.state.queued_prompt_tokens += len(prompt)
        try:
            output = await self.engine.prefill(
                EngineRequest(request.request_id, prompt, sampling_from_pb(request.sampling),
                              output_offset=request.output_offset))
        finally:
            self.state.queued_prompt_tokens -= len(prompt)
        seconds = time.perf_counter() - start
        metrics.PREFILL_SECONDS.observe(seconds)
        metrics.PREFILL_TOKENS.inc(len(prompt))
        if output.queue_s is not None:
            metrics.ENGINE_QUEUE_TIME.observe(output.queue_s)
        finish_reason = "" if output.finish_reason == "prefilled" else output.finish_reason
        # A transfer handle: the engine's connector holds the KV under its own lease, not KVSender.
        handle = json.dumps(output.kv_transfer_params) if output.kv_transfer_params else ""
        if not finish_reason and not handle:
            self.sender.hold(request.request_id)
        return prefill_pb2.PrefillResult(first_token=output.token_ids[0], finish_reason=finish_reason,
                                         num_tokens=len(prompt), layout=layout_to_pb(layout),
                                         prefill_seconds=seconds, kv_transfer_params=handle)

    async def PullKV(self, request, context):
        nbytes, seconds = await self.sender.send(request.request_id, request.channel_id, request.tag)
        return prefill_pb2.TransferDone(bytes=nbytes, seconds=seconds)

    async def ReleaseKV(self, request, context):
        return prefill_pb2.ReleaseKVResponse(released=self.sender.release(request.request_id) > 0)

    async def Drain(self, request, context):
        return worker_pb2.DrainResponse(running=self.state.request_drain())
