"""Per-request overhead of the candidate HTTP stacks for the scheduler's OpenAI front door.

Each stack serves the same two endpoints on uvloop in its own process, with no model behind them:
`POST /v1/completions` parses a JSON body and answers a ~300-byte JSON object; `POST /stream`
answers 16 SSE events. A client process sends N requests at concurrency C over keep-alive
connections. Reported: the server process's CPU time per request (user + system, from /proc: the
number that matters on a shared machine) and the wall-clock rate.

    python tools/bench_http_stack.py --requests 2000 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

STACKS = ("starlette", "fastapi", "aiohttp")
BODY = {"model": "m", "prompt": "hello world", "max_tokens": 16, "temperature": 0.0}
ANSWER = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m",
          "choices": [{"index": 0, "text": "x" * 64, "finish_reason": "length", "logprobs": None}],
          "usage": {"prompt_tokens": 2, "completion_tokens": 16, "total_tokens": 18}}
EVENTS = 16


def serve_starlette(port: int, fast: bool) -> None:
    import uvicorn
    from starlette.responses import JSONResponse, StreamingResponse

    async def complete(request):
        await request.json()
        return JSONResponse(ANSWER)

    async def stream(request):
        await request.json()

        async def events():
            for _ in range(EVENTS):
                yield f"data: {json.dumps(ANSWER)}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    if fast:
        from fastapi import FastAPI
        app = FastAPI()
        app.post("/v1/completions")(complete)
        app.post("/stream")(stream)
    else:
        from starlette.applications import Starlette
        from starlette.routing import Route
        app = Starlette(routes=[Route("/v1/completions", complete, methods=["POST"]),
                                Route("/stream", stream, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", log_level="warning", access_log=False)


def serve_aiohttp(port: int) -> None:
    import uvloop
    from aiohttp import web

    async def complete(request):
        await request.json()
        return web.json_response(ANSWER)

    async def stream(request):
        await request.json()
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(EVENTS):
            await response.write(f"data: {json.dumps(ANSWER)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", complete)
    app.router.add_post("/stream", stream)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


async def load(port: int, path: str, requests: int, concurrency: int) -> float:
    import aiohttp

    url = f"http://127.0.0.1:{port}{path}"
    left = iter(range(requests))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def worker():
            for _ in left:
                async with session.post(url, json=BODY) as response:
                    await response.read()
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start


def cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(stack: str, requests: int, concurrency: int) -> dict:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, __file__, "--serve", stack, "--port", str(port)])
    try:
        asyncio.run(_wait_up(port))
        asyncio.run(load(port, "/v1/completions", 200, concurrency))  # warm-up
        result = {"stack": stack}
        for path in ("/v1/completions", "/stream"):
            before = cpu_s(server.pid)
            wall = asyncio.run(load(port, path, requests, concurrency))
            used = cpu_s(server.pid) - before
            result[path] = {"server_cpu_us_per_request": round(used / requests * 1e6),
                            "requests_per_s": round(requests / wall)}
        return result
    finally:
        server.terminate()
        server.wait()


async def _wait_up(port: int) -> None:
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise TimeoutError("server did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the stacks (interleaved)")
    parser.add_argument("--serve", choices=STACKS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        if args.serve == "aiohttp":
            serve_aiohttp(args.port)
        else:
            serve_starlette(args.port, fast=args.serve == "fastapi")
        return 0
    for _ in range(args.rounds):
        for stack in STACKS:
            print(json.dumps(measure(stack, args.requests, args.concurrency)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
