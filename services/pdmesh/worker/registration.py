"""Joins the scheduler and heartbeats the worker's load until the worker stops."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import grpc

from pdmesh.rpc.channels import internal_channel
from pdmesh.rpc.cluster_auth import ClusterCredentials
from pdmesh.gen.pdmesh.v1 import registry_pb2, registry_pb2_grpc, worker_pb2

log = logging.getLogger(__name__)


class Registration:
    """Register once, then heartbeat; re-register whenever the scheduler forgets us (it restarted)."""

    def __init__(self, scheduler_address: str, credentials: ClusterCredentials,
                 register_request: Callable[[], registry_pb2.RegisterRequest],
                 load: Callable[[], worker_pb2.WorkerLoad], interval_s: float = 1.0):
        self.scheduler_address = scheduler_address
        self.credentials = credentials
        self.register_request = register_request
        self.load = load
        self.interval_s = interval_s
        self.registered = asyncio.Event()
        self.refused = ""  # why the scheduler refused us (FAILED_PRECONDITION), logged once per reason

    async def run(self) -> None:
        async with internal_channel(self.scheduler_address, self.credentials) as channel:
            stub = registry_pb2_grpc.RegistryStub(channel)
            refused = ""
            while True:
                try:
                    await self._beat(stub)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                        if exc.details() != self.refused:
                            log.error("scheduler %s refused this worker: %s", self.scheduler_address, exc.details())
                        self.refused = exc.details()
                    elif self.registered.is_set():
                        log.warning("scheduler %s: %s; registering again", self.scheduler_address, exc.code().name)
                    elif exc.code() == grpc.StatusCode.FAILED_PRECONDITION and exc.details() != refused:
                        refused = exc.details()  # said once per reason, not on every retry
                        log.error("the scheduler refused this worker: %s", refused)
                    self.registered.clear()
                await asyncio.sleep(self.interval_s)

    async def _beat(self, stub: registry_pb2_grpc.RegistryStub) -> None:
        timeout = max(1.0, 2 * self.interval_s)
        if not self.registered.is_set():
            request = self.register_request()
            request.load.CopyFrom(self.load())
            response = await stub.Register(request, timeout=timeout)
            self.interval_s = response.heartbeat_interval_s or self.interval_s
            self.registered.set()
            log.info("registered with scheduler %s", self.scheduler_address)
            return
        request = registry_pb2.HeartbeatRequest(worker_id=self.register_request().worker_id, load=self.load())
        await stub.Heartbeat(request, timeout=timeout)
