"""Requests through the real mesh: same tokens as the engine alone, deltas, cancel, routing."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from pdmesh.rpc.errors import rich_details

from support.mesh import LOCAL_PREFILL_THRESHOLD, engine_greedy, handoff_bytes

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name three colors of the rainbow, in a list."}],
]


@pytest.mark.parametrize("chat", CHATS)
def test_greedy_chat_equals_engine_alone(mesh, reference_engine, chat):
    _, tokenizer = reference_engine
    with mesh.client() as client:
        chunks = list(client.stream(messages=chat, max_tokens=48))
    prompt_ids = tokenizer.apply_chat_template(chat)
    expected = engine_greedy(reference_engine, prompt_ids, 48)
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == expected
    text = "".join(c.text for c in chunks)
    assert text == tokenizer.decode(expected, skip_special_tokens=True)
    assert all(not c.finish_reason for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason in ("stop", "length")
    assert (last.prompt_tokens, last.completion_tokens) == (len(prompt_ids), len(expected))
    assert len(chunks) >= 3  # streamed as deltas, not one blob


def test_paris(mesh):
    with mesh.client() as client:
        done = client.generate(messages=CHATS[0], max_tokens=32)
    assert "Paris" in done.text and done.finish_reason == "stop"


def test_raw_prompt_and_token_ids_agree(mesh, reference_engine):
    _, tokenizer = reference_engine
    prompt = "The three primary colors are"
    with mesh.client() as client:
        by_text = client.generate(prompt=prompt, max_tokens=12, ignore_eos=True)
        by_ids = client.generate(prompt_token_ids=tokenizer.encode(prompt), max_tokens=12, ignore_eos=True)
    assert by_text.token_ids == by_ids.token_ids and len(by_text.token_ids) == 12
    assert by_text.finish_reason == "length"
    assert list(by_text.token_ids) == engine_greedy(reference_engine, tokenizer.encode(prompt), 12)


def test_short_prompt_is_prefilled_locally_and_long_remotely(mesh, reference_engine):
    """Conditional disaggregation: only prompts at or over the threshold cross the KV channel."""
    before = handoff_bytes(mesh)
    short = list(range(100, 100 + LOCAL_PREFILL_THRESHOLD - 1))
    with mesh.client() as client:
        client.generate(prompt_token_ids=short, max_tokens=4, ignore_eos=True)
        assert handoff_bytes(mesh) == before
        long = list(range(3000, 3000 + LOCAL_PREFILL_THRESHOLD + 20))  # shares no block with earlier prompts
        local_tokens = engine_greedy(reference_engine, long, 6)
        done = client.generate(prompt_token_ids=long, max_tokens=6, ignore_eos=True)
    assert list(done.token_ids) == local_tokens
    per_token = 30 * 2 * 3 * 64 * 4  # layers x (k, v) x kv heads x head dim x float32
    assert handoff_bytes(mesh) - before == per_token * len(long)  # nothing of it was cached on the decode worker


def test_stop_string_ends_the_stream_before_it(mesh):
    with mesh.client() as client:
        full = client.generate(prompt="1, 2, 3, 4, 5, 6, 7, 8,", max_tokens=24, ignore_eos=True)
        assert " 10," in full.text
        cut = client.generate(prompt="1, 2, 3, 4, 5, 6, 7, 8,", max_tokens=24, ignore_eos=True, stop=[" 10"])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index(" 10")]


def test_cancel_mid_stream_frees_blocks_on_both_workers(mesh):
    with mesh.client() as client:
        stream = client.stream(messages=CHATS[1], max_tokens=400, ignore_eos=True)
        for i, _ in enumerate(stream):
            if i == 5:
                break
        time.sleep(1.5)  # one heartbeat: the running stream's blocks show up as used
        assert any(w.kv_blocks_free < w.kv_blocks_total for w in mesh.workers("decode"))
        stream.close()  # cancels the gRPC call
    workers = mesh.wait_all_blocks_free()
    assert all(w.kv_blocks_free == w.kv_blocks_total for w in workers), workers


def test_two_decode_workers_both_get_work(mesh):
    before = {w.worker_id: w.requests_total for w in mesh.workers("decode")}
    assert len(before) == 2
    errors = []

    def one(i):
        try:
            with mesh.client() as client:
                client.generate(prompt_token_ids=list(range(200 + i, 220 + i)), max_tokens=16, ignore_eos=True)
        except grpc.RpcError as exc:
            errors.append(exc)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    time.sleep(1.5)  # one heartbeat
    after = {w.worker_id: w.requests_total for w in mesh.workers("decode")}
    assert all(after[w] > before[w] for w in before), (before, after)
    assert all(w.kv_blocks_free == w.kv_blocks_total for w in mesh.wait_all_blocks_free())


def test_bad_requests_get_clear_errors_and_the_mesh_stays_up(mesh):
    with mesh.client(retries=0) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.generate(prompt_token_ids=[5] * 2048, max_tokens=1)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "prompt has 2,048 tokens; max-prompt-tokens is 1,000" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            client.generate(prompt="hi", model="gpt-9")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            client.generate(prompt="hi", temperature=-1.0)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert rich_details(err.value)["field_violations"][0]["field"] == "temperature"
        assert client.generate(prompt="Hello", max_tokens=2, ignore_eos=True).completion_tokens == 2


def test_list_models_and_count_tokens(mesh, reference_engine):
    _, tokenizer = reference_engine
    with mesh.client() as client:
        models = client.list_models()
        assert [m.max_model_len for m in models] == [2048]
        assert client.count_tokens(messages=CHATS[0]) == tokenizer.apply_chat_template(CHATS[0])


def test_cluster_status_reports_each_workers_device(mesh):
    workers = mesh.workers("prefill") + mesh.workers("decode")
    assert len(workers) == 3
    assert all(w.device == "cpu" and w.gpu_memory_used_bytes == 0 for w in workers), workers
