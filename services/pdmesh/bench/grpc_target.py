"""A pdmesh scheduler's gRPC client port as a benchmark target (`grpc://HOST:PORT`, `grpcs://`)."""

from __future__ import annotations

import time

from pdmesh.bench.request_record import OK, RequestRecord
from pdmesh.bench.workload import BenchRequest
from pdmesh.client import AsyncPdmeshClient, PdmeshClientError


class GrpcTarget:
    def __init__(self, address: str, api_key: str = "", tls_ca: str | None = None, timeout_s: float = 300.0,
                 temperature: float = 0.0, ignore_eos: bool = True):
        self.address = address
        self.client = AsyncPdmeshClient(address, timeout_s=timeout_s, retries=0, api_key=api_key or None,
                                        tls_ca=tls_ca)
        self.temperature, self.ignore_eos = temperature, ignore_eos

    async def send(self, request: BenchRequest) -> RequestRecord:
        record = RequestRecord(request.index, time.perf_counter())
        try:
            async for chunk in self.client.stream(prompt_token_ids=list(request.prompt_ids),
                                                  max_tokens=request.output_tokens, temperature=self.temperature,
                                                  ignore_eos=self.ignore_eos):
                if chunk.token_ids:
                    record.chunk_times.append(time.perf_counter())
                if chunk.finish_reason:
                    record.prompt_tokens, record.output_tokens = chunk.prompt_tokens, chunk.completion_tokens
                    record.status = OK
        except PdmeshClientError as exc:
            record.status, record.error = exc.code_name, exc.message
        record.end = time.perf_counter()
        return record

    async def close(self) -> None:
        await self.client.close()
