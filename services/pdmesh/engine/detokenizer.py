"""Streaming detokenization: token ids in, text deltas out, never half a UTF-8 character."""

from __future__ import annotations

from pdmesh.engine.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas whose concatenation is `decode(all_ids)`.

    Byte-level tokens can end inside a multi-byte character; decoding then ends in U+FFFD. Such a
    tail is held back until a later token completes it (or `flush()` gives it up as it is). Each
    step decodes only the ids since the last clean boundary, so the cost does not grow with length.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        # ids[prefix_offset:read_offset] is text already emitted, decoded again as left context
        # so that the next delta is taken relative to the same decoding.
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token_ids: list[int]) -> str:
        """Append `token_ids`; return the newly complete text (possibly empty)."""
        self._ids.extend(token_ids)
        prefix_text, new_text = self._window()
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        return self._advance(new_text[len(prefix_text):])

    def flush(self) -> str:
        """Whatever is still held back, replacement characters included; call once at the end."""
        prefix_text, new_text = self._window()
        return self._advance(new_text[len(prefix_text):])

    def _window(self) -> tuple[str, str]:
        decode = self._tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset:self._read_offset], self._skip_special_tokens)
        new = decode(self._ids[self._prefix_offset:], self._skip_special_tokens)
        return prefix, new

    def _advance(self, delta: str) -> str:
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return delta
