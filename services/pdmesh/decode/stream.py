"""One request on a decode worker, from block reservation to its last token.

Blocks for prompt + max_tokens are reserved before the prompt is prefilled anywhere, so a
hand-off never finds the pool full. Every way out (finish, cancel, prefill or transfer error)
frees the reservation here and the held KV on the prefill worker.
"""

from __future__ import annotations

import logging
from typing import AsyncIterator

import grpc

from pdmesh import metrics
from pdmesh.engine.async_engine import AsyncEngine
from pdmesh.engine.sampling_params import SamplingParams
from pdmesh.engine.sequence import EngineRequest
from pdmesh.errors import EngineError
from pdmesh.gen.pdmesh.v1 import decode_pb2, prefill_pb2, prefill_pb2_grpc
from pdmesh.decode.kv_receiver import KVReceiver
from pdmesh.kvtransfer.channel import TransferError
from pdmesh.worker.convert import layout_to_pb, sampling_to_pb

log = logging.getLogger(__name__)


class PrefillClients:
    """One gRPC channel and stub per prefill worker address, reused."""

    def __init__(self):
        self._stubs: dict[str, prefill_pb2_grpc.PrefillWorkerStub] = {}
        self._channels: list[grpc.aio.Channel] = []

    def get(self, address: str) -> prefill_pb2_grpc.PrefillWorkerStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = grpc.aio.insecure_channel(address)
            self._channels.append(channel)
            stub = self._stubs[address] = prefill_pb2_grpc.PrefillWorkerStub(channel)
        return stub

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


class DecodeStream:
    def __init__(self, engine: AsyncEngine, receiver: KVReceiver, clients: PrefillClients):
        self.engine = engine
        self.receiver = receiver
        self.clients = clients

    async def run(self, request_id: str, prompt: list[int], params: SamplingParams, prefill_address: str,
                  timeout_s: float | None) -> AsyncIterator[decode_pb2.DecodeChunk]:
        self.engine.engine.validate(prompt, params.max_tokens)
        self.engine.reserve(request_id, len(prompt) + params.max_tokens)
        try:
            info = decode_pb2.PrefillInfo(mode="local")
            request = EngineRequest(request_id, prompt, params)
            if prefill_address:
                request, info, last = await self._remote_prefill(request, prefill_address, timeout_s)
                if last is not None:
                    yield last
                    return
            first = True
            async for output in self.engine.generate(request):
                if output.finish_reason == "error":
                    raise EngineError(f"request {request_id}: {output.error}")
                chunk = decode_pb2.DecodeChunk(token_ids=output.token_ids, finish_reason=output.finish_reason or "")
                if output.queue_s is not None:
                    metrics.ENGINE_QUEUE_TIME.observe(output.queue_s)
                if first:
                    chunk.prefill.CopyFrom(info)
                    first = False
                yield chunk
        finally:
            self.engine.release_reservation(request_id)

    async def _remote_prefill(self, request: EngineRequest, address: str, timeout_s: float | None):
        """(engine request carrying the KV, prefill info, final chunk if the first token ends it)."""
        stub = self.clients.get(address)
        pb = prefill_pb2.PrefillRequest(request_id=request.request_id, prompt_token_ids=request.prompt_ids,
                                        sampling=sampling_to_pb(request.params),
                                        layout=layout_to_pb(self.receiver.layout))
        try:
            result = await stub.Prefill(pb, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise TransferError(f"prefill of {request.request_id} on {address} failed: "
                                f"{exc.code().name}: {exc.details()}") from exc
        info = decode_pb2.PrefillInfo(mode="remote", prefill_seconds=result.prefill_seconds)
        if result.finish_reason:
            chunk = decode_pb2.DecodeChunk(token_ids=[result.first_token], finish_reason=result.finish_reason,
                                           prefill=info)
            return request, info, chunk
        try:
            kv, info.handoff_bytes, info.handoff_seconds = await self.receiver.pull(
                stub, address, request.request_id, result.num_tokens)
        except BaseException:
            await self._release_remote(stub, request.request_id)
            raise
        request.kv, request.first_token = kv, result.first_token
        return request, info, None

    async def _release_remote(self, stub: prefill_pb2_grpc.PrefillWorkerStub, request_id: str) -> None:
        try:
            await stub.ReleaseKV(prefill_pb2.ReleaseKVRequest(request_id=request_id), timeout=2.0)
        except grpc.aio.AioRpcError as exc:  # the prefill worker's TTL frees it anyway
            log.warning("could not release KV of %s on its prefill worker: %s", request_id, exc.code().name)
