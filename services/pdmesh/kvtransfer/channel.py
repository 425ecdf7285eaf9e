"""A pairwise torch.distributed group between one prefill worker and one decode worker.

No global world: each pair gets its own two-rank group built from a TCPStore that the decode
worker serves (vLLM's StatelessProcessGroup follows the same idea). Gloo moves CPU tensors,
NCCL CUDA tensors; the code is the same. The sender (prefill) is rank 0, the receiver rank 1.
Every join, send and receive has a deadline, so a lost peer is an error, never a hang.

A KV tensor ([layers, 2, tokens, kv heads, head_dim]) moves one layer per message, every layer
posted at once, so the receiver can check each layer while the rest is still on the wire. Gloo
fills a receive with a shorter message without complaint (the rest of the buffer is whatever was
there), so a transfer's length and checksum are checked above the channel (decode/kv_receiver.py).
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist

from pdmesh.engine import process_group
from pdmesh.errors import UnavailableError

SENDER_RANK, RECEIVER_RANK = 0, 1


class TransferError(UnavailableError):
    """A KV hand-off failed or ran past its deadline (retryable elsewhere)."""

    def __init__(self, message: str, timed_out: bool = False):
        super().__init__(message)
        self.timed_out = timed_out


class KVIntegrityError(TransferError):
    """Received KV that must not be used: reason is "checksum", "short", "timeout" or "lost"."""

    def __init__(self, message: str, reason: str):
        super().__init__(message, timed_out=reason == "timeout")
        self.reason = reason


def layer_tag(tag: int, layer: int, num_layers: int) -> int:
    """The Gloo tag of one layer of transfer `tag` (Gloo tags are 32-bit)."""
    return (tag * num_layers + layer) % 2**31


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def serve_store(host: str, timeout_s: float) -> dist.TCPStore:
    """A TCPStore on a free port of host (and only there), for one pair (the receiver hosts it)."""
    return process_group.serve_store(host, 2, timeout_s)


def connect_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    try:
        return process_group.connect_store(host, port, 2, timeout_s)
    except Exception as exc:
        raise TransferError(f"cannot reach the KV channel store at {host}:{port}: {exc}") from exc


class KVChannel:
    """One end of a pair. Construction blocks until the other end joins (or timeout_s passes)."""

    def __init__(self, store: dist.Store, channel_id: str, rank: int, timeout_s: float, host: str,
                 device: torch.device = torch.device("cpu")):
        """host: this end's own reachable address, which the transport binds."""
        self.channel_id = channel_id
        self.rank = rank
        self.peer = 1 - rank
        self.timeout_s = timeout_s
        self.backend = backend_for(device)
        self.broken = False
        prefixed = dist.PrefixStore(channel_id, store)
        try:
            if self.backend == "nccl":
                opts = dist.ProcessGroupNCCL.Options()
                self._group = dist.ProcessGroupNCCL(prefixed, rank, 2, opts)
            else:
                self._group = process_group.gloo_group(prefixed, rank, 2, timeout_s, host)
        except Exception as exc:
            raise TransferError(f"KV channel {channel_id}: peer did not join within {timeout_s}s: {exc}") from exc

    def send(self, tensor: torch.Tensor, tag: int) -> None:
        """Send tensor ([layers, ...]) as one message per layer; returns once all are out."""
        layers = list(tensor.contiguous())
        self._run(lambda: [self._group.send([layer], self.peer, layer_tag(tag, i, len(layers)))
                           for i, layer in enumerate(layers)], None, f"send tag {tag}")

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, tag: int,
             on_layer: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Receive a [layers, ...] tensor; on_layer(layer) runs on each layer as soon as it is in,
        in order, while later layers may still be arriving."""
        tensor = torch.empty(shape, dtype=dtype)
        self._run(lambda: [self._group.recv([layer], self.peer, layer_tag(tag, i, shape[0]))
                           for i, layer in enumerate(tensor)],
                  (lambda i: on_layer(tensor[i])) if on_layer else None, f"receive tag {tag}")
        return tensor

    def _run(self, start, after, what: str) -> None:
        """Post every layer's operation, then wait for each in order (one deadline for all)."""
        if self.broken:
            raise TransferError(f"KV channel {self.channel_id} is broken; it must be reopened")
        deadline = time.monotonic() + self.timeout_s
        try:
            for i, work in enumerate(start()):
                work.wait(process_group.seconds(max(0.001, deadline - time.monotonic())))
                if after is not None:
                    after(i)
        except Exception as exc:
            self.broken = True  # after a timeout or a lost peer the pair cannot be trusted
            timed_out = "timed out" in str(exc).lower() or time.monotonic() >= deadline
            raise TransferError(f"KV channel {self.channel_id}: {what} failed: {exc}", timed_out) from exc
