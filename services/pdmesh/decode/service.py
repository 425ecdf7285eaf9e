"""The DecodeWorker gRPC servicer: protobuf in, DecodeStream out."""

from __future__ import annotations

import contextlib

from pdmesh.decode.stream import DecodeStream
from pdmesh.errors import UnavailableError
from pdmesh.gen.pdmesh.v1 import decode_pb2_grpc, worker_pb2
from pdmesh.worker.convert import sampling_from_pb
from pdmesh.worker.runtime import WorkerState


class DecodeWorkerServicer(decode_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, state: WorkerState, stream: DecodeStream):
        self.state = state
        self.stream = stream

    async def Generate(self, request, context):
        if self.state.draining:
            raise UnavailableError(f"decode worker {self.state.worker_id} is draining")
        self.state.requests_total += 1
        chunks = self.stream.run(request.request_id, list(request.prompt_token_ids),
                                 sampling_from_pb(request.sampling), request.prefill_address,
                                 context.time_remaining())
        async with contextlib.aclosing(chunks):  # a cancelled call frees the request's blocks now
            async for chunk in chunks:
                yield chunk

    async def Drain(self, request, context):
        self.state.draining = True
        running, _ = self.state.engine.engine.load()
        return worker_pb2.DrainResponse(running=running)
