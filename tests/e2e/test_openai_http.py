"""The OpenAI-compatible HTTP API end to end: the official `openai` SDK (sync and async, streaming
and not) and plain HTTP against a real echo mesh; every error status; a disconnect frees KV; the
port follows the client port's TLS; greedy SmolLM2 text through HTTP equals gRPC's."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai
import pytest

from pdmesh.client import PdmeshClient
from support.mesh import free_port, start_mesh

ECHO_BLOCK_BYTES = 1 * 2 * 16 * 1 * 1 * 4  # layers x k/v x block tokens x kv heads x head dim x fp32
TENANTS = """
[tenants.app]
api_keys = ["k-app"]
[tenants.ops]
api_keys = ["k-ops"]
admin = true
[tenants.slow]
api_keys = ["k-slow"]
requests_per_s = 0.2
burst_s = 10
"""
KEY = "k-app"
PROMPT_IDS = list(range(100, 110))


@pytest.fixture(scope="module")
def http_mesh(tmp_path_factory):
    """Echo engine at 20 ms a step; 64 decode KV blocks (4 requests of 256 tokens) and a queue of 4;
    heartbeats every 0.2 s, so cluster status shows KV within 0.2 s of the worker."""
    folder = tmp_path_factory.mktemp("http_mesh")
    (folder / "tenants.toml").write_text(TENANTS)
    mesh = start_mesh(folder / "serve.log", "--engine", "echo", "--echo-step-ms", "20",
                      "--kv-cache-gib", str(64 * ECHO_BLOCK_BYTES / 2**30), "--max-model-len", "512",
                      "--max-output-tokens", "400", "--max-queued-requests", "4", "--default-max-tokens", "8",
                      "--local-prefill-threshold", "0", "--tenants-file", str(folder / "tenants.toml"),
                      "--heartbeat-interval", "0.2")
    mesh.model = json.loads(get(mesh, "/models", KEY)[2])["data"][0]["id"]
    yield mesh
    assert mesh.stop() == 0
    assert not mesh.leftovers()


def post(mesh, path: str, body: dict | bytes, key: str | None = KEY) -> tuple[int, dict, str]:
    """(status, headers, body text) of a POST to the mesh's /v1 API."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    return _call(urllib.request.Request(mesh.http_url + path, data=data, headers=headers, method="POST"))


def get(mesh, path: str, key: str | None = KEY) -> tuple[int, dict, str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return _call(urllib.request.Request(mesh.http_url + path, headers=headers))


def _call(request, context=None) -> tuple[int, dict, str]:
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def grpc_text(mesh, **request) -> str:
    with PdmeshClient(mesh.address, api_key=KEY, retries=0) as client:
        return client.generate(**request).text


def cluster_status(mesh):
    with PdmeshClient(mesh.address, api_key="k-ops") as client:  # an admin tenant
        return client.cluster_status()


def blocks_free(mesh) -> bool:
    return all(w.kv_blocks_free == w.kv_blocks_total and w.running == 0 for w in cluster_status(mesh).workers)


def sdk(mesh, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh.http_url, api_key=key, max_retries=0, timeout=60)


def test_plain_http_chat_and_completion(http_mesh):
    status, headers, text = post(http_mesh, "/chat/completions", {
        "model": http_mesh.model, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 5,
        "temperature": 0})
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    body = json.loads(text)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert choice["message"]["content"] == grpc_text(http_mesh, messages=[{"role": "user", "content": "Hello there"}],
                                                     max_tokens=5)
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 5

    status, _, text = post(http_mesh, "/completions", {"prompt": PROMPT_IDS, "max_completion_tokens": 4,
                                                          "temperature": 0})
    body = json.loads(text)
    assert status == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == grpc_text(http_mesh, prompt_token_ids=PROMPT_IDS, max_tokens=4)
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}


