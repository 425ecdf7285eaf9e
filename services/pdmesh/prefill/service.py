"""The PrefillWorker gRPC servicer: protobuf in, engine and KVSender calls, protobuf out."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time

from pdmesh import faults, metrics
from pdmesh.engine.engine_protocol import Engine
from pdmesh.engine.sequence import EngineRequest
from pdmesh.errors import InvalidRequestError, UnavailableError
from pdmesh.gen.pdmesh.v1 import prefill_pb2, prefill_pb2_grpc, worker_pb2
from pdmesh.kvtransfer.layout_check import check_layouts, transport_for
from pdmesh.prefill.kv_sender import KVSender
from pdmesh.worker.convert import layout_from_pb, layout_to_pb, sampling_from_pb
from pdmesh.worker.runtime import WorkerState

log = logging.getLogger(__name__)


class PrefillWorkerServicer(prefill_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, state: WorkerState, sender: KVSender):
        self.state = state
        self.engine: Engine = state.engine
        self.sender = sender

    async def OpenKVChannel(self, request, context):
        layout, receiver = self.engine.layout, layout_from_pb(request.layout)
        check_layouts(sender=layout, receiver=receiver)
        channel = await self.sender.open_channel(request.store_host, request.store_port, request.channel_id,
                                                 transport_for(layout, receiver))
        return prefill_pb2.OpenKVChannelResponse(layout=layout_to_pb(layout), backend=channel.backend)

    async def Prefill(self, request, context):
        """Streams one PrefillResult, then stays open while the KV is held (see prefill.proto)."""
        if self.state.draining:
            raise UnavailableError(f"prefill worker {self.state.worker_id} is draining")
        layout = self.engine.layout
        check_layouts(sender=layout, receiver=layout_from_pb(request.layout))
        if not 0 <= request.kv_start < len(request.prompt_token_ids):
            raise InvalidRequestError(f"kv_start is {request.kv_start:,}; the prompt has "
                                      f"{len(request.prompt_token_ids):,} tokens", "kv_start")
        self.state.requests_total += 1
        request_id = request.request_id
        phase = "prefill"
        try:
            output, seconds = await self._prefill(request)
            finish_reason = "" if output.finish_reason == "prefilled" else output.finish_reason
            # A transfer handle: the engine's own connector holds the KV under its lease, not KVSender.
            handle = json.dumps(output.kv_transfer_params) if output.kv_transfer_params else ""
            result = prefill_pb2.PrefillResult(first_token=output.token_ids[0], finish_reason=finish_reason,
                                               num_tokens=len(request.prompt_token_ids), layout=layout_to_pb(layout),
                                               prefill_seconds=seconds, worker_id=self.state.worker_id,
                                               kv_start=request.kv_start, kv_transfer_params=handle)
            if finish_reason or handle:
                yield result
                return
            held = self.sender.hold(request_id, request.kv_start)
            phase = "held"
            yield result
            await held.freed.wait()  # PullKV, ReleaseKV or the TTL
        except (asyncio.CancelledError, GeneratorExit):
            # The caller cancelled, ran out of time or vanished: free the prompt's blocks now.
            freed = self.sender.release(request_id)  # also a prompt the engine finished as we were cancelled
            if phase == "prefill" or freed:
                cause = metrics.abandon_cause(context.time_remaining())
                metrics.ABANDONED.labels(phase=phase, cause=cause).inc()
                log.debug("request %s: caller gone while %s (%s); its KV is freed", request_id, phase, cause)
            raise

    async def _prefill(self, request):
        prompt = list(request.prompt_token_ids)
        start = time.perf_counter()
        self.state.queued_prompt_tokens += len(prompt)
        try:
            prefill = asyncio.ensure_future(self.engine.prefill(
                EngineRequest(request.request_id, prompt, sampling_from_pb(request.sampling),
                              output_offset=request.output_offset)))
            if faults.hit("prefill_crash"):
                await asyncio.sleep(0.01)  # the prompt is in the engine now
                log.error("fault injection: prefill_crash; exiting mid-prefill")
                os._exit(faults.CRASH_EXIT_CODE)
            output = await prefill
        finally:
            self.state.queued_prompt_tokens -= len(prompt)
        seconds = time.perf_counter() - start
        metrics.PREFILL_SECONDS.observe(seconds)
        metrics.PREFILL_TOKENS.inc(len(prompt) - output.num_cached_tokens)  # computed here, not found cached
        if output.queue_s is not None:
            metrics.ENGINE_QUEUE_TIME.observe(output.queue_s)
        return output, seconds

    async def PullKV(self, request, context):
        try:
            sent = await self.sender.send(request.request_id, request.channel_id, request.tag)
        except asyncio.CancelledError:
            cause = metrics.abandon_cause(context.time_remaining())
            metrics.ABANDONED.labels(phase="transfer", cause=cause).inc()
            raise
        return prefill_pb2.TransferDone(bytes=sent.nbytes, seconds=sent.seconds, checksum=sent.checksum,
                                        checksum_kind=sent.checksum_kind)

    async def ReleaseKV(self, request, context):
        return prefill_pb2.ReleaseKVResponse(released=self.sender.release(request.request_id) > 0)

    async def Drain(self, request, context):
        return worker_pb2.DrainResponse(running=self.state.request_drain())
