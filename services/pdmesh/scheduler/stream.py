"""One client request through the mesh: route, call the decode worker, detokenize, stop strings.

The scheduler detokenizes incrementally (text deltas never split a character) and applies stop
strings itself, so workers deal in token ids only. Leaving early (stop string, client cancel,
deadline) cancels the decode call, which aborts the request on both workers and frees its KV.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import AsyncIterator

import grpc

from pdmesh import metrics
from pdmesh.engine.detokenizer import IncrementalDetokenizer
from pdmesh.errors import (DeadlineError, InvalidRequestError, PdmeshError, ResourceExhaustedError,
                           UnavailableError)
from pdmesh.gen.pdmesh.v1 import decode_pb2, decode_pb2_grpc
from pdmesh.scheduler.request_spec import GenerationSpec, ModelInfo
from pdmesh.scheduler.registry import WorkerRegistry
from pdmesh.scheduler.router import Assignment
from pdmesh.scheduler.stop_strings import StopStringMatcher
from pdmesh.worker.convert import sampling_to_pb


@dataclass(slots=True)
class Delta:
    """A piece of the client's stream; finish_reason and usage only on the last one."""

    text: str
    token_ids: list[int]
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0


class WorkerClients:
    """One channel and DecodeWorker stub per address, reused across requests."""

    def __init__(self):
        self._stubs: dict[str, decode_pb2_grpc.DecodeWorkerStub] = {}

    def decode(self, address: str) -> decode_pb2_grpc.DecodeWorkerStub:
        if address not in self._stubs:
            self._stubs[address] = decode_pb2_grpc.DecodeWorkerStub(grpc.aio.insecure_channel(address))
        return self._stubs[address]


class MeshStream:
    def __init__(self, model: ModelInfo, registry: WorkerRegistry, clients: WorkerClients):
        self.model = model
        self.registry = registry
        self.clients = clients

    async def run(self, spec: GenerationSpec, assignment: Assignment, arrived: float,
                  timeout_s: float | None) -> AsyncIterator[Delta]:
        """Stream one admitted request on the workers of its assignment. arrived: perf_counter()."""
        decode, prefill = assignment.decode, assignment.prefill
        call = self.clients.decode(decode.address).Generate(decode_pb2.DecodeRequest(
            request_id=spec.request_id, prompt_token_ids=spec.prompt_ids, sampling=sampling_to_pb(spec.params),
            prefill_address=prefill.address if prefill else ""), timeout=timeout_s)
        detokenizer = IncrementalDetokenizer(self.model.tokenizer, skip_special_tokens=True)
        stops = StopStringMatcher(list(spec.stop))
        completion = 0
        last = None
        try:
            async for chunk in call:
                now = time.perf_counter()
                if last is None:
                    assignment.start(time.monotonic())
                metrics.INTER_TOKEN_LATENCY.observe(now - last) if last else metrics.TIME_TO_FIRST_TOKEN.observe(now - arrived)
                last = now
                completion += len(chunk.token_ids)
                text = stops.feed(detokenizer.add(list(chunk.token_ids)))
                finish = "stop" if stops.stopped else chunk.finish_reason
                if finish and not stops.stopped:
                    text += stops.feed(detokenizer.flush()) + stops.flush()
                yield Delta(text, list(chunk.token_ids), finish, len(spec.prompt_ids) if finish else 0,
                            completion if finish else 0)
                if finish:
                    metrics.E2E_LATENCY.observe(time.perf_counter() - arrived)
                    metrics.GENERATION_TOKENS.inc(completion)
                    return
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self.registry.mark_down(decode.worker_id, 2.0)
            raise worker_error(exc, decode.address) from exc
        finally:
            if last is None:  # never started on the worker: stop counting it there now
                assignment.settle()
            call.cancel()
        raise UnavailableError(f"decode worker {decode.address} ended the stream without a finish reason")


def worker_error(exc: grpc.aio.AioRpcError, address: str) -> PdmeshError:
    """A worker's status, re-raised as the matching pdmesh error (so the client sees the same code)."""
    message = f"{exc.details()} (worker {address})"
    code = exc.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequestError(message)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhaustedError(message)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineError(message)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return UnavailableError(message)
    return PdmeshError(f"{code.name}: {message}")
