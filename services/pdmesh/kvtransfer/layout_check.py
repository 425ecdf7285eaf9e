"""Both ends of a hand-off check the other's KV layout before any byte moves, and derive from the
two layouts, each on its own, how the bytes will move."""

from __future__ import annotations

from pdmesh.engine.kv_cache import KVLayout
from pdmesh.errors import FailedPreconditionError


class LayoutMismatchError(FailedPreconditionError):
    """The two ends of a hand-off disagree on what a KV tensor holds."""


def check_layouts(sender: KVLayout, receiver: KVLayout) -> None:
    """Raise LayoutMismatchError naming the first field that differs."""
    problem = receiver.mismatch(sender)
    if problem:
        raise LayoutMismatchError(f"{problem} (sender {sender}, receiver {receiver})")


def transport_for(sender: KVLayout, receiver: KVLayout) -> str:
    """"nccl" between two different GPUs; "gloo" (through the host) when either end is a CPU or
    both ends share one GPU (NCCL refuses two ranks on one device)."""
    both_gpus = sender.device == receiver.device == "cuda"
    if both_gpus and sender.device_id and receiver.device_id and sender.device_id != receiver.device_id:
        return "nccl"
    return "gloo"


def check_transport(sender: str, receiver: str) -> None:
    """Both ends derived the backend on their own; a disagreement is an error now, not a hang
    (an NCCL end and a Gloo end would wait for each other until the deadline)."""
    if sender and sender != receiver:
        raise LayoutMismatchError(
            f"KV transport mismatch: the sender joins over {sender}, the receiver over {receiver}")