def test_plain_http_stream_is_server_sent_events(http_mesh):
    request = urllib.request.Request(http_mesh.http_url + "/completions", method="POST", data=json.dumps(
        {"prompt": PROMPT_IDS, "max_tokens": 6, "temperature": 0, "stream": True,
         "stream_options": {"include_usage": True}}).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        lines = [line.decode().rstrip("\n") for line in response]
    events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and all(line in ("",) or line.startswith("data: ") for line in lines)
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    assert text == grpc_text(http_mesh, prompt_token_ids=PROMPT_IDS, max_tokens=6)


def test_openai_sdk_sync(http_mesh):
    client = sdk(http_mesh)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to ten"}]
    expected = grpc_text(http_mesh, messages=messages, max_tokens=7)
    done = client.chat.completions.create(model=http_mesh.model, messages=messages, max_tokens=7, temperature=0,
                                          seed=3, top_p=0.9, user="u-1")
    assert done.choices[0].message.content == expected and done.usage.completion_tokens == 7
    chunks = list(client.chat.completions.create(model=http_mesh.model, messages=messages, max_tokens=7,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == 7 and chunks[-2].choices[0].finish_reason == "length"
    stop = expected[len(expected) // 2:][:3]
    stopped = client.completions.create(model=http_mesh.model, prompt=PROMPT_IDS, max_tokens=12, stop=stop,
                                        temperature=0, extra_body={"top_k": 5, "ignore_eos": True})
    assert stopped.choices[0].text == grpc_text(http_mesh, prompt_token_ids=PROMPT_IDS, max_tokens=12, stop=[stop])
    assert [m.id for m in client.models.list().data] == [http_mesh.model]


def test_openai_sdk_async(http_mesh):
    async def scenario():
        async with openai.AsyncOpenAI(base_url=http_mesh.http_url, api_key=KEY, max_retries=0) as client:
            whole = await client.completions.create(model=http_mesh.model, prompt="Once upon a time", max_tokens=5,
                                                    temperature=0)
            stream = await client.completions.create(model=http_mesh.model, prompt="Once upon a time",
                                                     max_tokens=5, temperature=0, stream=True)
            pieces = [c.choices[0].text async for c in stream]
            return whole, pieces
    whole, pieces = asyncio.run(scenario())
    expected = grpc_text(http_mesh, prompt="Once upon a time", max_tokens=5)
    assert whole.choices[0].text == expected == "".join(pieces)
    assert whole.usage.completion_tokens == 5 and whole.choices[0].finish_reason == "length"


@pytest.mark.parametrize("body,param,words", [
    ({"prompt": PROMPT_IDS, "max_tokens": 401}, "max_tokens", ["401", "max-output-tokens is 400"]),
    ({"prompt": PROMPT_IDS, "max_completion_tokens": 0}, "max_completion_tokens", ["0", "at least 1"]),
    ({"prompt": [7] * 600, "max_tokens": 1}, "prompt", ["600 tokens", "max-model-len is 512"]),
    ({"prompt": PROMPT_IDS, "n": 2}, "n", ["n is 2", "n must be 1"]),
    ({"prompt": PROMPT_IDS, "temperature": "hot"}, "temperature", ["'hot'", "number"]),
    ({"prompt": PROMPT_IDS, "top_p": 1.5}, "top_p", ["(0, 1]", "1.5"]),
    ({"prompt": PROMPT_IDS, "stop": ["x"] * 17}, "stop", ["17 strings", "limit is 16"]),
    ({"prompt": PROMPT_IDS, "logprobs": 3}, "logprobs", ["does not support logprobs"]),
    ({"prompt": [99999999]}, "prompt_token_ids[0]", ["99999999", "49,152"]),
    ({"prompt": ["a", "b"]}, "prompt", ["2 prompts"]),
])
def test_bad_requests_are_400_naming_field_limit_and_value(http_mesh, body, param, words):
    status, _, text = post(http_mesh, "/completions", body)
    error = json.loads(text)["error"]
    assert status == 400 and error["type"] == "invalid_request_error" and error["param"] == param, error
    assert all(w in error["message"] for w in words), error


def test_error_statuses(http_mesh):
    status, _, text = post(http_mesh, "/chat/completions", b"{not json")
    assert status == 400 and json.loads(text)["error"]["param"] == "body"
    status, _, text = post(http_mesh, "/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]})
    assert status == 400 and json.loads(text)["error"]["param"] == "messages[0].role"
    for key in (None, "k-nobody"):
        status, headers, text = post(http_mesh, "/completions", {"prompt": "hi"}, key=key)
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
        assert json.loads(text)["error"]["type"] == "authentication_error"
    assert get(http_mesh, "/models", key=None)[0] == 401
    status, _, text = post(http_mesh, "/completions", {"model": "gpt-9", "prompt": "hi"})
    assert status == 404 and "'gpt-9' is not served here" in json.loads(text)["error"]["message"]
    status, _, _ = post(http_mesh, "/completions", b"x" * (5 * 2**20))
    assert status == 413
    with pytest.raises(openai.AuthenticationError):
        sdk(http_mesh, key="k-nobody").completions.create(model=http_mesh.model, prompt="hi")
    with pytest.raises(openai.NotFoundError):
        sdk(http_mesh).completions.create(model="gpt-9", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        sdk(http_mesh).chat.completions.create(model=http_mesh.model, messages=[{"role": "user", "content": "x"}],
                                               n=3)


def test_rate_limit_is_429_with_retry_after(http_mesh):
    statuses = [post(http_mesh, "/completions", {"prompt": PROMPT_IDS, "max_tokens": 1}, key="k-slow")
                for _ in range(3)]  # a burst of 2 (0.2/s for 10 s), then refused
    status, headers, text = statuses[-1]
    assert [s for s, _, _ in statuses[:2]] == [200, 200] and status == 429, statuses
    assert int(headers["Retry-After"]) >= 1
    error = json.loads(text)["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limited" and error["retry_after_s"] > 0
    with pytest.raises(openai.RateLimitError):
        sdk(http_mesh, key="k-slow").completions.create(model=http_mesh.model, prompt="hi", max_tokens=1)


def test_full_queue_is_429_with_retry_after(http_mesh):
    async def until(condition, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition(await asyncio.to_thread(cluster_status, http_mesh)):
            assert time.monotonic() < deadline, "the mesh never reached the state this test needs"
            await asyncio.sleep(0.05)

    async def scenario():
        async with openai.AsyncOpenAI(base_url=http_mesh.http_url, api_key=KEY, max_retries=0) as client:
            async def one(tokens: int):
                try:
                    await client.completions.create(model=http_mesh.model, prompt=PROMPT_IDS, max_tokens=tokens)
                    return 200, None, ""
                except openai.APIStatusError as exc:
                    return exc.status_code, exc.response.headers.get("retry-after"), exc.message
            # 4 long requests take every KV block; 4 more fill the queue; the rest are refused at once
            long = [asyncio.create_task(one(240)) for _ in range(4)]
            await until(lambda status: sum(w.running for w in status.workers if w.role == "decode") == 4)
            queued = [asyncio.create_task(one(1)) for _ in range(4)]
            await until(lambda status: status.queued == 4)
            refused = await asyncio.gather(*(one(1) for _ in range(3)))
            return refused, await asyncio.gather(*long, *queued)
    refused, served = asyncio.run(scenario())
    assert all(code == 429 and int(retry) >= 1 for code, retry, _ in refused), refused
    assert [code for code, _, _ in served] == [200] * 8, served


def test_models_and_health(http_mesh):
    status, _, text = get(http_mesh, "/models")
    assert status == 200
    model = json.loads(text)["data"][0]
    assert model["object"] == "model" and model["max_model_len"] == 512
    with urllib.request.urlopen(http_mesh.http_url.removesuffix("/v1") + "/health", timeout=10) as response:
        assert response.status == 200 and json.loads(response.read()) == {"status": "ok"}


def test_disconnect_mid_stream_frees_kv_within_a_second(http_mesh):
    connection = http.client.HTTPConnection("127.0.0.1", http_mesh.http_port, timeout=30)
    connection.request("POST", "/v1/chat/completions", json.dumps({
        "messages": [{"role": "user", "content": "go on"}], "max_tokens": 300, "stream": True}),
        {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    for _ in range(4):
        assert response.readline().startswith(b"data: ")
        response.readline()
    held = time.monotonic()
    while blocks_free(http_mesh):  # 300 tokens at 20 ms a step: seconds of stream left
        assert time.monotonic() - held < 3.0, "the stream's KV never showed as held"
        time.sleep(0.05)
    connection.sock.shutdown(2)
    connection.close()
    gone = time.monotonic()
    while not blocks_free(http_mesh):
        assert time.monotonic() - gone < 1.0, "KV still held a second after the client disconnected"
        time.sleep(0.05)


@pytest.fixture
def lone_tls_scheduler(tmp_path):
    """A scheduler without workers whose client port speaks TLS (a development certificate)."""
    subprocess.run([sys.executable, "-m", "pdmesh.cli", "certs", str(tmp_path / "certs")], check=True,
                   capture_output=True)
    port, http_port = free_port(), free_port()
    log = tmp_path / "scheduler.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "pdmesh.cli", "scheduler", "--port", str(port), "--internal-port", "0",
         "--http-port", str(http_port), "--tls-cert", str(tmp_path / "certs" / "scheduler.pem"),
         "--tls-key", str(tmp_path / "certs" / "scheduler-key.pem")],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, "PDMESH_CLUSTER_SECRET": "s"})
    deadline = time.monotonic() + 120
    while "openai http: https://" not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    yield f"https://127.0.0.1:{http_port}", ssl.create_default_context(cafile=str(tmp_path / "certs" / "ca.pem"))
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0


def test_no_worker_is_503_with_retry_after_over_tls(lone_tls_scheduler):
    url, tls = lone_tls_scheduler
    status, headers, text = _call(urllib.request.Request(url + "/health"), tls)
    assert status == 503 and headers["Retry-After"] == "1"
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps({"prompt": "hi"}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    status, headers, text = _call(request, tls)
    assert status == 503 and int(headers["Retry-After"]) >= 1
    assert "no healthy decode worker" in json.loads(text)["error"]["message"]
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP is not spoken there
        urllib.request.urlopen(url.replace("https", "http") + "/health", timeout=10)


def test_greedy_text_through_http_equals_grpc(mesh):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    with PdmeshClient(mesh.address, retries=0) as client:
        expected = client.generate(messages=question, max_tokens=12, temperature=0)
    answer = openai.OpenAI(base_url=mesh.http_url, api_key="none", max_retries=0).chat.completions.create(
        model="", messages=question, max_tokens=12, temperature=0)
    assert answer.choices[0].message.content == expected.text
    assert answer.usage.completion_tokens == expected.completion_tokens
    assert answer.usage.prompt_tokens == expected.prompt_tokens
