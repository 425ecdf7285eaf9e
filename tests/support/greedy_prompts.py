"""The prompts the greedy-equality tests run through each engine (chat and raw text)."""

from __future__ import annotations

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Write a haiku about the sea."}],
]
RAW = ["The quick brown fox", "def fibonacci(n):\n    "]


def greedy_prompt_ids(tokenizer) -> list[list[int]]:
    """CHATS through the chat template, then RAW as plain text."""
    return [tokenizer.apply_chat_template(c) for c in CHATS] + [tokenizer.encode(t) for t in RAW]
