"""Cache-aware routing: how much of a prompt a worker's prefix cache holds, and the load bound
that keeps affinity from piling every request onto the worker that holds it.

Workers report the chained hashes of their most recently used cached blocks in every heartbeat
(`WorkerLoad.cached_block_hashes`, bounded). The scheduler hashes the prompt the same way
(`pdmesh.engine.prefix_hash`, seeded by the worker's model, at the worker's block size) and counts
the leading blocks the worker holds. A report is up to a heartbeat old: a match is a hint for
routing, never a promise (the engine looks its cache up again).
"""

from __future__ import annotations

from pdmesh.engine.prefix_hash import block_hashes, model_seed
from pdmesh.scheduler.registry import WorkerInfo

# Decode workers within this load of the lightest one may be chosen for the prefix they hold:
# running + pending streams at most max(lightest x DECODE_LOAD_FACTOR, lightest + DECODE_LOAD_SLACK).
DECODE_LOAD_FACTOR = 1.5
DECODE_LOAD_SLACK = 2


class PromptBlocks:
    """One prompt's block hashes, computed once per (model, block size) a worker asks for."""

    def __init__(self, prompt_ids: list[int]):
        self.prompt_ids = prompt_ids
        self._hashes: dict[tuple[str, int], list[int]] = {}

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids)

    def matched_tokens(self, worker: WorkerInfo) -> int:
        """Leading prompt tokens whose blocks the worker reported cached (never the last token:
        the engine always computes it)."""
        cached, block_size = worker.load.cached_block_hashes, max(1, worker.load.block_size)
        if not cached:
            return 0
        key = (worker.pairing.model, block_size)
        if key not in self._hashes:
            usable = (len(self.prompt_ids) - 1) // block_size * block_size
            self._hashes[key] = block_hashes(self.prompt_ids[:usable], block_size, model_seed(worker.pairing.model))
        matched = 0
        for block_hash in self._hashes[key]:
            if block_hash not in cached:
                break
            matched += 1
        return matched * block_size


def prefill_cost(worker: WorkerInfo, prompt: PromptBlocks | None) -> int:
    """Prompt tokens the worker must compute before this prompt's first token: its queue, then the
    part of this prompt it does not hold. Affinity thus wins a worker at most the tokens it saves;
    a queue longer than that sends the prompt elsewhere (which then caches the prefix too)."""
    queued = worker.load.queued_prompt_tokens + worker.pending_prompt_tokens
    if prompt is None:
        return queued
    return queued + prompt.num_tokens - prompt.matched_tokens(worker)


def decode_streams(worker: WorkerInfo) -> int:
    return worker.load.running + worker.pending_requests


def within_decode_bound(candidates: list[WorkerInfo]) -> list[WorkerInfo]:
    """The candidates whose streams stay within the load bound of the lightest candidate."""
    lightest = min(decode_streams(w) for w in candidates)
    bound = max(lightest * DECODE_LOAD_FACTOR, lightest + DECODE_LOAD_SLACK)
    return [w for w in candidates if decode_streams(w) <= bound]
