"""The decode side of KV hand-offs: one channel per prefill worker, transfers pulled in order.

The decode worker hosts each pair's TCPStore and pulls one transfer at a time per channel: it
posts the receive, then asks the prefill worker (PullKV) to send. Gloo matches a send only with
a receive of the same tag that is already posted, so both ends must agree on the order; pulling
one at a time per pair gives that order without any extra protocol.
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
from pdmesh.kvtransfer.channel import RECEIVER_RANK, KVChannel, TransferError, serve_store
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
        """Receive a prefilled prompt's KV: ([layers, 2, tokens, kv heads, D], bytes, seconds).
        sender: the prefill worker's layout (from its PrefillResult), which picks the transport."""
        backend = "gloo" if sender is None else transport_for(sender, self.layout)
        with tracing.span("kv_handoff", request_id=request_id, prefill_worker=address) as span:
            kv, nbytes, seconds = await self._pull(stub, address, request_id, num_tokens, backend)
            if span is not None:
                span.set_attributes({"bytes": nbytes, "seconds": seconds})
        return kv, nbytes, seconds

    async def _pull(self, stub: prefill_pb2_grpc.PrefillWorkerStub, address: str, request_id: str,
                    num_tokens: int, backend: str) -> tuple[torch.Tensor, int, float]:
        link = await self._link(stub, address, backend)
        shape = (self.layout.num_layers, 2, num_tokens, len(self.layout.kv_head_ids), self.layout.head_dim)
        async with link.lock:
            tag, link.next_tag = link.next_tag, link.next_tag + 1
            start = time.perf_counter()
            receive = asyncio.create_task(asyncio.to_thread(
                link.channel.recv, shape, torch_dtype(self.layout.dtype), tag))
            try:
                await stub.PullKV(prefill_pb2.PullKVRequest(request_id=request_id, channel_id=link.channel_id,
                                                            tag=tag), timeout=self.timeout_s)
                kv = await receive
            except BaseException as exc:
                receive.cancel()  # its thread ends at the channel's timeout; nobody waits for it
                receive.add_done_callback(_retrieve)
                self._drop(address, link)  # a half-done transfer leaves the pair in an unknown state
                metrics.HANDOFF_FAILURES.inc()
                if isinstance(exc, grpc.aio.AioRpcError):
                    raise TransferError(f"KV pull of {request_id} from {address} failed: "
                                        f"{exc.code().name}: {exc.details()}") from exc
                raise
        seconds = time.perf_counter() - start
        nbytes = kv.numel() * kv.element_size()
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
