"""Tokenizer and detokenizer on the real SmolLM2 GGUF, checked against transformers' tokenizer."""

from __future__ import annotations

import dataclasses

import pytest

from pdmesh.engine.chat_template import ChatTemplate
from pdmesh.engine.detokenizer import IncrementalDetokenizer
from pdmesh.engine.gguf_checkpoint import open_gguf
from pdmesh.engine.gguf_tokenizer import PRE_TOKENIZATIONS, build_tokenizer, read_vocab
from pdmesh.engine.tokenizer import Tokenizer
from pdmesh.errors import CheckpointError, InvalidRequestError

TEXTS = [
    "Hello world",
    "12345",
    " 123 x2024 3.14159 1,000,000.00$",
    "naïve café — “quotes” ±5°C",
    "emoji 😀👍🏽 🇫🇷 family: 👨‍👩‍👧",
    "中文字符 日本語のテキスト 한국어",
    "ŁÓDŹ Привет мир",
    "   leading   and trailing   ",
    "tabs\tand\nnewlines\n\n\r\n  \n",
    "def f(x):\n    return x**2  # comment\n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<|endoftext|>x<file_sep>y",
    "I'm you're we've they'll it's",
    "a" * 40 + " " + "ab" * 20,
    "\u00a0nbsp\u200bzero-width",
    "",
]
SYSTEM_CHAT = [{"role": "system", "content": "You are terse."},
               {"role": "user", "content": "What is the capital of France?"}]
USER_CHAT = [{"role": "user", "content": "Write 3 haiku about 🦀 and 東京."}]
MULTI_TURN = USER_CHAT + [{"role": "assistant", "content": "Here:\n1. ..."},
                          {"role": "user", "content": "More!"}]


@pytest.fixture(scope="module")
def reader(smollm2_path):
    return open_gguf(smollm2_path)


@pytest.fixture(scope="module")
def tokenizer(reader):
    return Tokenizer.from_gguf(reader)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tokenizer, hf_smollm2_tokenizer, text):
    assert tokenizer.encode(text) == hf_smollm2_tokenizer.encode(text)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips(tokenizer, hf_smollm2_tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    for skip in (False, True):
        expected = hf_smollm2_tokenizer.decode(ids, skip_special_tokens=skip)
        assert tokenizer.decode(ids, skip_special_tokens=skip) == expected


@pytest.mark.parametrize("messages", [SYSTEM_CHAT, USER_CHAT, MULTI_TURN], ids=["system", "user", "multi"])
def test_chat_template_matches_transformers(tokenizer, hf_smollm2_tokenizer, messages):
    expected = hf_smollm2_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tokenizer.apply_chat_template(messages) == expected
    assert tokenizer.decode(expected).endswith("<|im_start|>assistant\n")


def test_every_numeric_character_is_its_own_piece(tokenizer):
    # SmolLM2's tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) split every \p{N} character
    # off before BPE; its vocabulary has no multi-character token containing one. transformers'
    # GGUF loader ignores `tokenizer.ggml.pre` for this model and so differs on text such as " ½",
    # which is why such text is not in TEXTS.
    for text in (" ½", "x²", " ٣4", " 12"):
        assert tokenizer.encode(text) == [i for ch in text for i in tokenizer.encode(ch)]


def test_special_ids(tokenizer):
    assert tokenizer.vocab_size == 49152
    assert tokenizer.bos_token_id == 1
    assert tokenizer.eos_token_ids == (2,)
    assert tokenizer.id_to_token(2) == "<|im_end|>"
    assert tokenizer.encode("<|im_end|>") == [2]  # matched whole, not cut into pieces
    assert tokenizer.decode([1, 28, 2], skip_special_tokens=True) == tokenizer.decode([28])


def test_hf_folder_round_trip(tokenizer, hf_smollm2_tokenizer, tmp_path):
    # Our own save (the weight cache uses it) and transformers' save_pretrained both load back.
    tokenizer.save(tmp_path / "ours")
    hf_smollm2_tokenizer.save_pretrained(tmp_path / "hf")
    for folder in (tmp_path / "ours", tmp_path / "hf"):
        loaded = Tokenizer.from_hf_folder(folder)
        assert [loaded.encode(t) for t in TEXTS] == [tokenizer.encode(t) for t in TEXTS]
        assert loaded.apply_chat_template(SYSTEM_CHAT) == tokenizer.apply_chat_template(SYSTEM_CHAT)
        assert (loaded.bos_token_id, loaded.eos_token_ids) == (1, (2,))


@pytest.fixture(params=[1, 3], ids=["one-by-one", "by-three"])
def chunk(request):
    return request.param


@pytest.mark.parametrize("text", ["emoji 😀👍🏽 🇫🇷 👨‍👩‍👧 done", "中文字符 日本語のテキスト 한국어 ok", TEXTS[3]])
def test_incremental_detokenizer(tokenizer, text, chunk):
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add(ids[i:i + chunk]) for i in range(0, len(ids), chunk)] + [detok.flush()]
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in delta for delta in deltas)


def test_incremental_detokenizer_flushes_cut_character(tokenizer):
    ids = tokenizer.encode("😀")
    assert len(ids) > 1  # the emoji's four bytes span several tokens
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.add(ids[:-1]) == ""  # held back: the character is incomplete
    assert detok.flush() == tokenizer.decode(ids[:-1])


def test_unknown_pre_tokenizer_is_rejected(reader):
    vocab = dataclasses.replace(read_vocab(reader), pre="mystery-bpe")
    with pytest.raises(CheckpointError, match="mystery-bpe"):
        build_tokenizer(vocab)


def test_split_regexes_match_transformers():
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    for name in ("llama-bpe", "qwen2"):
        assert PRE_TOKENIZATIONS[name].split == GGUF_PRE_TOKENIZER_SPLITS[name]


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "qwen2"])
def test_other_pre_tokenizers_round_trip(reader, pre):
    tok = build_tokenizer(dataclasses.replace(read_vocab(reader), pre=pre))
    for text in TEXTS:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


def test_template_refusal_is_invalid_request():
    template = ChatTemplate("{{ raise_exception('roles must alternate') }}", {})
    with pytest.raises(InvalidRequestError, match="roles must alternate"):
        template.render([{"role": "user", "content": "hi"}])
