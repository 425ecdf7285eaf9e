"""Keeps a set of child processes running: a child that exits is started again after a backoff,
until it crashes too often, and then serve says so loudly and carries on without it.

Pure bookkeeping around `subprocess.Popen`; the caller calls `poll()` regularly (serve's main
loop does, every 0.2 s) and `stop_all()` once at the end.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from pdmesh.serve_config import SupervisionConfig

log = logging.getLogger(__name__)


@dataclass
class Child:
    name: str
    start: Callable[[int], subprocess.Popen]  # restarts so far -> a running process
    proc: subprocess.Popen | None = None
    restarts: int = 0
    crashes: deque = field(default_factory=deque)  # monotonic times of recent exits
    restart_at: float | None = None  # set while waiting out a backoff
    given_up: bool = False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Supervisor:
    def __init__(self, policy: SupervisionConfig, clock: Callable[[], float] = time.monotonic):
        self.policy = policy
        self.clock = clock
        self.children: dict[str, Child] = {}

    def add(self, name: str, start: Callable[[int], subprocess.Popen]) -> Child:
        """Start a child now and keep it running from here on."""
        child = self.children[name] = Child(name, start)
        child.proc = start(0)
        return child

    def poll(self) -> None:
        """Notice exits, schedule restarts, and start the children whose backoff is over."""
        now = self.clock()
        for child in self.children.values():
            if child.given_up:
                continue
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self._restart(child)
            elif child.proc is not None and child.proc.poll() is not None:
                self._exited(child, now)

    def backoff_s(self, crashes: int) -> float:
        """Delay before the restart that follows the `crashes`-th recent crash (1 s, 2 s, 4 s ... 30 s)."""
        return min(self.policy.restart_backoff_max_s, self.policy.restart_backoff_s * 2 ** (crashes - 1))

    def _exited(self, child: Child, now: float) -> None:
        code = child.proc.returncode
        child.crashes.append(now)
        while child.crashes and child.crashes[0] < now - self.policy.crash_window_s:
            child.crashes.popleft()
        if len(child.crashes) >= self.policy.max_crashes:
            child.given_up = True
            message = (f"pdmesh serve: GIVING UP on {child.name}: it exited {len(child.crashes)} times within "
                       f"{self.policy.crash_window_s:g}s (last exit code {code}); the mesh runs without it")
            print(message, file=sys.stderr, flush=True)
            log.error(message)
            return
        delay = self.backoff_s(len(child.crashes))
        child.restart_at = now + delay
        print(f"pdmesh serve: {child.name} exited with code {code}; restarting it in {delay:g}s",
              file=sys.stderr, flush=True)

    def _restart(self, child: Child) -> None:
        child.restart_at = None
        child.restarts += 1
        child.proc = child.start(child.restarts)
        log.info("restarted %s (pid %d, restart %d)", child.name, child.proc.pid, child.restarts)

    def stop_all(self, order: list[str], timeout_s: float = 30.0) -> None:
        """SIGTERM the running children in `order` (workers drain first), then SIGKILL stragglers."""
        procs = [self.children[n].proc for n in order if self.children[n].running]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        deadline = self.clock() + timeout_s
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - self.clock()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
