"""One request on a decode worker, from block reservation to its last token.

Blocks for prompt + max_tokens are reserved before the prompt is prefilled anywhere, so a
hand-off never finds the pool full. The reservation shares the blocks of the prompt's prefix that
this worker's cache holds, and the prefill worker sends the KV of the rest only (kv_start). The
prompt is prefilled by the first prefill worker that delivers KV that checks out (kv_receiver.py
verifies length and checksum before the sequence joins the batch); a worker that fails, stalls or
sends bad KV is skipped, and after the last one the prompt is prefilled here. Every way out
(finish, cancel, deadline, prefill or transfer error) frees the reservation here at once, and ends
the Prefill call, which frees the held KV on the prefill worker at once too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator

import grpc

from pdmesh import metrics, tracing
from pdmesh.rpc.channels import internal_channel
from pdmesh.rpc.cluster_auth import ClusterCredentials
from pdmesh.engine.engine_protocol import Engine
from pdmesh.engine.sampling_params import SamplingParams
from pdmesh.engine.sequence import EngineRequest
from pdmesh.errors import DeadlineError, EngineError
from pdmesh.gen.pdmesh.v1 import decode_pb2, prefill_pb2, prefill_pb2_grpc
from pdmesh.decode.kv_receiver import KVReceiver
from pdmesh.kvtransfer.channel import KVIntegrityError, TransferError
from pdmesh.worker.convert import layout_from_pb, layout_to_pb, sampling_to_pb

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


@dataclass(slots=True)
class _Progress:
    """Where one request is (for counting an early exit) and what its prefill took."""

    phase: str = "prefill"  # prefill, transfer, decode
    prefill_fallbacks: int = 0
    kv_recomputes: int = 0


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
        kv_start = self.engine.reserve(request_id, len(prompt) + params.max_tokens, prompt)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        progress = _Progress()
        try:
            request = EngineRequest(request_id, prompt, params, output_offset=output_offset, kv_start=kv_start)
            request, info, last = await self._prefill(request, prefill_addresses, deadline, progress)
            info.prefill_fallbacks, info.kv_recomputes = progress.prefill_fallbacks, progress.kv_recomputes
            if last is not None:
                last.prefill.CopyFrom(info)
                yield last
                return
            async for chunk in self._decode(request, info, progress):
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            cause = metrics.abandon_cause(None if deadline is None else deadline - time.monotonic())
            metrics.ABANDONED.labels(phase=progress.phase, cause=cause).inc()
            log.debug("request %s: %s while in %s; its blocks are freed", request_id, cause, progress.phase)
            raise
        finally:
            self.engine.release_reservation(request_id)

    async def _decode(self, request: EngineRequest, info: decode_pb2.PrefillInfo,
                      progress: _Progress) -> AsyncIterator[decode_pb2.DecodeChunk]:
        first = True
        async for output in self.engine.generate(request):
            progress.phase = "decode"
            if output.finish_reason == "error":
                raise EngineError(f"request {request.request_id}: {output.error}")
            chunk = decode_pb2.DecodeChunk(token_ids=output.token_ids, finish_reason=output.finish_reason or "")
            if output.queue_s is not None:
                metrics.ENGINE_QUEUE_TIME.observe(output.queue_s)
            if first:
                chunk.prefill.CopyFrom(info)
                first = False
            yield chunk

    async def _prefill(self, request: EngineRequest, addresses: list[str], deadline: float | None,
                       progress: _Progress):
        """Try each prefill worker in turn; if all fail, the engine here prefills (mode "local")."""
        for i, address in enumerate(addresses):
            try:
                return await self._remote_prefill(request, address, self._attempt_timeout(deadline), progress)
            except TransferError as exc:
                progress.prefill_fallbacks += 1
                progress.kv_recomputes += isinstance(exc, KVIntegrityError)
                target = "next_prefill" if i + 1 < len(addresses) else "local"
                metrics.PREFILL_FALLBACKS.labels(target=target).inc()
                log.warning("request %s: %s; trying %s", request.request_id, exc,
                            addresses[i + 1] if i + 1 < len(addresses) else "a local prefill")
        progress.phase = "prefill"
        return request, decode_pb2.PrefillInfo(mode="local"), None

    def _attempt_timeout(self, deadline: float | None) -> float:
        if deadline is None:
            return self.prefill_timeout_s
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineError("the request's deadline passed before its prefill")
        return min(left, self.prefill_timeout_s)

    async def _remote_prefill(self, request: EngineRequest, address: str, timeout_s: float, progress: _Progress):
        """(engine request carrying the checked KV or its transfer handle, prefill info, final chunk if
        the first token ends it)."""
        progress.phase = "prefill"
        stub = self.clients.get(address)
        pb = prefill_pb2.PrefillRequest(request_id=request.request_id, prompt_token_ids=request.prompt_ids,
                                        sampling=sampling_to_pb(request.params), output_offset=request.output_offset,
                                        layout=layout_to_pb(self.receiver.layout), kv_start=request.kv_start)
        # Open while the prefill worker holds the KV. A stream: the credential goes with the call.
        call = stub.Prefill(pb, timeout=timeout_s, metadata=tracing.inject(self.clients.credentials.metadata()))
        try:
            result = await _first_result(call, address)
            info = decode_pb2.PrefillInfo(mode="remote", prefill_seconds=result.prefill_seconds,
                                          prefill_worker_id=result.worker_id)
            if result.kv_transfer_params:
                # A transfer handle, not a KV tensor: the engine here pulls the KV through its own
                # connector (vLLM NIXL) and makes the first token itself. A handle it never uses is
                # rejected by the engine, so the prefill side frees the KV before its lease ends.
                metrics.HANDOFF_HANDLES.inc()
                params = json.loads(result.kv_transfer_params)
                return dataclasses.replace(request, kv_transfer_params=params), info, None
            if result.finish_reason:
                return request, info, decode_pb2.DecodeChunk(token_ids=[result.first_token],
                                                             finish_reason=result.finish_reason)
            if result.kv_start != request.kv_start:
                raise TransferError(f"prefill on {address} sends KV from token {result.kv_start:,}; "
                                    f"this worker holds the first {request.kv_start:,}")
            progress.phase = "transfer"
            kv, info.handoff_bytes, info.handoff_seconds = await self.receiver.pull(
                stub, address, request.request_id, result.num_tokens - result.kv_start, layout_from_pb(result.layout))
        except BaseException:
            call.cancel()  # ends the hold: the prefill worker frees the prompt's KV now, not at its TTL
            raise
        return dataclasses.replace(request, kv=kv, first_token=result.first_token), info, None


async def _first_result(call, address: str) -> prefill_pb2.PrefillResult:
    try:
        result = await call.read()
    except grpc.aio.AioRpcError as exc:
        raise TransferError(f"prefill on {address} failed: {exc.code().name}: {exc.details()}") from exc
    if result is grpc.aio.EOF:
        raise TransferError(f"prefill on {address} ended without a result")
    return result
