"""The requests a benchmark sends, made from its config and seed alone (the same seed sends the
same prompts, lengths and arrival times to every target)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from pdmesh.bench.bench_config import BenchConfig

FIRST_ID, LAST_ID = 1_000, 10_000  # ordinary token ids of any 32k+ vocabulary, away from special tokens
WORDS = ("time", "people", "water", "world", "house", "light", "river", "story", "garden", "music", "paper",
         "market", "city", "winter", "window", "forest", "letter", "island", "engine", "number")
# The chat mix: (weight, prompt length range, output length range), both as multiples of a mean
# that is scaled to --prompt-tokens / --output-tokens.
CHAT_MIX = (
    (0.45, (0.1, 0.5), (0.5, 1.5)),  # short questions
    (0.30, (1.0, 2.5), (0.75, 1.5)),  # conversations with history
    (0.10, (2.5, 4.5), (0.5, 1.0)),  # documents to summarize
    (0.15, (0.5, 1.5), (1.0, 2.5)),  # code
)


@dataclass(frozen=True, slots=True)
class BenchRequest:
    index: int
    prompt_ids: tuple[int, ...]
    output_tokens: int
    send_at_s: float  # open loop: offset from the start; closed loop: 0

    def prompt_text(self) -> str:
        """The prompt as words (about one token each), for chat endpoints."""
        return " ".join(WORDS[t % len(WORDS)] for t in self.prompt_ids)


def make_workload(config: BenchConfig, count: int, seed_offset: int = 0) -> list[BenchRequest]:
    rng = random.Random(config.seed + seed_offset)
    prefix = tuple(rng.randrange(FIRST_ID, LAST_ID) for _ in range(config.shared_prefix))
    offsets = arrival_offsets(config, count, rng)
    requests = []
    for i in range(count):
        prompt_len, output_len = lengths(config, rng)
        body = tuple(rng.randrange(FIRST_ID, LAST_ID) for _ in range(max(1, prompt_len - len(prefix))))
        requests.append(BenchRequest(i, prefix + body, output_len, offsets[i]))
    return requests


def lengths(config: BenchConfig, rng: random.Random) -> tuple[int, int]:
    """(prompt tokens, output tokens) of one request."""
    p, o = config.prompt_tokens, config.output_tokens
    if config.lengths == "uniform":
        s = config.spread
        return round(rng.uniform(p * (1 - s), p * (1 + s))) or 1, round(rng.uniform(o * (1 - s), o * (1 + s))) or 1
    if config.lengths == "chat":
        _, prompt_range, output_range = rng.choices(CHAT_MIX, weights=[c[0] for c in CHAT_MIX])[0]
        p_scale, o_scale = p / _mean(1), o / _mean(2)
        return (max(1, round(rng.uniform(*prompt_range) * p_scale)),
                max(1, round(rng.uniform(*output_range) * o_scale)))
    return p, o


def _mean(column: int) -> float:
    """The chat mix's mean multiple of prompt (column 1) or output (column 2) length."""
    return sum(c[0] * (c[column][0] + c[column][1]) / 2 for c in CHAT_MIX)


def arrival_offsets(config: BenchConfig, count: int, rng: random.Random) -> list[float]:
    """Open loop: gamma inter-arrival times (shape = burstiness, mean 1/rate); closed loop: zeros."""
    if not config.rate:
        return [0.0] * count
    shape = config.burstiness
    offsets, now = [], 0.0
    for _ in range(count):
        offsets.append(now)
        now += rng.gammavariate(shape, 1.0 / (config.rate * shape))
    return offsets
