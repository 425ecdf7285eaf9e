"""Rebuild a byte-level BPE `tokenizers.Tokenizer` from a GGUF file's `tokenizer.ggml.*` metadata.

A GGUF carries no tokenizer.json: only the vocabulary, merges, token types and the *name* of the
pre-tokenizer (`tokenizer.ggml.pre`). Each name maps to the split rules the merges were learned
with; we reproduce the Hugging Face tokenizer.json of the original model for the names we know.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from pdmesh.errors import CheckpointError

# llama.cpp token types (gguf.TokenType): control tokens are the special ones (<|im_end|>, ...),
# user-defined ones are added tokens matched whole but not special.
_CONTROL = int(gguf.TokenType.CONTROL)
_USER_DEFINED = int(gguf.TokenType.USER_DEFINED)

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _PreTokenization:
    """How one `tokenizer.ggml.pre` value splits text before BPE."""

    split: str | None  # a regex applied before ByteLevel, or None for ByteLevel's own GPT-2 regex
    digits: bool = False  # each digit its own piece first (SmolLM, StarCoder)
    nfc: bool = False  # Unicode NFC first (Qwen2's tokenizer.json has this normalizer)
    ignore_merges: bool = False  # a word already in the vocabulary is not merged (Llama 3)


PRE_TOKENIZATIONS = {
    "default": _PreTokenization(split=None),
    "gpt2": _PreTokenization(split=None),
    "gpt-2": _PreTokenization(split=None),
    "smollm": _PreTokenization(split=None, digits=True),
    "starcoder": _PreTokenization(split=None, digits=True),
    "llama-bpe": _PreTokenization(split=_LLAMA3_SPLIT, ignore_merges=True),
    "llama3": _PreTokenization(split=_LLAMA3_SPLIT, ignore_merges=True),
    "llama-v3": _PreTokenization(split=_LLAMA3_SPLIT, ignore_merges=True),
    "qwen2": _PreTokenization(split=_QWEN2_SPLIT, nfc=True),
    "deepseek-r1-qwen": _PreTokenization(split=_QWEN2_SPLIT, nfc=True),
}


@dataclass(frozen=True)
class GGUFVocab:
    """The `tokenizer.ggml.*` fields a byte-level BPE needs."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    bos_token_id: int | None
    add_bos: bool
    eos_token_id: int | None
    add_eos: bool


def read_vocab(reader: gguf.GGUFReader) -> GGUFVocab:
    """The tokenizer fields of an open GGUF file; a non-BPE tokenizer is a CheckpointError."""

    def field(key, default=None):
        value = reader.fields.get(key)
        return default if value is None else value.contents()

    model = field("tokenizer.ggml.model")
    if model != "gpt2":
        raise CheckpointError(f"tokenizer model {model!r} is not supported; only byte-level BPE ('gpt2')")
    tokens = field("tokenizer.ggml.tokens")
    merges = field("tokenizer.ggml.merges")
    if not tokens or not merges:
        raise CheckpointError("GGUF file has no tokenizer.ggml.tokens / tokenizer.ggml.merges")
    return GGUFVocab(
        tokens=tokens,
        token_types=field("tokenizer.ggml.token_type") or [1] * len(tokens),
        merges=merges,
        pre=field("tokenizer.ggml.pre", "default"),
        bos_token_id=field("tokenizer.ggml.bos_token_id"),
        add_bos=bool(field("tokenizer.ggml.add_bos_token", False)),
        eos_token_id=field("tokenizer.ggml.eos_token_id"),
        add_eos=bool(field("tokenizer.ggml.add_eos_token", False)),
    )


def build_tokenizer(vocab: GGUFVocab) -> Tokenizer:
    """A `tokenizers.Tokenizer` that encodes like the model's original tokenizer.json."""
    pre = PRE_TOKENIZATIONS.get(vocab.pre)
    if pre is None:
        raise CheckpointError(f"pre-tokenizer {vocab.pre!r} is not supported; "
                              f"supported: {sorted(PRE_TOKENIZATIONS)}")
    tok = Tokenizer(models.BPE(
        vocab=_vocab_dict(vocab), merges=[tuple(m.split(" ", 1)) for m in vocab.merges],
        continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False,
        ignore_merges=pre.ignore_merges))
    if pre.nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = _post_processor(vocab)
    _add_special_tokens(tok, vocab)
    return tok


def _vocab_dict(vocab: GGUFVocab) -> dict[str, int]:
    alphabet = _byte_alphabet()
    out = {}
    for index, (token, kind) in enumerate(zip(vocab.tokens, vocab.token_types)):
        if kind not in (_CONTROL, _USER_DEFINED) and not set(token) <= alphabet:
            # A normal token written as plain UTF-8 text: BPE only ever sees byte-alphabet spelling.
            token = "".join(_byte_to_char()[b] for b in token.encode("utf-8"))
        out[token] = index
    return out


def _pre_tokenizer(pre: _PreTokenization):
    steps = []
    if pre.digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if pre.split is not None:
        steps.append(pre_tokenizers.Split(Regex(pre.split), behavior="isolated", invert=False))
    # With a custom split, ByteLevel only maps bytes to its alphabet; otherwise it applies GPT-2's regex.
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre.split is None))
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


def _post_processor(vocab: GGUFVocab):
    single, special = "$A", []
    if vocab.add_bos and vocab.bos_token_id is not None:
        bos = vocab.tokens[vocab.bos_token_id]
        single, special = f"{bos} {single}", special + [(bos, vocab.bos_token_id)]
    if vocab.add_eos and vocab.eos_token_id is not None:
        eos = vocab.tokens[vocab.eos_token_id]
        single, special = f"{single} {eos}", special + [(eos, vocab.eos_token_id)]
    if not special:
        return processors.ByteLevel(trim_offsets=False)
    return processors.TemplateProcessing(single=single, special_tokens=special)


def _add_special_tokens(tok: Tokenizer, vocab: GGUFVocab) -> None:
    # Their text is already in the vocabulary, so adding them keeps their ids; it only makes the
    # tokenizer match them whole in input text instead of cutting them into pieces.
    control, user = [], []
    for token, kind in zip(vocab.tokens, vocab.token_types):
        if kind == _CONTROL:
            control.append(AddedToken(token, special=True, normalized=False))
        elif kind == _USER_DEFINED:
            user.append(AddedToken(token, special=False, normalized=False))
    tok.add_special_tokens(control)
    tok.add_tokens(user)


@lru_cache(maxsize=1)
def _byte_to_char() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


@lru_cache(maxsize=1)
def _byte_alphabet() -> frozenset[str]:
    return frozenset(_byte_to_char().values())
