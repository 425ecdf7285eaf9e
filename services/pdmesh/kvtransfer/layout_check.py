"""Both ends of a hand-off check the other's KV layout before any byte moves."""

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
