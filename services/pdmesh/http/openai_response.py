"""OpenAI response objects (chat and text completions, whole and as stream chunks) from deltas."""

from __future__ import annotations

import time
from typing import Any

from pdmesh.scheduler.request_spec import ModelInfo
from pdmesh.scheduler.stream import Delta


class CompletionShape:
    """The JSON of one request's answer: `chat.completion(.chunk)` or `text_completion`."""

    def __init__(self, chat: bool, request_id: str, model: str):
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"
        self.model = model
        self.created = int(time.time())

    def whole(self, text: str, last: Delta) -> dict[str, Any]:
        """The non-streaming answer."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": last.finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": last.finish_reason, "logprobs": None}
        return self._envelope("chat.completion" if self.chat else "text_completion", [choice], usage(last))

    def role_chunk(self) -> dict[str, Any]:
        """A chat stream's first chunk (OpenAI sends the role before any text)."""
        return self.chunk(None, role=True)

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False) -> dict[str, Any]:
        """A stream chunk: text (None: no text, the finishing chunk's empty delta) and/or the finish reason."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        return self._envelope(self._chunk_object(), [choice])

    def usage_chunk(self, last: Delta) -> dict[str, Any]:
        """stream_options.include_usage: one more chunk, no choices, the request's usage."""
        return self._envelope(self._chunk_object(), [], usage(last))

    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _envelope(self, kind: str, choices: list, usage_: dict | None = None) -> dict[str, Any]:
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if usage_ is not None:
            body["usage"] = usage_
        return body


def usage(last: Delta) -> dict[str, int]:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens}


def models_list(model: ModelInfo, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model.name, "object": "model", "created": created,
                                        "owned_by": "pdmesh", "max_model_len": model.max_model_len}]}
