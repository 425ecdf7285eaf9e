"""The prefill side of KV hand-offs: channels to decode workers, and prompts held until pulled.

A prefilled prompt's blocks stay held in the engine until its decode worker pulls the KV (or
releases it). A decode worker that never comes back costs at most held_kv_ttl_s of blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time

from pdmesh import metrics
from pdmesh.engine.engine_protocol import Engine
from pdmesh.errors import NotFoundError
from pdmesh.kvtransfer.channel import SENDER_RANK, KVChannel, TransferError, connect_store

log = logging.getLogger(__name__)


class KVSender:
    def __init__(self, engine: Engine, host: str, timeout_s: float, ttl_s: float):
        """host: this worker's advertised address, which its end of each channel binds."""
        self.engine = engine
        self.host = host
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self.channels: dict[str, KVChannel] = {}
        self.held: dict[str, float] = {}  # request id -> monotonic time the KV became held
        self.num_expired = 0

    async def open_channel(self, store_host: str, store_port: int, channel_id: str,
                           backend: str = "gloo") -> KVChannel:
        def join() -> KVChannel:
            store = connect_store(store_host, store_port, self.timeout_s)
            return KVChannel(store, channel_id, SENDER_RANK, self.timeout_s, self.host, self.engine.device, backend)
        channel = await asyncio.to_thread(join)
        self.channels[channel_id] = channel
        return channel

    def hold(self, request_id: str) -> None:
        self.held[request_id] = time.monotonic()

    def release(self, request_id: str) -> int:
        """Free a held prompt's KV; returns the blocks freed."""
        self.held.pop(request_id, None)
        return self.engine.release_held(request_id)

    async def send(self, request_id: str, channel_id: str, tag: int) -> tuple[int, float]:
        """Send a held prompt's KV on a channel, then free it. Returns (bytes, seconds)."""
        channel = self.channels.get(channel_id)
        if channel is None:
            raise NotFoundError(f"no KV channel {channel_id!r} on this prefill worker")
        if request_id not in self.held:
            raise NotFoundError(f"request {request_id!r} holds no KV here (released or expired)")
        try:
            kv = self.engine.export_kv(request_id)
            start = time.perf_counter()
            await asyncio.to_thread(channel.send, kv, tag)
            seconds = time.perf_counter() - start
        except TransferError:
            metrics.HANDOFF_FAILURES.inc()
            self.channels.pop(channel_id, None)
            raise
        finally:
            self.release(request_id)
        nbytes = kv.numel() * kv.element_size()
        metrics.HANDOFF_BYTES.inc(nbytes)
        metrics.HANDOFF_SECONDS.observe(seconds)
        return nbytes, seconds

    async def expire_forever(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.ttl_s / 2))
            deadline = time.monotonic() - self.ttl_s
            for request_id in [r for r, t in self.held.items() if t < deadline]:
                freed = self.release(request_id)
                if freed:
                    self.num_expired += 1
                    metrics.KV_RECLAIMED.inc(freed)
                    log.warning("released KV of %s: not pulled within %.0fs", request_id, self.ttl_s)
