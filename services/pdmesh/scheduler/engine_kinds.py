"""Workers pair only with workers of their own engine kind: pdmesh's engine and vLLM lay KV out
differently (and vLLM hands off through its own connector), so no hand-off between kinds can work.
Checked when a worker registers (refused, naming both sides) and again when the router pairs."""

from __future__ import annotations

from typing import Callable, Iterable, Protocol

from pdmesh.errors import FailedPreconditionError


class EngineKindMismatchError(FailedPreconditionError):
    """A worker's engine kind differs from that of the healthy workers already registered."""


class _Worker(Protocol):
    worker_id: str
    role: str
    engine_kind: str


def check_engine_kind(worker_id: str, role: str, engine_kind: str, registered: Iterable[_Worker],
                      healthy: Callable[[_Worker], bool]) -> None:
    """Refuse a worker whose engine kind differs from a healthy registered worker's. An empty kind
    (a worker that predates the field) pairs with any."""
    for other in registered:
        if other.worker_id != worker_id and not compatible(engine_kind, other.engine_kind) and healthy(other):
            raise EngineKindMismatchError(
                f"{role} worker {worker_id} runs the {engine_kind} engine, but {other.role} worker "
                f"{other.worker_id} runs the {other.engine_kind} engine: KV moves only between workers of "
                f"one engine kind (run every worker with --engine {other.engine_kind}, or stop "
                f"{other.worker_id} first)")


def compatible(kind: str, other_kind: str) -> bool:
    return not kind or not other_kind or kind == other_kind
