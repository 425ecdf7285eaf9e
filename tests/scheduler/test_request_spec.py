"""Caps on a GenerateRequest, each at limit - 1, limit and limit + 1 (no sockets)."""

from __future__ import annotations

import math

import pytest

from pdmesh.engine.checkpoint import load_checkpoint
from pdmesh.errors import InvalidRequestError, NotFoundError
from pdmesh.scheduler.generate_request import ChatMessage, GenerateRequest
from pdmesh.scheduler.request_spec import (MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, Caps, ModelInfo,
                                           build_spec)

CAPS = Caps.resolve(max_model_len=256, max_prompt_tokens=100, max_output_tokens=120, default_max_tokens=64)


@pytest.fixture(scope="module")
def model(smollm2_path) -> ModelInfo:
    checkpoint = load_checkpoint(smollm2_path, log=lambda _: None)
    return ModelInfo(checkpoint.config.name, checkpoint.config, checkpoint.tokenizer, 256)


def request(**fields) -> GenerateRequest:
    messages = tuple(ChatMessage(**m) for m in fields.pop("messages", []))
    return GenerateRequest(messages=messages, **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def invalid(model, field: str, **fields) -> str:
    with pytest.raises(InvalidRequestError) as err:
        build_spec(request(**fields), model, CAPS)
    assert err.value.field == field
    return str(err.value)


@pytest.mark.parametrize("n,ok", [(99, True), (100, True), (101, False)])
def test_prompt_tokens(model, n, ok):
    if ok:
        assert len(build_spec(request(prompt_token_ids=[50] * n, max_tokens=1), model, CAPS).prompt_ids) == n
    else:
        assert invalid(model, "prompt", prompt_token_ids=[50] * n) == "prompt has 101 tokens; max-prompt-tokens is 100"


@pytest.mark.parametrize("n,ok", [(119, True), (120, True), (121, False)])
def test_max_tokens_ceiling(model, n, ok):
    if ok:
        assert build_spec(request(prompt_token_ids=[50], max_tokens=n), model, CAPS).params.max_tokens == n
    else:
        assert invalid(model, "max_tokens", prompt_token_ids=[50], max_tokens=n) == \
            "max_tokens is 121; max-output-tokens is 120"


@pytest.mark.parametrize("total,ok", [(255, True), (256, True), (257, False)])
def test_prompt_plus_max_tokens_fits_the_context(model, total, ok):
    fields = dict(prompt_token_ids=[50] * (total - 120), max_tokens=120)
    caps = Caps.resolve(max_model_len=256, max_prompt_tokens=200, max_output_tokens=120, default_max_tokens=64)
    if ok:
        assert build_spec(request(**fields), model, caps).num_tokens == total
    else:
        with pytest.raises(InvalidRequestError, match="257 exceeds max-model-len 256"):
            build_spec(request(**fields), model, caps)


def test_unset_max_tokens_gets_a_default_that_fits(model):
    assert build_spec(request(prompt_token_ids=[50] * 10), model, CAPS).params.max_tokens == 64
    caps = Caps.resolve(max_model_len=256, max_prompt_tokens=255, max_output_tokens=255, default_max_tokens=64)
    assert build_spec(request(prompt_token_ids=[50] * 250), model, caps).params.max_tokens == 6


@pytest.mark.parametrize("count,ok", [(MAX_STOP_STRINGS - 1, True), (MAX_STOP_STRINGS, True),
                                      (MAX_STOP_STRINGS + 1, False)])
def test_number_of_stop_strings(model, count, ok):
    fields = dict(prompt="hi", stop=[f"s{i}" for i in range(count)])
    if ok:
        assert len(build_spec(request(**fields), model, CAPS).stop) == count
    else:
        assert "stop has 17 strings; the limit is 16 (--max-stop-strings)" == invalid(model, "stop", **fields)


@pytest.mark.parametrize("length,ok", [(MAX_STOP_STRING_CHARS - 1, True), (MAX_STOP_STRING_CHARS, True),
                                       (MAX_STOP_STRING_CHARS + 1, False)])
def test_length_of_stop_strings(model, length, ok):
    fields = dict(prompt="hi", stop=["x" * length])
    if ok:
        build_spec(request(**fields), model, CAPS)
    else:
        assert "stop[0] has 257 characters; the limit is 256 (--max-stop-string-chars)" == invalid(
            model, "stop[0]", **fields)


def test_stop_limits_are_flags(model):
    """--max-stop-strings and --max-stop-string-chars set the caps (a 10,000-string list and a 1 MB
    string are refused by them, naming the limit and the value)."""
    caps = Caps.resolve(256, 100, 120, 64, max_stop_strings=2, max_stop_string_chars=4)
    build_spec(request(prompt="hi", stop=["abcd", "ef"]), model, caps)
    with pytest.raises(InvalidRequestError, match="stop has 3 strings; the limit is 2"):
        build_spec(request(prompt="hi", stop=["a", "b", "c"]), model, caps)
    with pytest.raises(InvalidRequestError, match="stop has 10,000 strings; the limit is 16"):
        build_spec(request(prompt="hi", stop=[str(i) for i in range(10_000)]), model, CAPS)
    with pytest.raises(InvalidRequestError, match=r"stop\[0\] has 1,000,000 characters; the limit is 256"):
        build_spec(request(prompt="hi", stop=["x" * 1_000_000]), model, CAPS)


@pytest.mark.parametrize("token,ok", [(49150, True), (49151, True), (49152, False), (-1, False)])
def test_token_ids_inside_the_vocabulary(model, token, ok):
    if ok:
        build_spec(request(prompt_token_ids=[token], max_tokens=1), model, CAPS)
    else:
        assert f"prompt_token_ids[0] is {token}; token ids must be in [0, 49,152)" == \
            invalid(model, "prompt_token_ids[0]", prompt_token_ids=[token])


@pytest.mark.parametrize("fields,field", [
    (dict(prompt="hi", temperature=-0.01), "temperature"),
    (dict(prompt="hi", temperature=math.nan), "temperature"),
    (dict(prompt="hi", top_p=0.0), "top_p"),
    (dict(prompt="hi", top_p=1.0000001), "top_p"),
    (dict(prompt="hi", top_k=-1), "top_k"),
    (dict(prompt="hi", max_tokens=0), "max_tokens"),
    (dict(messages=[{"role": "robot", "content": "hi"}]), "messages[0].role"),
    (dict(), "prompt"),
    (dict(prompt="hi", prompt_token_ids=[5]), "prompt"),
])
def test_bad_fields_name_themselves(model, fields, field):
    invalid(model, field, **fields)


def test_sampling_edges_are_accepted(model):
    spec = build_spec(request(prompt="hi", temperature=0.0, top_p=1.0, top_k=0, max_tokens=1), model, CAPS)
    assert spec.params.greedy
    build_spec(request(prompt="hi", temperature=1e-30, top_k=10**12, seed=-(2**63), max_tokens=1), model, CAPS)


def test_unknown_model_is_not_found(model):
    with pytest.raises(NotFoundError, match="'gpt-9' is not served here"):
        build_spec(request(prompt="hi", model="gpt-9"), model, CAPS)
    build_spec(request(prompt="hi", model=model.name, max_tokens=1), model, CAPS)
