"""Text <-> token ids for a checkpoint, with its chat template; same ids as Hugging Face's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import tokenizers

from pdmesh.engine.chat_template import ChatTemplate
from pdmesh.engine.gguf_checkpoint import gguf_eos_token_ids, open_gguf, read_metadata
from pdmesh.engine.gguf_tokenizer import build_tokenizer, read_vocab
from pdmesh.errors import CheckpointError, InvalidRequestError

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special ids and chat template the engine needs."""

    def __init__(self, backend: tokenizers.Tokenizer, chat_template: str | None = None,
                 special_tokens: dict[str, str | None] | None = None,
                 extra_eos_token_ids: tuple[int, ...] = ()):
        """`special_tokens` maps `bos_token` / `eos_token` / ... to token text (None when absent);
        `extra_eos_token_ids` are ids besides eos_token that also end a generation."""
        self._backend = backend
        self.special_tokens = {name: (special_tokens or {}).get(name) for name in _SPECIAL_NAMES}
        self.bos_token_id = self._id_of(self.special_tokens["bos_token"])
        eos = self._id_of(self.special_tokens["eos_token"])
        self.eos_token_ids = tuple(dict.fromkeys(([eos] if eos is not None else []) + list(extra_eos_token_ids)))
        self.chat_template = ChatTemplate(chat_template, self.special_tokens) if chat_template else None

    # constructors

    @classmethod
    def from_gguf(cls, reader_or_path: gguf.GGUFReader | str | Path) -> "Tokenizer":
        """Rebuild the tokenizer a GGUF file describes in its `tokenizer.*` metadata."""
        reader = reader_or_path if isinstance(reader_or_path, gguf.GGUFReader) else open_gguf(reader_or_path)
        vocab = read_vocab(reader)
        meta = read_metadata(reader)

        def token(key):
            index = meta.get(f"tokenizer.ggml.{key}")
            return vocab.tokens[index] if index is not None and 0 <= index < len(vocab.tokens) else None

        special = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
                   "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id")}
        return cls(build_tokenizer(vocab), meta.get("tokenizer.chat_template"), special,
                   extra_eos_token_ids=gguf_eos_token_ids(meta))

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> "Tokenizer":
        """Load `tokenizer.json` + `tokenizer_config.json` (and `chat_template.jinja` if present)."""
        path = Path(path)
        try:
            backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises a bare Exception for missing or bad files
            raise CheckpointError(f"{path}: cannot read tokenizer.json ({exc})") from exc
        config = _read_json(path / "tokenizer_config.json")
        special = {name: _token_text(config.get(name)) for name in _SPECIAL_NAMES}
        return cls(backend, _hf_chat_template(path, config), special,
                   extra_eos_token_ids=_generation_eos_ids(path, backend))

    def save(self, folder: str | Path) -> None:
        """Write an HF-style folder that `from_hf_folder` reads back to an identical tokenizer."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(folder / "tokenizer.json"))
        config = {name: text for name, text in self.special_tokens.items() if text is not None}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template.source
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        # HF keeps the full list of stop ids (EOS plus end-of-turn) in generation_config.json.
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": list(self.eos_token_ids)}))

    # encoding

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with BOS/EOS only where the model's tokenizer adds them by default."""
        return self._backend.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 (a cut multi-byte character) shows as U+FFFD."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry (byte-level spelling) of `token_id`, or None if out of range."""
        return self._backend.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Render `messages` with the model's chat template and tokenize the result.

        Like transformers, the rendered text is encoded without adding BOS/EOS: the template writes
        whatever special tokens the model expects.
        """
        if self.chat_template is None:
            raise InvalidRequestError("this model has no chat template; send a plain prompt", field="messages")
        text = self.chat_template.render(messages, add_generation_prompt)
        return self._backend.encode(text, add_special_tokens=False).ids

    def _id_of(self, text: str | None) -> int | None:
        return None if text is None else self._backend.token_to_id(text)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc


def _token_text(value) -> str | None:
    # Older tokenizer_config.json files store special tokens as serialized AddedToken dicts.
    return value.get("content") if isinstance(value, dict) else value


def _hf_chat_template(path: Path, config: dict) -> str | None:
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():  # transformers >= 4.49 saves the template in its own file
        return jinja_file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {entry.get("name"): entry.get("template") for entry in template}
        template = named.get("default")
    return template


def _generation_eos_ids(path: Path, backend: tokenizers.Tokenizer) -> tuple[int, ...]:
    eos = _read_json(path / "generation_config.json").get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return tuple(int(i) for i in ids if 0 <= int(i) < backend.get_vocab_size(with_added_tokens=True))
