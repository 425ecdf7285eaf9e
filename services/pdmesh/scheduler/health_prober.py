"""Watches every registered worker: heartbeat age plus an active gRPC health probe.

A worker that misses its heartbeats or fails a probe leaves the routing set at once (its circuit
breaker opens); it rejoins after a later probe succeeds. Detection latency, the time from the last
sign of life to leaving routing, is measured for each failure.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdmesh.rpc.channels import internal_channel
from pdmesh.rpc.cluster_auth import ClusterCredentials
from pdmesh.scheduler.registry import WorkerInfo, WorkerRegistry

log = logging.getLogger(__name__)
SERVING = health_pb2.HealthCheckResponse.SERVING


class HealthProber:
    def __init__(self, registry: WorkerRegistry, credentials: ClusterCredentials, interval_s: float = 0.5,
                 timeout_s: float = 2.0):
        self.registry = registry
        self.credentials = credentials
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._stubs: dict[str, health_pb2_grpc.HealthStub] = {}

    async def run_forever(self) -> None:
        """Every interval, check each worker; a hung probe never delays the others' checks."""
        in_flight: dict[str, asyncio.Task] = {}
        while True:
            for worker in list(self.registry.workers.values()):
                task = in_flight.get(worker.worker_id)
                if task is None or task.done():
                    in_flight[worker.worker_id] = asyncio.create_task(self.check(worker))
                else:
                    self._check_heartbeat(worker, time.monotonic())
            await asyncio.sleep(self.interval_s)

    def _check_heartbeat(self, worker: WorkerInfo, now: float) -> bool:
        if worker.age(now) > self.registry.heartbeat_timeout_s:
            self.registry.report_failure(worker, f"no heartbeat for {worker.age(now):.1f}s")
            return False
        return True

    async def check(self, worker: WorkerInfo) -> None:
        now = time.monotonic()
        if not self._check_heartbeat(worker, now) or not worker.breaker.may_probe(now):
            return
        ok, why, hard = await self._probe(worker)
        if ok:
            self.registry.report_success(worker)
        else:
            self.registry.report_failure(worker, why, hard)

    async def _probe(self, worker: WorkerInfo) -> tuple[bool, str, bool]:
        """(ok, why not, whether the failure is certain rather than a slow answer)."""
        stub = self._stubs.get(worker.address)
        if stub is None:
            stub = self._stubs[worker.address] = health_pb2_grpc.HealthStub(
                internal_channel(worker.address, self.credentials))
        try:
            response = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            return False, f"health probe failed: {exc.code().name}", exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED
        if response.status != SERVING:
            return False, f"health is {health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)}", True
        return True, "", False
