"""One request on a decode worker, from block reservation to its last token.

Blocks for prompt + max_tokens are reserved before the prompt is prefilled anywhere, so a
hand-off never finds the pool full. Every way out (finish, cancel, prefill or transfer error)
frees the reservation here and the held KV on the prefill worker.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import AsyncIterator

import grpc

from pdmesh import metrics
from pdmesh.rpc.channels import internal_channel
from pdmesh.rpc.cluster_auth import ClusterCredentials
from pdmesh.engine.engine_protocol import Engine
from pdmesh.engine.sampling_params import SamplingParams
from pdmesh.engine.sequence import EngineRequest
from pdmesh.errors import DeadlineError, EngineError
from pdmesh.gen.pdmesh.v1 import decode_pb2, prefill_pb2, prefill_pb2_grpc
from pdmesh.decode.kv_receiver import KVReceiver
from pdmesh.kvtransfer.channel import TransferError
from pdmesh.worker.convert import layout_to_pb, sampling_to_pb

log = logging.getLogger(__name__)


class PrefillClients:
    """One gRPC channel and stub per prefill worker address, reused."""

    def __init__(self, credentials: ClusterCredentials):
        self.credentials = credentials
        self._stubs: dict[str, prefill_pb2_grpc.PrefillWorkerStub] = {}
        self._channels: list[grpc.aio.Channel] = []

    def get(self, address: str) -> prefill_pb2_grpc.PrefillWorkerStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = internal_channel(address, self.credentials)
            self._channels.append(channel)
            stub = self._stubs[address] = prefill_pb2_grpc.PrefillWorkerStub(channel)
        return stub

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


class DecodeStream:
    def __init__(self, engine: Engine, receiver: KVReceiver, clients: PrefillClients, prefill_timeout_s: float):
        self.engine = engine
        self.receiver = receiver
        self.clients = clients
        self.prefill_timeout_s = prefill_timeout_s

    async def run(self, request_id: str, prompt: list[int], params: SamplingParams, prefill_addresses: list[str],
                  output_offset: int, timeout_s: float | None) -> AsyncIterator[decode_pb2.DecodeChunk]:
        """prefill_addresses: prefill workers to try in order; after them (or with none) prefill here."""
        self.engine.validate(prompt, params.max_tokens)
        self.engine.reserve(request_id, len(prompt) + params.max_tokens)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            request = EngineRequest(request_id, prompt, params, output_offset=output_offset)
            request, info, last = await self._prefill(request, prefill_addresses, deadline)
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

    async def _prefill(self, request: EngineRequest, addresses: list[str], deadline: float | None):
        """Try each prefill worker in turn; if all fail, the engine here prefills (mode "local")."""
        for i, address in enumerate(addresses):
            try:
                return await self._remote_prefill(request, address, self._attempt_timeout(deadline))
            except TransferError as exc:
                target = "next_prefill" if i + 1 < len(addresses) else "local"
                metrics.PREFILL_FALLBACKS.labels(target=target).inc()
                log.warning("request %s: %s; trying %s", request.request_id, exc,
                            addresses[i + 1] if i + 1 < len(addresses) else "a local prefill")
        return request, decode_pb2.PrefillInfo(mode="local"), None

    def _attempt_timeout(self, deadline: float | None) -> float:
        if deadline is None:
            return self.prefill_timeout_s
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineError("the request's deadline passed before its prefill")
        return min(left, self.prefill_timeout_s)

    async def _remote_prefill(self, request: EngineRequest, address: str, timeout_s: float):
        """(engine request carrying the KV or its transfer handle, prefill info, final chunk if the
        first token ends it)."""
        stub = self.clients.get(address)
        pb = prefill_pb2.PrefillRequest(request_id=request.request_id, prompt_token_ids=request.prompt_ids,
                                        sampling=sampling_to_pb(request.params), output_offset=request.output_offset,
                                        layout=layout_to_pb(self.receiver.layout))
        try:
            result = await stub.Prefill(pb, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise TransferError(f"prefill on {address} failed: {exc.code().name}: {exc.details()}") from exc
        info = decode_pb2.PrefillInfo(mode="remote", prefill_seconds=result.prefill_seconds)
        if result.kv_transfer_params:
            # A transfer handle, not a KV tensor: the engine here pulls the KV through its own
            # connector (vLLM NIXL) and makes the first token itself. A handle it never uses is
            # rejected by the engine, so the prefill side frees the KV before its lease ends.
            metrics.HANDOFF_HANDLES.inc()
            return dataclasses.replace(request, kv_transfer_params=json.loads(result.kv_transfer_params)), info, None
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
        request = dataclasses.replace(request, kv=kv, first_token=result.first_token)
        return request, info, None

    async def _release_remote(self, stub: prefill_pb2_grpc.PrefillWorkerStub, request_id: str) -> None:
        try:
            await stub.ReleaseKV(prefill_pb2.ReleaseKVRequest(request_id=request_id), timeout=2.0)
        except grpc.aio.AioRpcError as exc:  # the prefill worker's TTL frees it anyway
            log.warning("could not release KV of %s on its prefill worker: %s", request_id, exc.code().name)
