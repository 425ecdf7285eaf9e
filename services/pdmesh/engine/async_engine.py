"""pdmesh's own engine behind the worker interface (`engine_protocol.Engine`): an LLMEngine
stepped on one thread, its outputs streamed to asyncio callers. A tensor-parallel engine is the
same class built with its group's follower pids and a `close` that stops them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import AsyncIterator, Callable

import torch

from pdmesh.engine.device import memory_used_bytes
from pdmesh.engine.engine_protocol import EngineLoad, KVFingerprint
from pdmesh.engine.llm_engine import LLMEngine
from pdmesh.engine.sequence import EngineOutput, EngineRequest
from pdmesh.engine.request_checks import stream_outputs
from pdmesh.errors import EngineError, FailedPreconditionError

log = logging.getLogger(__name__)
# Cached block hashes a load report carries at most (8 bytes each): ~32k tokens of 16-token blocks.
MAX_REPORTED_HASHES = 2048


class AsyncEngine:
    """own_thread=False: the caller runs the step loop itself with run_here(), on the thread it
    chooses. Workers run it on the process's main thread: on this CPU, torch's OpenMP kernels
    stepped from a second thread ran ~1.5x slower (23 vs 35 tok/s, tools/bench_mesh.py notes)."""

    def __init__(self, engine: LLMEngine, own_thread: bool = True, kind: str = "pdmesh",
                 follower_pids: tuple[int, ...] = (), on_close: Callable[[], None] | None = None):
        """kind: "pdmesh" or "echo"; follower_pids, on_close: a tensor-parallel group's other ranks
        and how to stop them."""
        self.engine = engine
        self.kind = kind
        self.model_name = engine.model_config.name
        self.layout = engine.layout
        self.device = engine.device
        self.follower_pids = tuple(follower_pids)
        self._on_close = on_close
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stopping = False
        self.busy_seconds = 0.0  # in engine steps, since start
        self._thread = None
        if own_thread:
            self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
            self._thread.start()

    def run_here(self) -> None:
        """Run the step loop in the calling thread until stop()."""
        self._loop()

    # -- the small interface -----------------------------------------------------------------

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Yield the request's outputs as they come; leaving early (cancel, break) aborts it."""
        queue = self._open(request)
        async for output in stream_outputs(queue, self._streams, request.request_id, self.abort):
            yield output

    async def prefill(self, request: EngineRequest) -> EngineOutput:
        """Prefill only: returns the first token. Unless that token already ends the request
        (finish_reason other than "prefilled"), the prompt's KV stays held until release_held()."""
        request.prefill_only = True
        output = None
        async for output in self.generate(request):
            pass
        if output is None or output.finish_reason == "error":
            raise EngineError(output.error if output else "prefill produced nothing")
        return output

    def export_kv(self, request_id: str, start: int = 0) -> torch.Tensor:
        """A held prompt's KV from token `start` on: [layers, 2, tokens - start, local kv heads, head_dim]."""
        return self.engine.export_kv(request_id, start)

    def release_held(self, request_id: str) -> int:
        return self.engine.release_held(request_id)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wake.set()

    def reserve(self, request_id: str, num_tokens: int, prompt_ids: list[int] | None = None) -> int:
        return self.engine.reserve(request_id, num_tokens, prompt_ids)

    def release_reservation(self, request_id: str) -> bool:
        return self.engine.release_reservation(request_id)

    def validate(self, prompt_ids: list[int], max_tokens: int) -> None:
        self.engine.validate(prompt_ids, max_tokens)

    def load(self) -> EngineLoad:
        running, waiting = self.engine.load()
        queried, hits = self.engine.prefix_cache_stats()
        return EngineLoad(running, waiting, self.engine.num_free_blocks, self.engine.num_total_blocks,
                          self.engine.config.block_size, memory_used_bytes(self.device),
                          busy_seconds=self.busy_seconds, cached_blocks=self.engine.num_cached_blocks,
                          prefix_queried_tokens=queried, prefix_hit_tokens=hits,
                          cached_block_hashes=tuple(self.engine.cached_block_hashes(MAX_REPORTED_HASHES)))

    def has_work(self) -> bool:
        return self.engine.has_work()

    def fingerprint(self) -> KVFingerprint:
        return KVFingerprint(self.kind, self.model_name, self.layout)

    def stop(self) -> None:
        """End the step loop (run_here returns)."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def close(self) -> None:
        """Release what the engine holds beyond this process (a tensor-parallel group's ranks)."""
        if self._on_close is not None:
            self._on_close()

    # -- internals ---------------------------------------------------------------------------

    def _open(self, request: EngineRequest) -> asyncio.Queue:
        if request.kv_transfer_params is not None:
            raise FailedPreconditionError(f"the {self.kind} engine takes KV as tensors, not a transfer handle "
                                          "(kv_transfer_params come from a vllm prefill worker)")
        queue: asyncio.Queue = asyncio.Queue()
        if request.request_id in self._streams:
            raise EngineError(f"request id {request.request_id!r} is already streaming")
        self._streams[request.request_id] = (asyncio.get_running_loop(), queue)
        try:
            self.engine.add_request(request)
        except BaseException:
            self._streams.pop(request.request_id, None)
            raise
        self._wake.set()
        return queue

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stopping:
            if not self.engine.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            start = time.perf_counter()
            try:
                outputs = self.engine.step()
            except Exception:  # the engine catches batch errors; this is a bug, keep serving
                log.exception("engine step failed")
                continue
            finally:
                self.busy_seconds += time.perf_counter() - start
            self._deliver(outputs)

    def _deliver(self, outputs: list[EngineOutput]) -> None:
        """Hand a step's outputs to their streams: one wake-up per event loop per step, not one per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                loop, queue = stream
                by_loop.setdefault(loop, []).append((queue, output))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[asyncio.Queue, EngineOutput]]) -> None:
    for queue, output in items:
        queue.put_nowait(output)
