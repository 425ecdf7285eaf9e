"""What one benchmark request measured: when it was sent, when each chunk of tokens came, how it ended."""

from __future__ import annotations

from dataclasses import dataclass, field

OK = "OK"


@dataclass
class RequestRecord:
    index: int
    sent: float  # perf_counter()
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk that carried text
    end: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    status: str = "incomplete"  # OK, a gRPC status name, HTTP <code>, CONNECTION, ...
    error: str = ""  # what the server or the connection said, when it failed

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times[0] - self.sent if self.chunk_times else None

    @property
    def e2e_s(self) -> float:
        return self.end - self.sent

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (end - first token) / (output tokens - 1)."""
        if not self.chunk_times or self.output_tokens < 2:
            return None
        return (self.end - self.chunk_times[0]) / (self.output_tokens - 1)

    def itls_s(self) -> list[float]:
        """Gaps between successive chunks (a chunk is one token on pdmesh and most servers)."""
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]
