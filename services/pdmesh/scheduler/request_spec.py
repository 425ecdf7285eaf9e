"""A client's GenerateRequest checked, tokenized and capped: the plain object the scheduler runs.

Every check names the field, the limit and the value; nothing reaches a worker unchecked.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from pdmesh.engine.model_config import ModelConfig
from pdmesh.engine.sampling_params import SamplingParams
from pdmesh.engine.tokenizer import Tokenizer
from pdmesh.errors import InvalidRequestError, NotFoundError

CHAT_ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_REQUEST_ID_CHARS = 128


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the scheduler knows of the served model (no weights)."""

    name: str
    config: ModelConfig
    tokenizer: Tokenizer
    max_model_len: int


@dataclass(frozen=True, slots=True)
class GenerationSpec:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stop: tuple[str, ...]
    priority: int

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + self.params.max_tokens


def prompt_ids_from(model: ModelInfo, prompt: str, messages, token_ids) -> list[int]:
    """Token ids of exactly one of prompt, messages (chat template applied) or token ids."""
    given = [name for name, value in (("prompt", prompt), ("messages", messages),
                                      ("prompt_token_ids", token_ids)) if len(value)]
    if len(given) != 1:
        raise InvalidRequestError(
            f"set exactly one of prompt, messages, prompt_token_ids; got {', '.join(given) or 'none'}", "prompt")
    if prompt:
        return model.tokenizer.encode(prompt)
    if len(messages):
        for i, m in enumerate(messages):
            if m.role not in CHAT_ROLES:
                raise InvalidRequestError(f"messages[{i}].role is {m.role[:32]!r}; must be one of "
                                          f"{', '.join(CHAT_ROLES)}", f"messages[{i}].role")
        return model.tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages])
    ids = list(token_ids)
    vocab = model.config.vocab_size
    for i, t in enumerate(ids):
        if not 0 <= t < vocab:
            raise InvalidRequestError(f"prompt_token_ids[{i}] is {t}; token ids must be in [0, {vocab:,})",
                                      f"prompt_token_ids[{i}]")
    return ids


def check_model(model: ModelInfo, name: str) -> None:
    if name and name != model.name:
        raise NotFoundError(f"model {name[:100]!r} is not served here; this cluster serves {model.name!r}")


def build_spec(pb, model: ModelInfo, default_max_tokens: int) -> GenerationSpec:
    """From a scheduler_pb2.GenerateRequest."""
    check_model(model, pb.model)
    if len(pb.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequestError(f"request_id has {len(pb.request_id)} characters; the limit is "
                                  f"{MAX_REQUEST_ID_CHARS}", "request_id")
    _check_stop(pb.stop)
    prompt_ids = prompt_ids_from(model, pb.prompt, pb.messages, pb.prompt_token_ids)
    if not prompt_ids:
        raise InvalidRequestError("prompt is empty after tokenization", "prompt")
    room = model.max_model_len - len(prompt_ids)
    if room < 1:
        raise InvalidRequestError(f"prompt has {len(prompt_ids):,} tokens; max-model-len is "
                                  f"{model.max_model_len:,}", "prompt")
    if pb.HasField("max_tokens"):
        max_tokens = pb.max_tokens
        if max_tokens < 1:
            raise InvalidRequestError(f"max_tokens is {max_tokens}; it must be at least 1", "max_tokens")
        if max_tokens > room:
            raise InvalidRequestError(
                f"prompt has {len(prompt_ids):,} tokens and max_tokens is {max_tokens:,}: "
                f"{len(prompt_ids) + max_tokens:,} exceeds max-model-len {model.max_model_len:,}", "max_tokens")
    else:
        max_tokens = min(default_max_tokens, room)
    params = SamplingParams(max_tokens=max_tokens, temperature=pb.temperature,
                            top_p=pb.top_p if pb.HasField("top_p") else 1.0, top_k=pb.top_k,
                            seed=pb.seed if pb.HasField("seed") else None, ignore_eos=pb.ignore_eos)
    return GenerationSpec(pb.request_id or uuid.uuid4().hex, prompt_ids, params, tuple(pb.stop), pb.priority)


def _check_stop(stop) -> None:
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequestError(f"stop has {len(stop)} strings; the limit is {MAX_STOP_STRINGS}", "stop")
    for i, s in enumerate(stop):
        if not s:
            raise InvalidRequestError(f"stop[{i}] is empty", f"stop[{i}]")
        if len(s) > MAX_STOP_STRING_CHARS:
            raise InvalidRequestError(f"stop[{i}] has {len(s)} characters; the limit is {MAX_STOP_STRING_CHARS}",
                                      f"stop[{i}]")
