"""The admission queue on its own: bounds, priority order, displacement, tenant fairness, drain rate."""

from __future__ import annotations

import pytest

from pdmesh.errors import DeadlineError
from pdmesh.scheduler.admission import AdmissionConfig, AdmissionQueue, QueueFullError, Ticket
from pdmesh.scheduler.tenants import Tenant, TenantLimits


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def tenant(name: str) -> Tenant:
    return Tenant(TenantLimits(name))


def drain(queue: AdmissionQueue) -> list[Ticket]:
    order = []
    while (t := queue.peek()) is not None:
        queue.admit(t)
        order.append(t)
    return order


def test_request_bound_at_limit_minus_one_limit_and_plus_one():
    queue = AdmissionQueue(AdmissionConfig(max_queued_requests=3, max_queued_tokens=10**6))
    a = tenant("a")
    for _ in range(3):
        queue.push(Ticket(a, 0, 10))
    with pytest.raises(QueueFullError, match="holds 3 requests; max-queued-requests is 3"):
        queue.push(Ticket(a, 0, 10))
    assert queue.num_requests == 3


def test_token_bound_names_the_request():
    queue = AdmissionQueue(AdmissionConfig(max_queued_requests=100, max_queued_tokens=100))
    a = tenant("a")
    queue.push(Ticket(a, 0, 60))
    queue.push(Ticket(a, 0, 40))  # exactly at the bound
    with pytest.raises(QueueFullError, match="holds 100 tokens and this request needs 1; max-queued-tokens is 100"):
        queue.push(Ticket(a, 0, 1))


def test_priorities_are_strict_and_fifo_within_a_tenant():
    queue = AdmissionQueue(AdmissionConfig())
    a = tenant("a")
    low1, high, low2, mid = Ticket(a, 0, 1), Ticket(a, 9, 1), Ticket(a, 0, 1), Ticket(a, 5, 1)
    for t in (low1, high, low2, mid):
        queue.push(t)
    assert drain(queue) == [high, mid, low1, low2]


def test_full_queue_displaces_the_newest_lowest_priority_request():
    queue = AdmissionQueue(AdmissionConfig(max_queued_requests=3))
    a = tenant("a")
    old_low, mid, new_low = Ticket(a, 0, 1), Ticket(a, 3, 1), Ticket(a, 0, 1)
    for t in (old_low, mid, new_low):
        queue.push(t)
    high = Ticket(a, 7, 1)
    assert queue.push(high) == [new_low]
    with pytest.raises(QueueFullError):
        queue.push(Ticket(a, 0, 1))  # an equal priority never displaces
    assert drain(queue) == [high, mid, old_low]


def test_displacement_that_cannot_make_room_changes_nothing():
    queue = AdmissionQueue(AdmissionConfig(max_queued_requests=10, max_queued_tokens=100))
    a = tenant("a")
    queue.push(Ticket(a, 5, 50))
    queue.push(Ticket(a, 0, 50))
    with pytest.raises(QueueFullError):
        queue.push(Ticket(a, 3, 80))  # would need the priority-5 request's room too
    assert queue.num_requests == 2 and queue.num_tokens == 100


def test_tenants_share_a_priority_class_fairly():
    queue = AdmissionQueue(AdmissionConfig())
    flood, small = tenant("flood"), tenant("small")
    flood_tickets = [Ticket(flood, 0, 100) for _ in range(10)]
    for t in flood_tickets:
        queue.push(t)
    first = queue.peek()
    queue.admit(first)  # the flood gets served once before the other tenant shows up
    small_tickets = [Ticket(small, 0, 100) for _ in range(3)]
    for t in small_tickets:
        queue.push(t)
    order = drain(queue)
    positions = [order.index(t) for t in small_tickets]
    assert positions == [1, 3, 5]  # alternating with the flood, not behind its nine queued requests


def test_drain_rate_counts_only_backlogged_time_and_predicts_starts():
    clock = Clock()
    queue = AdmissionQueue(AdmissionConfig(), clock=clock)
    a = tenant("a")
    tickets = [Ticket(a, 0, 1) for _ in range(5)]
    for t in tickets:
        queue.push(t)
    for t in tickets[:3]:
        clock.now += 0.5
        queue.admit(t)
    assert queue.drain.rate == pytest.approx(2.0)
    assert queue.retry_after() == pytest.approx(0.5)
    late = Ticket(a, 0, 1)
    queue.push(late)
    with pytest.raises(DeadlineError, match=r"predicted start in 1.0s \(2 requests ahead, draining 2.00/s\)"):
        queue.check_deadline(late, timeout_s=0.9)
    queue.check_deadline(late, timeout_s=1.1)
    drain(queue)
    clock.now += 100  # an idle spell (nothing queued) is not a slow drain
    queue.push(Ticket(a, 0, 1))
    clock.now += 0.5
    queue.admit(queue.peek())
    assert queue.drain.rate > 1.0  # counting the 100 s would have made it ~0.01/s
