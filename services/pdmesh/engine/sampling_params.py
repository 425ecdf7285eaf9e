"""Per-request sampling settings."""

from __future__ import annotations

from dataclasses import dataclass

from pdmesh.errors import InvalidRequestError


MIN_SAMPLING_TEMPERATURE = 1e-4


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 (or below 1e-4) means greedy."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens", 1,
                                      self.max_tokens)
        if not self.temperature >= 0.0:  # also catches NaN
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}", "temperature", 0,
                                      self.temperature)
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p", "(0, 1]", self.top_p)
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {self.top_k}", "top_k", 0, self.top_k)

    @property
    def greedy(self) -> bool:
        # Below this, dividing logits by the temperature overflows float32: the result is argmax anyway.
        return self.temperature < MIN_SAMPLING_TEMPERATURE
