"""A pairwise torch.distributed group between one prefill worker and one decode worker.

No global world: each pair gets its own two-rank group built from a TCPStore that the decode
worker serves (vLLM's StatelessProcessGroup follows the same idea). Between two GPUs the pair
is an NCCL group (device to device on a side stream, no host copy); otherwise (a CPU at either
end, or both workers on one GPU, where NCCL refuses two ranks) a Gloo group moves the KV through
the host. Both ends pick the backend from the two KV layouts (`layout_check.transport_for`).
The sender (prefill) is rank 0, the receiver rank 1. Every join, send and receive has a
deadline, so a lost peer is an error, never a hang.

A KV tensor ([layers, 2, tokens, kv heads, head_dim]) moves one layer per message, every layer
posted at once, so the receiver can check each layer while the rest is still on the wire. Gloo
fills a receive with a shorter message without complaint (the rest of the buffer is whatever was
there), so a transfer's length and checksum are checked above the channel (decode/kv_receiver.py).
"""

from __future__ import annotations

import contextlib
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


BACKENDS = ("gloo", "nccl")
NCCL_POLL_S = 0.0005


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
                 device: torch.device = torch.device("cpu"), backend: str = "gloo"):
        """host: this end's own reachable address, which the transport binds; device: where this
        end's KV lives; backend: "gloo" (through the host) or "nccl" (GPU to GPU)."""
        if backend not in BACKENDS or (backend == "nccl" and device.type != "cuda"):
            raise ValueError(f"KV channel backend {backend!r} cannot serve a KV cache on {device}")
        self.channel_id = channel_id
        self.rank = rank
        self.peer = 1 - rank
        self.timeout_s = timeout_s
        self.device = device
        self.backend = backend
        self.broken = False
        prefixed = dist.PrefixStore(channel_id, store)
        try:
            if backend == "nccl":  # its communicator is made at the first transfer, within the store's timeout
                self._group = process_group.nccl_group(prefixed, rank, 2, timeout_s, device)
                self._stream = torch.cuda.Stream(device)  # transfers never queue behind the engine's steps
            else:
                self._group = process_group.gloo_group(prefixed, rank, 2, timeout_s, host)
        except Exception as exc:
            raise TransferError(f"KV channel {channel_id}: peer did not join within {timeout_s}s: {exc}") from exc

    def send(self, tensor: torch.Tensor, tag: int) -> None:
        """Send tensor ([layers, ...]) as one message per layer; returns once all are out."""
        tensor = tensor.to(self.device if self.backend == "nccl" else "cpu")  # Gloo: staged through the host
        layers = list(tensor.contiguous())
        with self._side_stream(wait_for_current=True):
            self._run(lambda: [self._group.send([layer], self.peer, layer_tag(tag, i, len(layers)))
                               for i, layer in enumerate(layers)], None, f"send tag {tag}")

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, tag: int,
             on_layer: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Receive a [layers, ...] tensor (on the host over Gloo, on this end's GPU over NCCL);
        on_layer(layer) runs on each layer as soon as it is in, in order, while later layers may
        still be arriving."""
        with self._side_stream(wait_for_current=False):
            tensor = torch.empty(shape, dtype=dtype, device=self.device if self.backend == "nccl" else "cpu")
            self._run(lambda: [self._group.recv([layer], self.peer, layer_tag(tag, i, shape[0]))
                               for i, layer in enumerate(tensor)],
                      (lambda i: on_layer(tensor[i])) if on_layer else None, f"receive tag {tag}")
        if self.backend == "nccl":
            tensor.record_stream(torch.cuda.default_stream(self.device))  # the engine reads it there
        return tensor

    @contextlib.contextmanager
    def _side_stream(self, wait_for_current: bool):
        """NCCL: run on this channel's stream (wait_for_current: after what the caller's stream
        queued, e.g. the export's copy); Gloo: nothing to do."""
        if self.backend != "nccl":
            yield
            return
        with torch.cuda.device(self.device):
            if wait_for_current:
                self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                yield

    def _run(self, start, after, what: str) -> None:
        """Post every layer's operation, then wait for each in order (one deadline for all)."""
        if self.broken:
            raise TransferError(f"KV channel {self.channel_id} is broken; it must be reopened")
        deadline = time.monotonic() + self.timeout_s
        try:
            for i, work in enumerate(start()):
                self._wait(work, deadline)
                if after is not None:
                    after(i)
        except Exception as exc:
            self.broken = True  # after a timeout or a lost peer the pair cannot be trusted
            timed_out = "timed out" in str(exc).lower() or time.monotonic() >= deadline
            raise TransferError(f"KV channel {self.channel_id}: {what} failed: {exc}", timed_out) from exc

    def _wait(self, work, deadline: float) -> None:
        if self.backend == "gloo":
            work.wait(process_group.seconds(max(0.001, deadline - time.monotonic())))
            return
        # NCCL's wait() only orders streams: the host polls for completion up to the deadline.
        while not work.is_completed():
            if time.monotonic() > deadline:
                abort = getattr(self._group, "abort", None) or getattr(self._group, "_abort", None)
                if abort is not None:
                    abort()  # a kernel waiting for a lost peer would hold the GPU forever
                raise TimeoutError(f"timed out: no completion within {self.timeout_s}s")
            time.sleep(NCCL_POLL_S)
        work.wait()  # raises what the work recorded, if it failed
