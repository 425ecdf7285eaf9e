"""OpenAI request bodies (`/v1/chat/completions`, `/v1/completions`) as a `GenerateRequest`.

Types are checked here, each refusal naming the field and the value; the caps (prompt length,
max_tokens, stop strings, sampling ranges) are checked by `build_spec`, as for gRPC. Fields that
would change the answer and that pdmesh cannot honour (`n` > 1, logprobs, tools, penalties...) are
refused rather than ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdmesh.errors import InvalidRequestError
from pdmesh.scheduler.generate_request import ChatMessage, GenerateRequest

INT64 = (-(2**63), 2**63 - 1)
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role
# field -> the values that mean "not used"; anything else is refused
UNSUPPORTED = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


@dataclass(frozen=True, slots=True)
class OpenAIRequest:
    generate: GenerateRequest
    chat: bool  # /v1/chat/completions (else /v1/completions)
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with usage
    max_tokens_field: str  # which field set max_tokens, to name it in errors


def parse_chat(body: Any, request_id: str = "") -> OpenAIRequest:
    body = _object(body)
    messages = _list(body, "messages", required=True)
    parsed = tuple(_message(m, f"messages[{i}]") for i, m in enumerate(messages))
    return _request(body, True, request_id, messages=parsed)


def parse_completion(body: Any, request_id: str = "") -> OpenAIRequest:
    body = _object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return _request(body, False, request_id, prompt=prompt)
    if isinstance(prompt, list) and all(_is_int(t) for t in prompt):
        return _request(body, False, request_id, prompt_token_ids=tuple(prompt))
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise InvalidRequestError(f"prompt holds {len(prompt)} prompts; pdmesh takes one prompt per request",
                                  "prompt")
    raise InvalidRequestError(f"prompt is {_show(prompt)}; it must be a string or a list of token ids", "prompt")


def _request(body: dict, chat: bool, request_id: str, **prompt: Any) -> OpenAIRequest:
    _check_unsupported(body)
    n = _int(body, "n")
    if n not in (None, 1):
        raise InvalidRequestError(f"n is {n}; pdmesh returns one choice per request (n must be 1)", "n")
    _string(body, "user")
    max_tokens_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    stream = _bool(body, "stream")
    options = _object(body.get("stream_options") or {}, "stream_options")
    generate = GenerateRequest(
        **prompt, model=_string(body, "model"), max_tokens=_int(body, max_tokens_field),
        temperature=_number(body, "temperature", 1.0), top_p=_number(body, "top_p", None),
        top_k=_int(body, "top_k") or 0, seed=_int(body, "seed"), stop=_stop(body.get("stop")),
        ignore_eos=_bool(body, "ignore_eos"), priority=_int(body, "priority") or 0, request_id=request_id)
    return OpenAIRequest(generate, chat, stream, stream and _bool(options, "include_usage", "stream_options."),
                         max_tokens_field)


def _message(m: Any, where: str) -> ChatMessage:
    m = _object(m, where)
    role = m.get("role")
    if not isinstance(role, str):
        raise InvalidRequestError(f"{where}.role is {_show(role)}; it must be a string", f"{where}.role")
    return ChatMessage(ROLE_ALIASES.get(role, role), _content(m.get("content"), f"{where}.content"))


def _content(content: Any, where: str) -> str:
    """A string, or a list of text parts (joined); other parts (images, audio) are refused."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise InvalidRequestError(f"{where} is {_show(content)}; it must be a string or a list of parts", where)
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise InvalidRequestError(f"{where}[{i}] is a {_show(kind)} part; pdmesh takes text parts only",
                                      f"{where}[{i}]")
        texts.append(part["text"])
    return "".join(texts)


def _check_unsupported(body: dict) -> None:
    for name, unused in UNSUPPORTED.items():
        if name in body and body[name] not in unused:
            raise InvalidRequestError(f"{name} is {_show(body[name])}; pdmesh does not support {name}", name)


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise InvalidRequestError(f"stop is {_show(stop)}; it must be a string or a list of strings", "stop")


def _object(value: Any, where: str = "body") -> dict:
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{where} is {_show(value)}; it must be a JSON object", where)
    return value


def _list(body: dict, name: str, required: bool = False) -> list:
    value = body.get(name)
    if value is None and not required:
        return []
    if not isinstance(value, list) or (required and not value):
        raise InvalidRequestError(f"{name} is {_show(value)}; it must be a non-empty list", name)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise InvalidRequestError(f"{name} is {_show(value)}; it must be an integer", name)
    if not INT64[0] <= value <= INT64[1]:
        raise InvalidRequestError(f"{name} is {value}; it must fit in 64 bits", name)
    return value


def _number(body: dict, name: str, default: float | None) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(f"{name} is {_show(value)}; it must be a number", name)
    return float(value)


def _bool(body: dict, name: str, prefix: str = "") -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{prefix}{name} is {_show(value)}; it must be true or false", prefix + name)
    return value


def _string(body: dict, name: str) -> str:
    value = body.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidRequestError(f"{name} is {_show(value)}; it must be a string", name)
    return value


def _show(value: Any) -> str:
    """A value for an error message, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
