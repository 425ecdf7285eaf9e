"""The scheduler's waiting room: bounded, strictly ordered by priority, fair between tenants.

A request waits here until a decode worker can reserve KV blocks for its prompt + max_tokens
(the dispatcher asks the router); nothing is admitted that could run out of KV mid-stream. Over
a bound, an arrival is refused at once (RESOURCE_EXHAUSTED with a retry delay from the measured
drain rate) unless it outranks queued requests: then the newest request of the lowest priority
is displaced instead. Within a priority class the tenant that has been served the fewest tokens
goes next, so no tenant starves another.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from pdmesh.errors import DeadlineError, PdmeshError, ResourceExhaustedError
from pdmesh.scheduler.prefix_affinity import PromptBlocks
from pdmesh.scheduler.tenants import Tenant


class QueueFullError(ResourceExhaustedError):
    rejection_reason = "queue_full"


class DisplacedError(ResourceExhaustedError):
    rejection_reason = "displaced"


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    max_queued_requests: int = 1024
    max_queued_tokens: int = 4_000_000  # prompt + max_tokens of everything queued

    def __post_init__(self):
        if self.max_queued_requests < 0 or self.max_queued_tokens < 0:
            raise ValueError("queue bounds must be >= 0")


_seq = itertools.count()


@dataclass(eq=False)
class Ticket:
    """One request's place in the queue; `outcome` resolves to the admission (or an error)."""

    tenant: Tenant
    priority: int
    tokens: int  # prompt + max_tokens
    num_prompt_tokens: int = 0
    arrival: float = field(default_factory=time.monotonic)
    seq: int = field(default_factory=lambda: next(_seq))
    outcome: asyncio.Future | None = None
    prompt: PromptBlocks | None = None  # for cache-aware routing


class DrainRate:
    """Admissions per second while requests are waiting, smoothed.

    Only gaps during which the queue was never empty count: an idle queue says nothing about how
    fast the mesh drains it. The basis of retry delays and start predictions.
    """

    def __init__(self, alpha: float = 0.2, clock: Callable[[], float] = time.monotonic):
        self.alpha = alpha
        self.clock = clock
        self.interval: float | None = None
        self._backlog_since: float | None = None

    @property
    def rate(self) -> float:
        return 1.0 / self.interval if self.interval else 0.0

    def tick(self, still_waiting: bool) -> None:
        """One request left the queue; still_waiting: others remain behind it."""
        now = self.clock()
        if self._backlog_since is not None:
            gap = max(now - self._backlog_since, 1e-5)
            self.interval = gap if self.interval is None else self.interval + self.alpha * (gap - self.interval)
        self._backlog_since = now if still_waiting else None

    def tick_arrival(self) -> None:
        """A request arrived at an empty queue: a backlog (possibly) starts now."""
        self._backlog_since = self.clock()

    def seconds_for(self, count: int) -> float | None:
        return count * self.interval if self.interval else None


