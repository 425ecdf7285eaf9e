"""Which workers can hand KV to each other: checked once, when a worker registers.

A prefill worker and a decode worker pair only if they serve the same model with the same engine
kind and their KV layouts agree (layers, KV heads, head dim, dtype; tensor-parallel shards may
differ: a hand-off carries every head). A worker that cannot pair with a live worker of the other
role is refused at registration with FAILED_PRECONDITION naming both sides, rather than failing
at its first hand-off.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdmesh.engine.kv_cache import KVLayout
from pdmesh.errors import FailedPreconditionError


class PairingError(FailedPreconditionError):
    """A registering worker cannot hand KV to (or take it from) the workers of the other role."""


@dataclass(frozen=True, slots=True)
class Pairing:
    """What a worker must share with its peers of the other role."""

    model: str = ""
    engine: str = "pdmesh"
    layout: KVLayout | None = None  # None: not reported (nothing to compare)

    def describe(self) -> str:
        layout = self.layout
        kv = "" if layout is None else (f", KV {layout.num_layers} layers x {layout.num_kv_heads} heads x "
                                        f"{layout.head_dim} {layout.dtype}")
        return f"model {self.model or '?'}, engine {self.engine}{kv}"

    def mismatch(self, other: "Pairing") -> str | None:
        """The first thing that differs between self and other, or None if they can pair."""
        if self.engine != other.engine:
            return "engine kind"
        if self.model and other.model and self.model != other.model:
            return "model"
        if self.layout is not None and other.layout is not None:
            for name in ("num_layers", "num_kv_heads", "head_dim", "dtype"):
                if getattr(self.layout, name) != getattr(other.layout, name):
                    return f"KV {name}"
        return None


def check_pairing(worker_id: str, role: str, pairing: Pairing, peers: list[tuple[str, str, Pairing]]) -> None:
    """Raise PairingError if the worker cannot pair with any of peers ((id, role, pairing) of live
    workers of the other role)."""
    for peer_id, peer_role, peer in peers:
        what = pairing.mismatch(peer)
        if what:
            raise PairingError(
                f"{role} worker {worker_id} cannot pair with {peer_role} worker {peer_id}: {what} differs "
                f"({worker_id}: {pairing.describe()}; {peer_id}: {peer.describe()})")
