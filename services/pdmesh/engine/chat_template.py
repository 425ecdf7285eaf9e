"""A checkpoint's Jinja chat template, rendered the way transformers renders it.

Templates come from model files, so they are untrusted code: they run in jinja2's immutable
sandbox, with the same options and helpers as transformers' `apply_chat_template` so the text
(and so the token ids) match.
"""

from __future__ import annotations

import json
from datetime import datetime

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pdmesh.errors import CheckpointError, InvalidRequestError


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; render the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters, which would change the prompt text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template plus the special-token strings it may refer to."""

    def __init__(self, source: str, special_tokens: dict[str, str]):
        """`special_tokens` maps template variables (`bos_token`, `eos_token`, ...) to token text."""
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateError as exc:
            raise CheckpointError(f"chat template does not compile: {exc}") from exc
        self.source = source
        self._special_tokens = {k: v for k, v in special_tokens.items() if v is not None}

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages`; a template's own refusal becomes InvalidRequestError."""
        if not messages:
            raise InvalidRequestError("conversation has no messages", field="messages")
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message:
                raise InvalidRequestError(f"message {index} has no role", field="messages")
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self._special_tokens)
        except jinja2.exceptions.TemplateError as exc:
            raise InvalidRequestError(f"chat template rejected the conversation: {exc}",
                                      field="messages") from exc
