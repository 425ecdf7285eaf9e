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
        addresses = [a for a in (request.prefill_address, *request.fallback_prefill_addresses) if a]
        chunks = self.stream.run(request.request_id, list(request.prompt_token_ids),
                                 sampling_from_pb(request.sampling), addresses, request.output_offset,
                                 context.time_remaining())
        async with contextlib.aclosing(chunks):  # a cancelled call frees the request's blocks now
            async for chunk in chunks:
                yield chunk

    async def Drain(self, request, context):
        return worker_pb2.DrainResponse(running=self.state.request_drain())
