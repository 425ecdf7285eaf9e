"""Picks the workers for a request: the decode worker with room for its blocks, the prefill
worker with the least prompt tokens to compute before it; both weigh the prompt prefix a worker's
cache holds against its load (`prefix_affinity`)."""

from __future__ import annotations

from pdmesh.errors import InvalidRequestError, ResourceExhaustedError, UnavailableError
from pdmesh.scheduler.prefix_affinity import PromptBlocks, decode_streams, prefill_cost, within_decode_bound
from pdmesh.scheduler.registry import WorkerInfo, WorkerRegistry


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // max(1, block_size))


class Assignment:
    """A request counted against its workers until their own load reports include it.

    The prefill worker's share (the prompt tokens it computes: those its prefix cache lacks, as
    last reported) ends with the first token. The decode
    worker's blocks stay counted until a heartbeat that was sent after the request started there:
    only that heartbeat's free-block count includes the reservation, so nothing is admitted twice
    onto the same blocks.
    """

    def __init__(self, decode: WorkerInfo, prefill: WorkerInfo | None, num_prompt_tokens: int, num_tokens: int,
                 num_cached_tokens: int = 0):
        self.decode, self.prefill = decode, prefill
        self.blocks = blocks_for(num_tokens, decode.load.block_size)
        self.prompt_tokens = num_prompt_tokens - num_cached_tokens if prefill is not None else 0
        self.counted_blocks = self.counted_prompt = True
        self.started_at: float | None = None
        decode.pending_requests += 1
        decode.pending_blocks += self.blocks
        if prefill is not None:
            prefill.pending_prompt_tokens += self.prompt_tokens

    def start(self, now: float) -> None:
        """The first token arrived: the prefill is done and the decode worker holds the blocks."""
        self._release_prompt()
        if self.started_at is None and self.counted_blocks:
            self.started_at = now
            self.decode.awaiting_heartbeat.append(self)

    def settle(self) -> None:
        """Stop counting at once (the request never started, or its worker reported it)."""
        self._release_prompt()
        if self.counted_blocks:
            self.counted_blocks = False
            self.decode.pending_requests -= 1
            self.decode.pending_blocks -= self.blocks

    def _release_prompt(self) -> None:
        if self.counted_prompt:
            self.counted_prompt = False
            if self.prefill is not None:
                self.prefill.pending_prompt_tokens -= self.prompt_tokens


class Router:
    def __init__(self, registry: WorkerRegistry):
        self.registry = registry

    def pick_decode(self, num_tokens: int, exclude: frozenset[str] = frozenset(),
                    prompt: PromptBlocks | None = None) -> WorkerInfo:
        """The decode worker with the most free blocks (after what we already sent it) that fits; or,
        within the load bound, the one holding the longest prefix of the prompt."""
        candidates = [w for w in self.registry.routable("decode") if w.worker_id not in exclude]
        if not candidates:
            raise UnavailableError("no healthy decode worker is registered")
        if all(w.load.kv_blocks_total < blocks_for(num_tokens, w.load.block_size) for w in candidates):
            most = max(w.load.kv_blocks_total * w.load.block_size for w in candidates)
            raise InvalidRequestError(f"prompt + max_tokens is {num_tokens:,} tokens; the largest decode worker's "
                                      f"KV cache holds {most:,}", "max_tokens", most, num_tokens)
        fits = [w for w in candidates if free_blocks(w) >= blocks_for(num_tokens, w.load.block_size)]
        if not fits:
            best = max(free_blocks(w) for w in candidates)
            raise ResourceExhaustedError(
                f"no decode worker has room for {num_tokens:,} tokens of KV now "
                f"(most free: {best:,} blocks)", retry_after_s=1.0)
        roomiest = max(fits, key=lambda w: (free_blocks(w), -decode_streams(w)))
        if prompt is None:
            return roomiest
        holder = max(within_decode_bound(fits),
                     key=lambda w: (prompt.matched_tokens(w), free_blocks(w), -decode_streams(w)))
        return holder if prompt.matched_tokens(holder) > prompt.matched_tokens(roomiest) else roomiest

    @staticmethod
    def assign(decode: WorkerInfo, prefill: WorkerInfo | None, num_prompt_tokens: int, num_tokens: int,
               prompt: PromptBlocks | None) -> Assignment:
        """Count the request against the workers picked for it."""
        cached = prompt.matched_tokens(prefill) if prompt is not None and prefill is not None else 0
        return Assignment(decode, prefill, num_prompt_tokens, num_tokens, cached)

    def pick_prefill(self, decode: WorkerInfo | None = None, exclude: frozenset[str] = frozenset(),
                     prompt: PromptBlocks | None = None) -> WorkerInfo:
        """The prefill worker that can hand KV to `decode` (any, when None) with the fewest prompt
        tokens to compute before this prompt's first token: its queue plus the part of the prompt
        its cache lacks."""
        candidates = [w for w in self.registry.routable("prefill")
                      if w.worker_id not in exclude and pairs(w, decode)]
        if not candidates:
            raise UnavailableError("no healthy prefill worker is registered" + (
                f" that pairs with decode worker {decode.worker_id} ({decode.pairing.describe()})" if decode else ""))
        return min(candidates, key=lambda w: prefill_cost(w, prompt))

    def pick_prefill_for(self, num_prompt_tokens: int, local_threshold: int,
                         decode: WorkerInfo | None = None, prompt: PromptBlocks | None = None) -> WorkerInfo | None:
        """The prefill worker for a prompt, or None: the decode worker prefills it itself (a prompt
        under local_threshold, or no prefill worker that pairs with it routable now, e.g. while one
        restarts)."""
        if num_prompt_tokens < local_threshold:
            return None
        try:
            return self.pick_prefill(decode, prompt=prompt)
        except UnavailableError:
            return None

    def prefill_fallbacks(self, chosen: WorkerInfo, limit: int = 2) -> list[str]:
        """Addresses of other routable prefill workers that pair like `chosen`, least loaded first,
        to try if chosen fails."""
        others = [w for w in self.registry.routable("prefill")
                  if w.worker_id != chosen.worker_id and w.pairing.mismatch(chosen.pairing) is None]
        others.sort(key=lambda w: w.load.queued_prompt_tokens + w.pending_prompt_tokens)
        return [w.address for w in others[:limit]]


def pairs(prefill: WorkerInfo, decode: WorkerInfo | None) -> bool:
    """Whether prefill can hand KV to decode. Registration refuses a mismatched worker, but one that
    joined while its mismatched peer was silent meets it again here, when that peer comes back."""
    return decode is None or prefill.pairing.mismatch(decode.pairing) is None


def free_blocks(worker: WorkerInfo) -> int:
    return worker.load.kv_blocks_free - worker.pending_blocks
