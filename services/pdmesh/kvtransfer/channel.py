"""A pairwise torch.distributed group between one prefill worker and one decode worker.

No global world: each pair gets its own two-rank group built from a TCPStore that the decode
worker serves (vLLM's StatelessProcessGroup follows the same idea). Between two GPUs the pair
is an NCCL group (device to device on a side stream, no host copy); otherwise (a CPU at either
end, or both workers on one GPU, where NCCL refuses two ranks) a Gloo group moves the KV through
the host. Both ends pick the backend from the two KV layouts (`layout_check.transport_for`).
The sender (prefill) is rank 0, the receiver rank 1. Every join, send and receive has a
deadline, so a lost peer is an error, never a hang.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from pdmesh.engine import process_group
from pdmesh.errors import UnavailableError

SENDER_RANK, RECEIVER_RANK = 0, 1


class TransferError(UnavailableError):
    """A KV hand-off failed or ran past its deadline (retryable elsewhere)."""


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
        if self.backend == "gloo":
            tensor = tensor.cpu().contiguous()  # host-staged when the KV is on a GPU
            self._run(lambda: self._group.send([tensor], self.peer, tag), f"send tag {tag}")
            return
        with torch.cuda.device(self.device):
            tensor = tensor.to(self.device).contiguous()
            self._stream.wait_stream(torch.cuda.current_stream())  # the export's copy is done first
            with torch.cuda.stream(self._stream):
                self._run(lambda: self._group.send([tensor], self.peer, tag), f"send tag {tag}")

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, tag: int) -> torch.Tensor:
        """The peer's tensor: on the host over Gloo, on this end's GPU over NCCL."""
        if self.backend == "gloo":
            tensor = torch.empty(shape, dtype=dtype)
            self._run(lambda: self._group.recv([tensor], self.peer, tag), f"receive tag {tag}")
            return tensor
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            tensor = torch.empty(shape, dtype=dtype, device=self.device)
            self._run(lambda: self._group.recv([tensor], self.peer, tag), f"receive tag {tag}")
        tensor.record_stream(torch.cuda.default_stream(self.device))  # the engine reads it there
        return tensor

    def _run(self, start, what: str) -> None:
        if self.broken:
            raise TransferError(f"KV channel {self.channel_id} is broken; it must be reopened")
        try:
            work = start()
            if self.backend == "nccl":
                self._await_nccl(work)
            else:
                work.wait(process_group.seconds(self.timeout_s))
        except Exception as exc:
            self.broken = True  # after a timeout or a lost peer the pair cannot be trusted
            raise TransferError(f"KV channel {self.channel_id}: {what} failed: {exc}") from exc

    def _await_nccl(self, work) -> None:
        """NCCL's wait() only orders streams; the host polls for completion up to the deadline."""
        deadline = time.monotonic() + self.timeout_s
        while not work.is_completed():
            if time.monotonic() > deadline:
                abort = getattr(self._group, "abort", None) or getattr(self._group, "_abort", None)
                if abort is not None:
                    abort()  # a kernel waiting for a lost peer would hold the GPU forever
                raise TimeoutError(f"no completion within {self.timeout_s}s")
            time.sleep(NCCL_POLL_S)
        work.wait()  # raises what the work recorded, if it failed
