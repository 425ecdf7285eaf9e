"""One request inside the engine: its tokens, its blocks, and where it is in its life."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from pdmesh.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # blocks not yet reserved or prompt not yet prefilled
    RUNNING = "running"  # in the decode batch
    HELD = "held"  # prefill-only: prefilled, blocks kept until its KV is exported
    FINISHED = "finished"


@dataclass(slots=True)
class EngineRequest:
    """What a caller hands the engine.

    prefill_only: compute the prompt's KV and first token, then hold the blocks for export.
    kv / first_token: the prompt's KV was computed elsewhere (a prefill worker); import it,
    start from first_token and decode. kv_start: the first prompt token kv holds; the tokens before
    it are in the cached blocks the request's reservation shares (`LLMEngine.reserve`).
    kv_transfer_params: the prompt's KV waits on another engine behind a transfer handle (vLLM's
    KV connector); the engine pulls it itself, then makes every output token, the first included.
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prefill_only: bool = False
    kv: torch.Tensor | None = None  # [layers, 2, prompt tokens from kv_start, local kv heads, head_dim]
    kv_start: int = 0
    first_token: int | None = None
    output_offset: int = 0  # output tokens before this request's (a resumed stream): seeds continue
    kv_transfer_params: dict | None = None


@dataclass(slots=True)
class EngineOutput:
    """New tokens of one request since its last output; finish_reason set on the last one."""

    request_id: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort", "error", "prefilled"
    error: str | None = None
    num_prompt_tokens: int = 0
    queue_s: float | None = None  # on the first output: seconds the request waited to be scheduled
    num_cached_tokens: int = 0  # on the first output: leading prompt tokens the prefix cache held (not computed)
    kv_transfer_params: dict | None = None  # prefill on a connector engine: the handle decode submits

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class Sequence:
    request: EngineRequest
    stop_ids: frozenset[int]
    block_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    aborted: bool = False
    arrival: float = field(default_factory=time.monotonic)
    scheduled: float | None = None  # when it left the waiting queue
    num_cached_tokens: int = 0  # leading prompt tokens whose KV came from the prefix cache
    num_computed_tokens: int = 0  # leading tokens whose KV is in the blocks
    prefill_end: int = 0  # where the prompt chunk of the step being run ends (BatchScheduler.schedule)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of its full blocks so far

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.request.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_ids) + len(self.output_ids)

    @property
    def num_reserved_tokens(self) -> int:
        """Tokens reserved up front (prompt + max_tokens), so a running sequence never runs out of KV.
        A prefill-only sequence never stores more than its prompt."""
        if self.request.prefill_only:
            return self.num_prompt_tokens
        return self.num_prompt_tokens + self.params.max_tokens

    def finish_reason_after(self, token: int, max_model_len: int) -> str | None:
        """Why the sequence ends once `token` has been appended, or None if it goes on."""
        if token in self.stop_ids:
            return "stop"
        if len(self.output_ids) >= self.params.max_tokens or self.num_tokens >= max_model_len:
            return "length"
        return None
