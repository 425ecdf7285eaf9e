"""The prefill side of KV hand-offs: channels to decode workers, and prompts held until pulled.

A prefilled prompt's blocks stay held in the engine until its decode worker pulls the KV or lets
it go: ReleaseKV, or ending its Prefill call, which stays open while the KV is held (a decode
worker that cancels or vanishes frees it at once). held_kv_ttl_s is only a backstop.

A send hashes the KV it exported while the layers are on the wire and returns the checksum, so
the decode worker can verify what arrived before it uses it. Injected faults (pdmesh.faults)
strike here, between the checksum and the wire.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import torch

from pdmesh import faults, metrics
from pdmesh.engine.engine_protocol import Engine
from pdmesh.errors import NotFoundError
from pdmesh.kvtransfer.channel import SENDER_RANK, KVChannel, TransferError, connect_store
from pdmesh.kvtransfer.checksum import checksum_kind, kv_checksum

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Held:
    """A prompt whose KV waits for its decode worker; `freed` is set once its blocks are free."""

    kv_start: int = 0  # the first prompt token to send (the decode worker holds those before it)
    since: float = field(default_factory=time.monotonic)
    freed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True, slots=True)
class Sent:
    nbytes: int
    seconds: float
    checksum: int
    checksum_kind: str


class KVSender:
    def __init__(self, engine: Engine, host: str, timeout_s: float, ttl_s: float):
        """host: this worker's advertised address, which its end of each channel binds."""
        self.engine = engine
        self.host = host
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self.channels: dict[str, KVChannel] = {}
        self.held: dict[str, Held] = {}
        self.num_expired = 0

    async def open_channel(self, store_host: str, store_port: int, channel_id: str,
                           backend: str = "gloo") -> KVChannel:
        def join() -> KVChannel:
            store = connect_store(store_host, store_port, self.timeout_s)
            return KVChannel(store, channel_id, SENDER_RANK, self.timeout_s, self.host, self.engine.device, backend)
        channel = await asyncio.to_thread(join)
        self.channels[channel_id] = channel
        return channel

    def hold(self, request_id: str, kv_start: int = 0) -> Held:
        held = self.held[request_id] = Held(kv_start)
        return held

    def release(self, request_id: str) -> int:
        """Free a held prompt's KV; returns the blocks freed (0: nothing was held)."""
        held = self.held.pop(request_id, None)
        if held is not None:
            held.freed.set()
        return self.engine.release_held(request_id)

    async def send(self, request_id: str, channel_id: str, tag: int) -> Sent:
        """Send a held prompt's KV on a channel, then free it."""
        channel = self.channels.get(channel_id)
        if channel is None:
            raise NotFoundError(f"no KV channel {channel_id!r} on this prefill worker")
        held = self.held.get(request_id)
        if held is None:
            raise NotFoundError(f"request {request_id!r} holds no KV here (released or expired)")
        try:
            kv = self.engine.export_kv(request_id, held.kv_start)  # [layers, 2, tokens, kv heads, head_dim], a copy
            wire = _faulty(kv)
            if delay := faults.delay_s():
                await asyncio.sleep(delay)
            start = time.perf_counter()
            checksum, _ = await asyncio.gather(asyncio.to_thread(kv_checksum, kv),
                                               asyncio.to_thread(channel.send, wire, tag))
            seconds = time.perf_counter() - start
        except TransferError:
            metrics.HANDOFF_FAILURES.inc()
            self.channels.pop(channel_id, None)
            raise
        finally:
            self.release(request_id)
        nbytes = wire.numel() * wire.element_size()
        metrics.HANDOFF_BYTES.inc(nbytes)
        metrics.HANDOFF_SECONDS.observe(seconds)
        return Sent(nbytes, seconds, checksum, checksum_kind(kv.device))

    async def expire_forever(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.ttl_s / 2))
            deadline = time.monotonic() - self.ttl_s
            for request_id in [r for r, h in self.held.items() if h.since < deadline]:
                freed = self.release(request_id)
                if freed:
                    self.num_expired += 1
                    metrics.KV_RECLAIMED.inc(freed)
                    log.warning("released KV of %s: not pulled within %.0fs", request_id, self.ttl_s)


def _faulty(kv: torch.Tensor) -> torch.Tensor:
    """What goes on the wire: the KV itself, or (fault injection) a short or corrupted copy."""
    if faults.hit("kv_truncate"):
        log.warning("fault injection: kv_truncate")
        short = kv[..., :-1] if kv.shape[-1] > 1 else kv[:, :, :-1]
        return short.contiguous()  # every layer's message is short
    if faults.hit("kv_corrupt"):
        log.warning("fault injection: kv_corrupt")
        wire = kv.clone()
        flat = wire.view(-1).view(torch.uint8)
        flat[flat.numel() // 2] ^= 0xFF
        return wire
    return kv
