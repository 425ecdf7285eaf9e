"""A client's generation request as plain Python: what the gRPC servicer and the HTTP front door
both hand to the scheduler (each converts its own wire format once, at its edge)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """Exactly one of prompt, messages or prompt_token_ids; None means "not set" (the caps decide)."""

    prompt: str = ""
    messages: tuple[ChatMessage, ...] = ()
    prompt_token_ids: tuple[int, ...] = ()
    model: str = ""
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    priority: int = 0
    request_id: str = ""
