"""The decode side of KV hand-offs: one channel per prefill worker, transfers pulled in order.

The decode worker hosts each pair's TCPStore and pulls one transfer at a time per channel: it
posts the receive, then asks the prefill worker (PullKV) to send. Gloo matches a send only with
a receive of the same tag that is already posted, so both ends must agree on the order; pulling
one at a time per pair gives that order without any extra protocol.

Nothing received is trusted until it is checked: the bytes the sender reports must be what the
layout and prompt length call for (Gloo accepts a short message silently), and the checksum of
what arrived, hashed layer by layer while later layers are still on the wire, must equal the
sender's. A mismatch, a short transfer, a timeout or a channel lost mid-transfer discards the KV
(KVIntegrityError, counted in pdmesh_kv_handoff_corrupt_total{reason}); the caller recomputes.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field

import grpc
import torch

from pdmesh import metrics, tracing
from pdmesh.engine.kv_cache import KVLayout, torch_dtype
from pdmesh.gen.pdmesh.v1 import prefill_pb2, prefill_pb2_grpc
from pdmesh.kvtransfer.channel import RECEIVER_RANK, KVChannel, KVIntegrityError, TransferError, serve_store
from pdmesh.kvtransfer.checksum import KVChecksum, checksum_kind
from pdmesh.kvtransfer.layout_check import check_layouts, check_transport, transport_for
from pdmesh.worker.convert import layout_from_pb, layout_to_pb


@dataclass
class _Link:
    channel: KVChannel
    channel_id: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    next_tag: int = 0


class KVReceiver:
    def __init__(self, worker_id: str, host: str, layout: KVLayout, timeout_s: float,
                 device: torch.device = torch.device("cpu")):
        """device: where the engine's KV lives (a GPU end receives over NCCL when the sender is on another GPU)."""
        self.worker_id = worker_id
        self.device = device
        self.host = host
        self.layout = layout
        self.timeout_s = timeout_s
        self._links: dict[str, _Link] = {}
        self._opening: dict[str, asyncio.Lock] = {}

    async def pull(self, stub: prefill_pb2_grpc.PrefillWorkerStub, address: str, request_id: str,
                   num_tokens: int, sender: KVLayout | None = None) -> tuple[torch.Tensor, int, float]:
        """Receive a prefilled prompt's KV, checked: ([layers, 2, tokens, kv heads, D], bytes, seconds).
        Raises KVIntegrityError when what arrived must not be used. sender: the prefill worker's
        layout (from its PrefillResult), which picks the transport and the checksum."""
        with tracing.span("kv_handoff", request_id=request_id, prefill_worker=address) as span:
            kv, nbytes, seconds = await self._pull(stub, address, request_id, num_tokens, sender)
            if span is not None:
                span.set_attributes({"bytes": nbytes, "seconds": seconds})
        return kv, nbytes, seconds

    async def _pull(self, stub: prefill_pb2_grpc.PrefillWorkerStub, address: str, request_id: str,
                    num_tokens: int, sender: KVLayout | None) -> tuple[torch.Tensor, int, float]:
        link = await self._link(stub, address, "gloo" if sender is None else transport_for(sender, self.layout))
        shape = (self.layout.num_layers, 2, num_tokens, len(self.layout.kv_head_ids), self.layout.head_dim)
        # The sender hashes on its export's device (a device reduction on a GPU), so this end does too.
        checksum = KVChecksum(checksum_kind(torch.device("cpu" if sender is None else sender.device)))
        async with link.lock:
            tag, link.next_tag = link.next_tag, link.next_tag + 1
            start = time.perf_counter()
            receive = asyncio.create_task(asyncio.to_thread(
                link.channel.recv, shape, torch_dtype(self.layout.dtype), tag, checksum.update))
            try:
                done = await stub.PullKV(prefill_pb2.PullKVRequest(request_id=request_id, channel_id=link.channel_id,
                                                                   tag=tag), timeout=self.timeout_s)
                kv = await receive
            except BaseException as exc:
                receive.cancel()  # its thread ends at the channel's timeout; nobody waits for it
                receive.add_done_callback(_retrieve)
                self._drop(address, link)  # a half-done transfer leaves the pair in an unknown state
                metrics.HANDOFF_FAILURES.inc()
                error = _failure(exc, request_id, address)
                if error is exc:
                    raise
                raise error from exc
        seconds = time.perf_counter() - start
        nbytes = kv.numel() * kv.element_size()
        try:
            _verify(done, nbytes, checksum, request_id, address)
        except KVIntegrityError:
            metrics.HANDOFF_FAILURES.inc()
            raise
        metrics.HANDOFF_BYTES.inc(nbytes)
        metrics.HANDOFF_SECONDS.observe(seconds)
        return kv, nbytes, seconds

    async def _link(self, stub: prefill_pb2_grpc.PrefillWorkerStub, address: str, backend: str) -> _Link:
        link = self._links.get(address)
        if link is not None and not link.channel.broken and link.channel.backend == backend:
            return link
        async with self._opening.setdefault(address, asyncio.Lock()):
            link = self._links.get(address)
            if link is None or link.channel.broken or link.channel.backend != backend:
                link = await self._open(stub, address, backend)
                self._links[address] = link
            return link

    async def _open(self, stub: prefill_pb2_grpc.PrefillWorkerStub, address: str, backend: str) -> _Link:
        store = serve_store(self.host, self.timeout_s)
        # Random and only ever sent over an authenticated RPC: a peer that can reach the store
        # cannot guess the key prefix of a channel it was not handed.
        channel_id = f"{self.worker_id}/{secrets.token_hex(16)}"
        join = asyncio.create_task(asyncio.to_thread(KVChannel, store, channel_id, RECEIVER_RANK, self.timeout_s,
                                                     self.host, self.device, backend))
        try:
            response = await stub.OpenKVChannel(prefill_pb2.OpenKVChannelRequest(
                decode_worker_id=self.worker_id, store_host=self.host, store_port=store.port,
                channel_id=channel_id, timeout_s=self.timeout_s, layout=layout_to_pb(self.layout)),
                timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            join.cancel()
            raise TransferError(f"cannot open a KV channel to {address}: {exc.code().name}: {exc.details()}") from exc
        check_layouts(sender=layout_from_pb(response.layout), receiver=self.layout)
        check_transport(sender=response.backend, receiver=backend)
        channel = await join
        channel.store = store  # the store must outlive the group
        return _Link(channel, channel_id)

    def _drop(self, address: str, link: _Link) -> None:
        link.channel.broken = True
        if self._links.get(address) is link:
            del self._links[address]


def _retrieve(task: asyncio.Task) -> None:
    """Consume the abandoned receive's outcome (its failure is already reported by the pull)."""
    if not task.cancelled():
        task.exception()


def _verify(done: prefill_pb2.TransferDone, nbytes: int, checksum: KVChecksum, request_id: str,
            address: str) -> None:
    """Raise KVIntegrityError unless the sender sent exactly what arrived. (The pair is still in
    step after a bad transfer: every layer's message was matched, so the channel is kept.)"""
    where = f"KV of {request_id} from {address}"
    if done.bytes != nbytes:
        raise _discard(f"{where} is short: {done.bytes:,} bytes sent, {nbytes:,} expected", "short")
    if done.checksum_kind != checksum.kind or done.checksum != checksum.digest():
        raise _discard(f"{where} is corrupt: checksum {done.checksum_kind} {done.checksum:#x} sent, "
                       f"{checksum.kind} {checksum.digest():#x} received", "checksum")


def _failure(exc: BaseException, request_id: str, address: str) -> BaseException:
    """What a failed pull raises: KVIntegrityError when KV was (or may have been) partly received."""
    where = f"KV pull of {request_id} from {address}"
    if isinstance(exc, grpc.aio.AioRpcError):
        code = exc.code()
        message = f"{where} failed: {code.name}: {exc.details()}"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return _discard(message, "timeout")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            return _discard(message, "lost")  # the sender vanished mid-transfer
        return TransferError(message)
    if isinstance(exc, TransferError):
        return _discard(f"{where}: {exc}", "timeout" if exc.timed_out else "lost")
    return exc


def _discard(message: str, reason: str) -> KVIntegrityError:
    metrics.KV_HANDOFF_CORRUPT.labels(reason=reason).inc()
    return KVIntegrityError(message, reason)