class AdmissionQueue:
    def __init__(self, config: AdmissionConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        self.classes: dict[int, dict[str, deque[Ticket]]] = {}  # priority -> tenant -> FIFO
        self.num_requests = 0
        self.num_tokens = 0
        self.drain = DrainRate(clock=clock)

    # -- arrivals ------------------------------------------------------------------------------

    def push(self, ticket: Ticket) -> list[Ticket]:
        """Queue a ticket; returns tickets displaced to make room. Raises if it cannot get in."""
        displaced = []
        while self._over(ticket):
            victim = self._newest_lowest()
            if victim is None or victim.priority >= ticket.priority:
                self._give_back_displaced(displaced)
                raise self._full_error(ticket)
            self.remove(victim)
            displaced.append(victim)
        tenants = self.classes.setdefault(ticket.priority, {})
        queue = tenants.setdefault(ticket.tenant.name, deque())
        if not queue:  # a tenant returning from idle starts level with the busiest, not far behind
            active = [q[0].tenant.served_tokens for name, q in tenants.items() if q and name != ticket.tenant.name]
            if active:
                ticket.tenant.served_tokens = max(ticket.tenant.served_tokens, min(active))
        queue.append(ticket)
        if not self.num_requests:
            self.drain.tick_arrival()
        self.num_requests += 1
        self.num_tokens += ticket.tokens
        return displaced

    def _over(self, ticket: Ticket) -> bool:
        return (self.num_requests + 1 > self.config.max_queued_requests
                or self.num_tokens + ticket.tokens > self.config.max_queued_tokens)

    def _give_back_displaced(self, displaced: list[Ticket]) -> None:
        for victim in displaced:  # the arrival did not fit after all: undo
            self.classes.setdefault(victim.priority, {}).setdefault(victim.tenant.name, deque()).append(victim)
            self.num_requests += 1
            self.num_tokens += victim.tokens

    def _full_error(self, ticket: Ticket) -> QueueFullError:
        if self.num_requests + 1 > self.config.max_queued_requests:
            what = f"the queue holds {self.num_requests:,} requests; max-queued-requests is " \
                   f"{self.config.max_queued_requests:,}"
        else:
            what = f"the queue holds {self.num_tokens:,} tokens and this request needs {ticket.tokens:,}; " \
                   f"max-queued-tokens is {self.config.max_queued_tokens:,}"
        return QueueFullError(what, retry_after_s=self.retry_after())

    def retry_after(self) -> float:
        """Seconds until about one queued request has left, from the measured drain rate."""
        seconds = self.drain.seconds_for(1)
        return 1.0 if seconds is None else min(30.0, max(0.05, seconds))

    def _newest_lowest(self) -> Ticket | None:
        if not self.num_requests:
            return None
        lowest = min(p for p, t in self.classes.items() if any(t.values()))
        return max((q[-1] for q in self.classes[lowest].values() if q), key=lambda t: t.seq)

    # -- departures ----------------------------------------------------------------------------

    def peek(self) -> Ticket | None:
        """The ticket that goes next: highest priority, then the least-served tenant, then FIFO."""
        for priority in sorted(self.classes, reverse=True):
            heads = [q[0] for q in self.classes[priority].values() if q]
            if heads:
                return min(heads, key=lambda t: (t.tenant.served_tokens, t.seq))
        return None

    def position(self, ticket: Ticket) -> int:
        """Requests that go before this one (an estimate within its class)."""
        ahead = sum(len(q) for p, tenants in self.classes.items() if p > ticket.priority for q in tenants.values())
        same = self.classes.get(ticket.priority, {})
        return ahead + sum(1 for q in same.values() for t in q if t.seq < ticket.seq)

    def admit(self, ticket: Ticket) -> None:
        """Take ticket (the one peek() returned) out of the queue as admitted."""
        self.remove(ticket)
        ticket.tenant.served_tokens += ticket.tokens
        self.drain.tick(still_waiting=self.num_requests > 0)

    def remove(self, ticket: Ticket) -> bool:
        queue = self.classes.get(ticket.priority, {}).get(ticket.tenant.name)
        if not queue or ticket not in queue:
            return False
        queue.remove(ticket)
        self.num_requests -= 1
        self.num_tokens -= ticket.tokens
        return True

    def depth_by_priority(self) -> dict[int, int]:
        return {p: sum(len(q) for q in tenants.values()) for p, tenants in self.classes.items()}

    def check_deadline(self, ticket: Ticket, timeout_s: float | None) -> None:
        """Refuse a request whose predicted start already lies past its deadline."""
        if timeout_s is None:
            return
        ahead = self.position(ticket)
        predicted = self.drain.seconds_for(ahead) if ahead else None
        if predicted is not None and predicted > timeout_s:
            raise DeadlineError(
                f"predicted start in {predicted:.1f}s ({ahead:,} requests ahead, draining "
                f"{self.drain.rate:.2f}/s) is past the request's deadline of {timeout_s:.1f}s")


def fail(ticket: Ticket, error: PdmeshError) -> None:
    if ticket.outcome is not None and not ticket.outcome.done():
        ticket.outcome.set_exception(error)
