"""Any OpenAI-compatible server as a benchmark target (`http(s)://HOST:PORT/v1`): streamed
completions (prompts as token ids) or chat completions (prompts as words), usage from
`stream_options.include_usage`."""

from __future__ import annotations

import asyncio
import json
import ssl
import time

import aiohttp

from pdmesh.bench.request_record import OK, RequestRecord
from pdmesh.bench.workload import BenchRequest


class OpenAITarget:
    def __init__(self, base_url: str, api_key: str = "", model: str = "", endpoint: str = "completions",
                 tls_ca: str | None = None, timeout_s: float = 300.0, temperature: float = 0.0,
                 ignore_eos: bool = True):
        self.address = base_url.rstrip("/")
        self.model, self.endpoint = model, endpoint
        self.temperature, self.ignore_eos = temperature, ignore_eos
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        tls = ssl.create_default_context(cafile=tls_ca) if tls_ca else None
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ssl=tls),
                                             timeout=aiohttp.ClientTimeout(total=timeout_s))

    async def resolve_model(self) -> None:
        """The first model the server lists, unless --model named one."""
        if self.model:
            return
        async with self.session.get(f"{self.address}/models", headers=self.headers) as response:
            response.raise_for_status()
            self.model = (await response.json())["data"][0]["id"]

    def body(self, request: BenchRequest) -> dict:
        body = {"model": self.model, "max_tokens": request.output_tokens, "temperature": self.temperature,
                "stream": True, "stream_options": {"include_usage": True}}
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": request.prompt_text()}]
        else:
            body["prompt"] = list(request.prompt_ids)
        return body

    async def send(self, request: BenchRequest) -> RequestRecord:
        path = "/chat/completions" if self.endpoint == "chat" else "/completions"
        record = RequestRecord(request.index, time.perf_counter())
        try:
            async with self.session.post(self.address + path, json=self.body(request),
                                         headers=self.headers) as response:
                if response.status != 200:
                    record.status = f"HTTP {response.status}"
                    record.error = error_message(await response.text())
                else:
                    await self._read_events(response, record)
        except asyncio.TimeoutError:
            record.status = "TIMEOUT"
        except aiohttp.ClientError as exc:
            record.status, record.error = "CONNECTION", str(exc)
        record.end = time.perf_counter()
        return record

    async def _read_events(self, response: aiohttp.ClientResponse, record: RequestRecord) -> None:
        async for line in response.content:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                if record.status != "STREAM_ERROR":
                    record.status = OK
                record.output_tokens = record.output_tokens or len(record.chunk_times)  # no usage: a token a chunk
                return
            event = json.loads(data)
            if "error" in event:
                record.status, record.error = "STREAM_ERROR", error_message(json.dumps(event))
                continue
            choices = event.get("choices") or []
            if choices and _text(choices[0]):
                record.chunk_times.append(time.perf_counter())
            if event.get("usage"):
                record.prompt_tokens = event["usage"]["prompt_tokens"]
                record.output_tokens = event["usage"]["completion_tokens"]

    async def close(self) -> None:
        await self.session.close()


def _text(choice: dict) -> str:
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


def error_message(body: str) -> str:
    """The message of an OpenAI-style error body ({"error": {"message": ...}}), else the body."""
    try:
        error = json.loads(body).get("error")
        return str(error.get("message", error) if isinstance(error, dict) else error or body)[:300]
    except (ValueError, AttributeError):
        return body[:300]
