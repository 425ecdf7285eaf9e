"""A client's GenerateRequest (plain Python) checked, tokenized and capped: the plain object the scheduler runs.

Every check names the field, the limit and the value; nothing reaches a worker unchecked.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass

from pdmesh.config import SchedulerConfig
from pdmesh.engine.model_config import ModelConfig
from pdmesh.engine.sampling_params import SamplingParams
from pdmesh.engine.tokenizer import Tokenizer
from pdmesh.errors import InvalidRequestError, NotFoundError
from pdmesh.scheduler.generate_request import GenerateRequest

CHAT_ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = SchedulerConfig().max_stop_strings  # defaults of the flags
MAX_STOP_STRING_CHARS = SchedulerConfig().max_stop_string_chars
MAX_REQUEST_ID_CHARS = 128


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the scheduler knows of the served model (no weights)."""

    name: str
    config: ModelConfig
    tokenizer: Tokenizer
    max_model_len: int


@dataclass(frozen=True, slots=True)
class Caps:
    """Hard limits checked before any worker sees a request (flags of pdmesh scheduler/serve)."""

    max_model_len: int
    max_prompt_tokens: int
    max_output_tokens: int
    default_max_tokens: int
    max_stop_strings: int = MAX_STOP_STRINGS
    max_stop_string_chars: int = MAX_STOP_STRING_CHARS

    @staticmethod
    def resolve(max_model_len: int, max_prompt_tokens: int, max_output_tokens: int,
                default_max_tokens: int, max_stop_strings: int = MAX_STOP_STRINGS,
                max_stop_string_chars: int = MAX_STOP_STRING_CHARS) -> "Caps":
        """0 means "as large as max_model_len allows"."""
        most = max_model_len - 1
        return Caps(max_model_len, min(max_prompt_tokens or most, most), min(max_output_tokens or most, most),
                    default_max_tokens, max_stop_strings, max_stop_string_chars)

    def describe(self) -> str:
        return (f"max-model-len {self.max_model_len:,}, max-prompt-tokens {self.max_prompt_tokens:,}, "
                f"max-output-tokens {self.max_output_tokens:,}, default max_tokens {self.default_max_tokens:,}")


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
                                      f"prompt_token_ids[{i}]", limit=vocab - 1, value=t)
    return ids


def check_model(model: ModelInfo, name: str) -> None:
    if name and name != model.name:
        raise NotFoundError(f"model {name[:100]!r} is not served here; this cluster serves {model.name!r}")


def build_spec(request: GenerateRequest, model: ModelInfo, caps: Caps) -> GenerationSpec:
    """Every cap checked, the prompt tokenized."""
    check_model(model, request.model)
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequestError(f"request_id has {len(request.request_id)} characters; the limit is "
                                  f"{MAX_REQUEST_ID_CHARS}", "request_id", MAX_REQUEST_ID_CHARS,
                                  len(request.request_id))
    _check_stop(request.stop, caps)
    prompt_ids = prompt_ids_from(model, request.prompt, request.messages, request.prompt_token_ids)
    if not prompt_ids:
        raise InvalidRequestError("prompt is empty after tokenization", "prompt")
    n = len(prompt_ids)
    if n > caps.max_prompt_tokens:
        limit = "max-model-len is" if caps.max_prompt_tokens == caps.max_model_len - 1 else "max-prompt-tokens is"
        bound = caps.max_model_len if limit.startswith("max-model") else caps.max_prompt_tokens
        raise InvalidRequestError(f"prompt has {n:,} tokens; {limit} {bound:,}", "prompt", caps.max_prompt_tokens, n)
    room = caps.max_model_len - n
    max_tokens = _max_tokens(request, n, room, caps)
    params = SamplingParams(max_tokens=max_tokens, temperature=request.temperature,
                            top_p=1.0 if request.top_p is None else request.top_p, top_k=request.top_k,
                            seed=request.seed, ignore_eos=request.ignore_eos)
    return GenerationSpec(request.request_id or new_request_id(), prompt_ids, params, tuple(request.stop),
                          request.priority)


_ID_PREFIX = uuid.uuid4().hex[:12]  # unique per scheduler process; a counter makes each id unique in it
_ids = itertools.count()


def new_request_id() -> str:
    return f"{_ID_PREFIX}-{next(_ids)}"


def _max_tokens(request: GenerateRequest, num_prompt: int, room: int, caps: Caps) -> int:
    if request.max_tokens is None:
        return min(caps.default_max_tokens, caps.max_output_tokens, room)
    max_tokens = request.max_tokens
    if max_tokens < 1:
        raise InvalidRequestError(f"max_tokens is {max_tokens:,}; it must be at least 1", "max_tokens", 1, max_tokens)
    if max_tokens > caps.max_output_tokens:
        raise InvalidRequestError(f"max_tokens is {max_tokens:,}; max-output-tokens is {caps.max_output_tokens:,}",
                                  "max_tokens", caps.max_output_tokens, max_tokens)
    if max_tokens > room:
        raise InvalidRequestError(
            f"prompt has {num_prompt:,} tokens and max_tokens is {max_tokens:,}: "
            f"{num_prompt + max_tokens:,} exceeds max-model-len {caps.max_model_len:,}", "max_tokens",
            room, max_tokens)
    return max_tokens


def _check_stop(stop, caps: Caps) -> None:
    if len(stop) > caps.max_stop_strings:
        raise InvalidRequestError(f"stop has {len(stop):,} strings; the limit is {caps.max_stop_strings:,} "
                                  "(--max-stop-strings)", "stop", caps.max_stop_strings, len(stop))
    for i, s in enumerate(stop):
        if not s:
            raise InvalidRequestError(f"stop[{i}] is empty", f"stop[{i}]")
        if len(s) > caps.max_stop_string_chars:
            raise InvalidRequestError(f"stop[{i}] has {len(s):,} characters; the limit is "
                                      f"{caps.max_stop_string_chars:,} (--max-stop-string-chars)", f"stop[{i}]",
                                      caps.max_stop_string_chars, len(s))
