"""Each cap at limit - 1, limit and limit + 1 through the real SmolLM2 mesh (limits in conftest)."""

from __future__ import annotations

import grpc
import pytest

from pdmesh.rpc.errors import rich_details

from support.mesh import Mesh

MAX_PROMPT, MAX_OUTPUT, MAX_LEN = 1000, 1200, 2048


def first_chunk_or_error(mesh: Mesh, **fields):
    """Start a request; accepted: its first chunk (then cancel: the limit case needs no full run)."""
    with mesh.client(retries=0) as client:
        stream = client.stream(**fields)
        try:
            chunk = next(stream)
        except grpc.RpcError as exc:
            return exc
        stream.close()
        return chunk


@pytest.mark.parametrize("n", [MAX_PROMPT - 1, MAX_PROMPT, MAX_PROMPT + 1])
def test_prompt_tokens_cap(mesh, n):
    result = first_chunk_or_error(mesh, prompt_token_ids=[100 + i % 500 for i in range(n)], max_tokens=1)
    if n <= MAX_PROMPT:
        assert not isinstance(result, grpc.RpcError), result
    else:
        assert result.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert result.details() == "prompt has 1,001 tokens; max-prompt-tokens is 1,000"
        assert rich_details(result)["field_violations"] == [
            {"field": "prompt", "description": "prompt has 1,001 tokens; max-prompt-tokens is 1,000"}]


@pytest.mark.parametrize("n", [MAX_OUTPUT - 1, MAX_OUTPUT, MAX_OUTPUT + 1])
def test_max_tokens_cap(mesh, n):
    result = first_chunk_or_error(mesh, prompt_token_ids=[100, 101], max_tokens=n, ignore_eos=True)
    if n <= MAX_OUTPUT:
        assert not isinstance(result, grpc.RpcError), result
    else:
        assert result.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert result.details() == "max_tokens is 1,201; max-output-tokens is 1,200"


@pytest.mark.parametrize("total", [MAX_LEN - 1, MAX_LEN, MAX_LEN + 1])
def test_prompt_plus_max_tokens_cap(mesh, total):
    prompt = [100 + i % 500 for i in range(total - MAX_OUTPUT)]
    result = first_chunk_or_error(mesh, prompt_token_ids=prompt, max_tokens=MAX_OUTPUT, ignore_eos=True)
    if total <= MAX_LEN:
        assert not isinstance(result, grpc.RpcError), result
    else:
        assert result.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert result.details() == "prompt has 849 tokens and max_tokens is 1,200: 2,049 exceeds max-model-len 2,048"


def test_nothing_leaked_after_the_cap_tests(mesh):
    workers = mesh.wait_all_blocks_free()
    assert all(w.kv_blocks_free == w.kv_blocks_total and w.healthy for w in workers)
