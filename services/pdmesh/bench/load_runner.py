"""Sends a workload to a target: closed loop (N requests in flight, the next as one ends) or open
loop (each request at its arrival time, however many are in flight)."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Protocol

from pdmesh.bench.request_record import RequestRecord
from pdmesh.bench.workload import BenchRequest


class Target(Protocol):
    address: str

    async def send(self, request: BenchRequest) -> RequestRecord: ...

    async def close(self) -> None: ...


class Progress:
    """One line on stderr, rewritten as requests finish."""

    def __init__(self, label: str, total: int, enabled: bool):
        self.label, self.total, self.enabled = label, total, enabled
        self.done = self.failed = 0
        self.start = time.perf_counter()

    def add(self, record: RequestRecord) -> None:
        self.done += 1
        self.failed += not record.ok
        if self.enabled:
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
            filled = round(30 * self.done / self.total)
            sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
                             f"({self.failed} failed) {rate:.1f} req/s")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


async def run_load(target: Target, requests: list[BenchRequest], concurrency: int, open_loop: bool,
                   progress: Progress) -> list[RequestRecord]:
    """Every request's record, in request order."""
    if open_loop:
        return await _open_loop(target, requests, progress)
    return await _closed_loop(target, requests, concurrency, progress)


async def _closed_loop(target: Target, requests: list[BenchRequest], concurrency: int,
                       progress: Progress) -> list[RequestRecord]:
    pending = iter(requests)
    records: list[RequestRecord] = []

    async def worker() -> None:
        for request in pending:
            record = await target.send(request)
            records.append(record)
            progress.add(record)
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(requests)))))
    return sorted(records, key=lambda r: r.index)


async def _open_loop(target: Target, requests: list[BenchRequest], progress: Progress) -> list[RequestRecord]:
    start = time.perf_counter()

    async def at_its_time(request: BenchRequest) -> RequestRecord:
        await asyncio.sleep(max(0.0, start + request.send_at_s - time.perf_counter()))
        record = await target.send(request)
        progress.add(record)
        return record
    return list(await asyncio.gather(*(at_its_time(r) for r in requests)))
