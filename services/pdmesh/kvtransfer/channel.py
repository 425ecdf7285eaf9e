"""A pairwise torch.distributed group between one prefill worker and one decode worker.

No global world: each pair gets its own two-rank group built from a TCPStore that the decode
worker serves (vLLM's StatelessProcessGroup follows the same idea). Gloo moves CPU tensors,
NCCL CUDA tensors; the code is the same. The sender (prefill) is rank 0, the receiver rank 1.
Every join, send and receive has a deadline, so a lost peer is an error, never a hang.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pdmesh.engine import process_group
from pdmesh.errors import UnavailableError

SENDER_RANK, RECEIVER_RANK = 0, 1


class TransferError(UnavailableError):
    """A KV hand-off failed or ran past its deadline (retryable elsewhere)."""


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
        self._run(lambda: self._group.send([tensor.contiguous()], self.peer, tag), f"send tag {tag}")

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, tag: int) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=dtype)
        self._run(lambda: self._group.recv([tensor], self.peer, tag), f"receive tag {tag}")
        return tensor

    def _run(self, start, what: str) -> None:
        if self.broken:
            raise TransferError(f"KV channel {self.channel_id} is broken; it must be reopened")
        try:
            start().wait(process_group.seconds(self.timeout_s))
        except Exception as exc:
            self.broken = True  # after a timeout or a lost peer the pair cannot be trusted
            raise TransferError(f"KV channel {self.channel_id}: {what} failed: {exc}") from exc
