"""The wait queue's rules, on the pure core with a fake clock (plain numbers)."""

from __future__ import annotations

import pytest

from mcpresd.core import queue
from mcpresd.core.ledger import Ledger
from mcpresd.core.model import Allocation, AllocationItem, Demand, Request, Resource
from mcpresd.core.risk import GpuProcess, GpuReading, foreign_processes, risk_notes
from mcpresd.protocol import AllocationState, Priority, ResourceType

P = Priority


def units(capacity: float = 2) -> Ledger:
    return Ledger([Resource("units", ResourceType.CUSTOM, capacity, "u")])


def waiting(id: str, amount: float, priority: Priority = P.NORMAL, at: float = 0.0) -> Allocation:
    return Allocation(id, AllocationState.QUEUED, (), priority, 0, at, request=Request((Demand("units", amount),)))


def holding(id: str, amount: float, priority: Priority = P.NORMAL, *, preemptible: bool = False,
            expires_at: float | None = None, at: float = 0.0) -> Allocation:
    return Allocation(id, AllocationState.ACTIVE, (AllocationItem("units", amount),), priority, 0, at,
                      preemptible=preemptible, expires_at=expires_at, request=Request((Demand("units", amount),)))


def granted(result: queue.Pass) -> list[str]:
    return [g.allocation.id for g in result.grants]


def test_higher_priority_is_served_first() -> None:
    ledger = units(1)
    queued = [waiting("low", 1, P.LOW, 0), waiting("crit", 1, P.CRITICAL, 3), waiting("high", 1, P.HIGH, 1)]
    assert [a.id for a in queue.order(queued, now=5, aging_interval=0)] == ["crit", "high", "low"]
    assert granted(queue.schedule(ledger, queued, now=5, aging_interval=0)) == ["crit"]


def test_first_come_first_served_within_a_priority() -> None:
    queued = [waiting("b", 1, at=2), waiting("a", 1, at=1), waiting("c", 1, at=3)]
    assert [a.id for a in queue.order(queued, now=5, aging_interval=0)] == ["a", "b", "c"]


@pytest.mark.parametrize("waited, rank", [(0, 0), (59, 0), (60, 1), (150, 2), (10_000, 3)])
def test_aging_raises_a_request_one_level_per_interval_up_to_critical(waited: float, rank: int) -> None:
    assert queue.effective_rank(waiting("x", 1, P.LOW, at=0), now=waited, aging_interval=60) == rank


def test_a_low_request_that_waited_long_enough_goes_before_a_new_high_one() -> None:
    old_low, new_high = waiting("old-low", 1, P.LOW, at=0), waiting("new-high", 1, P.HIGH, at=299)
    assert [a.id for a in queue.order([new_high, old_low], now=300, aging_interval=100)][0] == "old-low"


def test_the_head_keeps_what_is_free_and_smaller_requests_cannot_take_it() -> None:
    ledger = units(2)
    ledger.hold([AllocationItem("units", 1)])
    queued = [waiting("big", 2, at=0), waiting("small", 1, at=1)]
    result = queue.schedule(ledger, queued, now=2, aging_interval=0)
    assert granted(result) == [] and result.head is not None and result.head.id == "big"
    assert ledger.used("units") == 1  # the reservation is not left behind
    ledger.unhold([AllocationItem("units", 1)])
    assert granted(queue.schedule(ledger, queued, now=3, aging_interval=0)) == ["big"]


def test_smaller_requests_may_use_what_the_head_does_not_need() -> None:
    ledger = Ledger([Resource("units", ResourceType.CUSTOM, 2, "u"), Resource("other", ResourceType.CUSTOM, 1, "u")])
    ledger.hold([AllocationItem("units", 1)])
    other = Allocation("other", AllocationState.QUEUED, (), P.NORMAL, 0, 1, request=Request((Demand("other", 1),)))
    result = queue.schedule(ledger, [waiting("big", 2, at=0), other], now=2, aging_interval=0)
    assert granted(result) == ["other"]


def test_a_big_request_is_served_while_small_ones_keep_arriving() -> None:
    ledger = units(2)
    running = [AllocationItem("units", 1), AllocationItem("units", 1)]
    ledger.hold(running)
    big = waiting("big", 2, at=0)
    queued = [big]
    for step in range(1, 6):
        queued.append(waiting(f"small-{step}", 1, at=step))
        ledger.unhold([running.pop()]) if running else None
        result = queue.schedule(ledger, queued, now=step, aging_interval=0)
        done = granted(result)
        queued = [a for a in queued if a.id not in done]
        if "big" in done:
            break
        assert not any(d.startswith("small") for d in done)
    assert big not in queued


def test_a_request_that_can_never_fit_any_more_is_rejected() -> None:
    ledger = units(2)
    result = queue.schedule(ledger, [waiting("huge", 3)], now=0, aging_interval=0)
    assert [r.allocation.id for r in result.rejections] == ["huge"]


def test_preemption_picks_the_fewest_lowest_priority_newest_victims() -> None:
    ledger = units(3)
    active = [holding("low-old", 1, P.LOW, preemptible=True, at=0),
              holding("low-new", 1, P.LOW, preemptible=True, at=5),
              holding("normal", 1, P.NORMAL, preemptible=True, at=1)]
    for allocation in active:
        ledger.hold(allocation.items)
    victims = queue.choose_victims(ledger, waiting("urgent", 1, P.CRITICAL, at=9), active, now=10, aging_interval=0)
    assert [v.id for v in victims] == ["low-new"]
    assert ledger.used("units") == 3


def test_no_preemption_for_normal_requests_or_of_unpreemptible_ones() -> None:
    ledger = units(1)
    active = [holding("a", 1, P.LOW, preemptible=False)]
    ledger.hold(active[0].items)
    assert queue.choose_victims(ledger, waiting("h", 1, P.HIGH), active, now=1, aging_interval=0) == []
    active = [holding("b", 1, P.LOW, preemptible=True)]
    assert queue.choose_victims(ledger, waiting("n", 1, P.NORMAL), active, now=1, aging_interval=0) == []


def test_explain_names_the_blocker_the_smallest_change_and_the_ttl_estimate() -> None:
    ledger = units(2)
    active = [holding("big-holder", 2, expires_at=100.0)]
    ledger.hold(active[0].items)
    target = waiting("me", 1, at=1)
    why = queue.explain(ledger, target, [target], active, now=5, aging_interval=0)
    assert (why.position, why.queue_length, why.fits_now) == (1, 1, False)
    assert [b[0].id for b in why.blockers] == ["big-holder"]
    assert "big-holder" in why.suggestion
    assert why.estimate == 100.0 and "TTL" in why.basis


def test_foreign_gpu_memory_is_a_risk_and_a_holders_own_child_is_not() -> None:
    reading = GpuReading(0.5, 8 << 30, 80 << 30, 0x4, (GpuProcess(500, 2 << 30, (500, 400)),
                                                          GpuProcess(900, 1 << 30, (900, 1)),
                                                          GpuProcess(None, None)))
    assert [p.pid for p in foreign_processes(reading, holders={400})] == [900]
    notes = risk_notes("gpu:0", reading, holders={400})
    assert any("1.0 GiB" in n and "900" in n for n in notes)
    assert any("power-capped" in n for n in notes)
    assert risk_notes("gpu:0", GpuReading(0.0, 0, 80 << 30, 0x1), holders=()) == []
