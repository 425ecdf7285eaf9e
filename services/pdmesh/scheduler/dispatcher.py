"""Moves requests from the admission queue to workers once a decode worker has room for them."""

from __future__ import annotations

import asyncio
import logging
import time

from pdmesh import metrics
from pdmesh.errors import DeadlineError, InvalidRequestError, ResourceExhaustedError, UnavailableError
from pdmesh.scheduler.admission import AdmissionQueue, DisplacedError, Ticket, fail
from pdmesh.scheduler.router import Assignment, Router

log = logging.getLogger(__name__)
POLL_S = 0.02  # capacity also frees up by heartbeat; re-check this often even when not woken
DEADLINE_MARGIN_S = 0.1
UNAVAILABLE_GRACE_S = 3.0  # with no routable worker, a request waits this long before UNAVAILABLE


class Dispatcher:
    def __init__(self, queue: AdmissionQueue, router: Router, local_prefill_threshold: int):
        self.queue = queue
        self.router = router
        self.local_prefill_threshold = local_prefill_threshold
        self.wake = asyncio.Event()

    async def submit(self, ticket: Ticket, timeout_s: float | None) -> Assignment:
        """Wait in the queue until admitted; returns the request's workers (counted against them)."""
        ticket.outcome = asyncio.get_running_loop().create_future()
        for victim in self.queue.push(ticket):
            fail(victim, DisplacedError(
                f"displaced from a full queue by a priority {ticket.priority} request "
                f"(this one has priority {victim.priority})", retry_after_s=self.queue.retry_after()))
        try:
            self.queue.check_deadline(ticket, timeout_s)
        except DeadlineError:
            self.queue.remove(ticket)
            raise
        self._publish_depth()
        self.wake.set()
        # Give up a moment before the client does, so it hears why rather than a bare deadline.
        wait_s = None if timeout_s is None else max(0.0, timeout_s - DEADLINE_MARGIN_S)
        try:
            return await asyncio.wait_for(asyncio.shield(ticket.outcome), wait_s)
        except BaseException as exc:  # deadline or cancel: an assignment made meanwhile goes unused
            if self.queue.remove(ticket):
                self._publish_depth()
            outcome = ticket.outcome
            if outcome.done() and not outcome.cancelled() and outcome.exception() is None:
                outcome.result().settle()
            if isinstance(exc, asyncio.TimeoutError):
                raise DeadlineError(f"the deadline ({timeout_s:.1f}s) passed while the request was queued") from None
            raise
        finally:
            metrics.QUEUE_TIME.observe(time.monotonic() - ticket.arrival)

    async def run_forever(self) -> None:
        while True:
            try:
                self.dispatch_ready()
            except Exception:  # a bug here must not stop admission for good
                log.exception("dispatch failed")
            try:
                await asyncio.wait_for(self.wake.wait(), POLL_S)
            except asyncio.TimeoutError:
                pass
            self.wake.clear()

    def dispatch_ready(self) -> None:
        """Admit queued requests in order while the one at the head fits a decode worker."""
        while (ticket := self.queue.peek()) is not None:
            try:
                decode = self.router.pick_decode(ticket.tokens, prompt=ticket.prompt)
                prefill = self.router.pick_prefill_for(ticket.num_prompt_tokens, self.local_prefill_threshold,
                                                       decode, ticket.prompt)
            except ResourceExhaustedError:
                return  # the head waits for KV blocks; strict order means everyone behind it waits too
            except UnavailableError as exc:
                if time.monotonic() - ticket.arrival < UNAVAILABLE_GRACE_S:
                    return  # workers may be back in a moment (a restart, a missed probe): wait a little
                self.queue.remove(ticket)
                fail(ticket, exc)
                continue
            except InvalidRequestError as exc:  # would never fit any worker: say so now
                self.queue.remove(ticket)
                fail(ticket, exc)
                continue
            self.queue.admit(ticket)
            ticket.outcome.set_result(self.router.assign(decode, prefill, ticket.num_prompt_tokens, ticket.tokens,
                                                         ticket.prompt))
        self._publish_depth()

    def _publish_depth(self) -> None:
        depth = self.queue.depth_by_priority()
        for priority, count in depth.items():
            metrics.QUEUE_DEPTH.labels(priority=str(priority)).set(count)
        metrics.QUEUED.set(self.queue.num_requests)
