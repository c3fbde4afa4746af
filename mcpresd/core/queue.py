"""The wait queue: who is served next, what the head keeps, who may be preempted.

Rules (docs/scheduling.md says the same for users):
- Order: by effective priority (critical > high > normal > low), then first come,
  first served. Aging: a request gains one priority level for every
  `aging_interval` seconds it has waited, up to critical, so a low request that
  has waited long enough is served.
- Head-of-line protection: the first request in that order that does not fit
  keeps what is free now of what it needs (its reservation). Later requests are
  granted only from what is left, so they never delay the head; a 2-GPU request
  is served when two GPUs come free even while 1-GPU requests keep arriving.
- Preemption (only when enabled): if the head is high or critical and still does
  not fit, preemptible allocations of lower priority may be revoked, lowest
  priority and newest first, as few as make the head fit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from operator import itemgetter

from mcpresd.core.errors import DomainError, InsufficientCapacity
from mcpresd.core.ledger import Ledger, quantity
from mcpresd.core.model import Allocation, AllocationItem
from mcpresd.core.pools import Pool
from mcpresd.protocol import POOL_PREFIX, Priority

RANK = {Priority.LOW: 0, Priority.NORMAL: 1, Priority.HIGH: 2, Priority.CRITICAL: 3}
TOP = RANK[Priority.CRITICAL]


def effective_rank(allocation: Allocation, now: float, aging_interval: float) -> int:
    base = RANK[allocation.priority]
    if aging_interval <= 0:
        return base
    return min(TOP, base + int(max(0.0, now - allocation.created_at) // aging_interval))


def order(queued: Iterable[Allocation], now: float, aging_interval: float) -> list[Allocation]:
    """Queued requests in the order they are served."""
    # effective_rank inlined: this runs on every pass over the whole queue.
    if aging_interval > 0:
        keyed = [(-min(TOP, RANK[a.priority] + int(max(0.0, now - a.created_at) // aging_interval)), a.created_at, a.id,
                  a) for a in queued]
    else:
        keyed = [(-RANK[a.priority], a.created_at, a.id, a) for a in queued]
    keyed.sort(key=_sort_key)
    return [entry[3] for entry in keyed]


_sort_key = itemgetter(0, 1, 2)


@dataclass(frozen=True)
class Grant:
    allocation: Allocation
    items: tuple[AllocationItem, ...]


@dataclass(frozen=True)
class Rejection:
    """A queued request that can never be served any more (e.g. its resource was removed)."""

    allocation: Allocation
    error: DomainError


@dataclass(frozen=True)
class Pass:
    grants: tuple[Grant, ...]
    rejections: tuple[Rejection, ...]
    head: Allocation | None
    reservation: tuple[AllocationItem, ...]


def schedule(ledger: Ledger, queued: Iterable[Allocation], now: float, aging_interval: float) -> Pass:
    """One scheduling pass. Grants are applied to the ledger (held); the head's reservation is not."""
    grants: list[Grant] = []
    rejections: list[Rejection] = []
    head: Allocation | None = None
    reservation: tuple[AllocationItem, ...] = ()
    blocked: set[tuple[object, ...]] = set()
    for allocation in order(queued, now, aging_interval):
        assert allocation.request is not None
        if allocation.request.key in blocked:
            continue  # capacity only shrinks during a pass: an equal request that did not fit still does not
        try:
            items = ledger.plan_request(allocation.request)
        except InsufficientCapacity:
            if head is None:
                head = allocation
                reservation = ledger.reserve(allocation.request)
                ledger.hold(reservation)
            else:
                blocked.add(allocation.request.key)
            continue
        except DomainError as error:
            rejections.append(Rejection(allocation, error))
            continue
        ledger.hold(items)
        grants.append(Grant(allocation, items))
    if reservation:
        ledger.unhold(reservation)
    return Pass(tuple(grants), tuple(rejections), head, reservation)


def choose_victims(ledger: Ledger, head: Allocation, active: Sequence[Allocation], now: float,
                   aging_interval: float) -> list[Allocation]:
    """The fewest preemptible, lower-priority allocations whose release lets `head` fit; [] if none can."""
    assert head.request is not None
    rank = effective_rank(head, now, aging_interval)
    if rank < RANK[Priority.HIGH]:
        return []
    candidates = sorted(
        (a for a in active if a.preemptible and a.preempt_at is None and RANK[a.priority] < rank),
        key=lambda a: (RANK[a.priority], -a.created_at),
    )
    chosen: list[Allocation] = []
    try:
        for victim in candidates:
            ledger.unhold(victim.items)
            chosen.append(victim)
            try:
                ledger.plan_request(head.request)
            except InsufficientCapacity:
                continue
            return _fewest(ledger, head, chosen)
        return []
    finally:
        for victim in chosen:
            ledger.hold(victim.items)


def _fewest(ledger: Ledger, head: Allocation, chosen: list[Allocation]) -> list[Allocation]:
    """Drop victims that turn out not to be needed. The ledger has all of `chosen` unheld, before and after."""
    assert head.request is not None
    needed = list(chosen)
    spared: list[Allocation] = []
    for victim in chosen[:-1]:
        ledger.hold(victim.items)
        try:
            ledger.plan_request(head.request)
        except InsufficientCapacity:
            ledger.unhold(victim.items)
            continue
        needed.remove(victim)
        spared.append(victim)
    for victim in spared:
        ledger.unhold(victim.items)
    return needed


@dataclass(frozen=True)
class Explanation:
    position: int
    queue_length: int
    fits_now: bool
    shortfalls: tuple[dict[str, object], ...]
    blockers: tuple[tuple[Allocation, tuple[AllocationItem, ...]], ...]
    head: Allocation | None
    suggestion: str
    estimate: float | None
    basis: str


ExpectedEnd = Callable[[Allocation], tuple[float | None, str]]
"""When an active allocation is expected to end, and on what basis (its TTL, or its tool's history)."""


def _by_ttl(allocation: Allocation) -> tuple[float | None, str]:
    return allocation.expires_at, "its TTL"


def explain(ledger: Ledger, target: Allocation, queued: Sequence[Allocation], active: Sequence[Allocation],
            now: float, aging_interval: float, expected_end: ExpectedEnd = _by_ttl) -> Explanation:
    """Why a queued request waits: its place, who holds what it needs, the smallest change, and when."""
    assert target.request is not None
    ordered = order(queued, now, aging_interval)
    position = next((i for i, a in enumerate(ordered, 1) if a.id == target.id), len(ordered))
    try:
        ledger.plan_request(target.request)
    except InsufficientCapacity as error:
        shortfalls = tuple(error.data.get("shortfalls", ()))
    else:
        head = ordered[0] if ordered and ordered[0].id != target.id else None
        why = f"it fits, but waits behind {head.id}, which keeps what it needs" if head else "it fits now"
        return Explanation(position, len(ordered), True, (), (), head, why, None, "")
    lacking = {str(s["resource"]) for s in shortfalls}
    blockers = []
    for allocation in active:
        held = tuple(i for i in allocation.items if _lacks(ledger, i.resource, lacking))
        if held:
            blockers.append((allocation, held))
    blockers.sort(key=lambda b: -sum(i.amount for i in b[1]))
    suggestion = _smallest_change(ledger, target, blockers, shortfalls)
    estimate, basis = _estimate(ledger, target, [b[0] for b in blockers], expected_end)
    return Explanation(position, len(ordered), False, shortfalls, tuple(blockers), None, suggestion, estimate, basis)


def _lacks(ledger: Ledger, resource_name: str, lacking: set[str]) -> bool:
    resource = ledger.find(resource_name)
    if resource_name in lacking or (resource is not None and resource.type.value in lacking):
        return True
    pool = ledger.pool_of(resource_name)
    return pool is not None and any(pool in {p.name for p in _pools_of(ledger, s)} for s in lacking
                                    if s.startswith(POOL_PREFIX))


def _pools_of(ledger: Ledger, selector: str) -> list[Pool]:
    try:
        return ledger.matched_pools(selector)
    except DomainError:
        return []


def _fits(ledger: Ledger, target: Allocation) -> bool:
    assert target.request is not None
    try:
        ledger.plan_request(target.request)
    except DomainError:
        return False
    return True


def _smallest_change(ledger: Ledger, target: Allocation,
                     blockers: list[tuple[Allocation, tuple[AllocationItem, ...]]],
                     shortfalls: tuple[dict[str, object], ...]) -> str:
    for allocation, held in sorted(blockers, key=lambda b: sum(i.amount for i in b[0].items)):
        ledger.unhold(allocation.items)
        try:
            if _fits(ledger, target):
                items = ", ".join(f"{i.resource}={quantity(i.amount, ledger.unit_of(i.resource))}" for i in held)
                return f"it would fit if {allocation.id} ({items}) were released"
        finally:
            ledger.hold(allocation.items)
    asks = [f"at most {quantity(float(str(s['free'])), ledger.unit_of(str(s['resource'])))} of {s['resource']}"
            for s in shortfalls]
    if asks:
        return "it would fit now if it asked for " + " and ".join(asks)
    return "it does not fit within its constraints now (cost or selectors)"


def _estimate(ledger: Ledger, target: Allocation, blockers: list[Allocation],
              expected_end: ExpectedEnd) -> tuple[float | None, str]:
    """The earliest time enough blockers are expected to have ended for `target` to fit, with the basis of each."""
    ends = [(end, basis, a) for a in blockers for end, basis in (expected_end(a),) if end is not None]
    ends.sort(key=itemgetter(0))
    released: list[Allocation] = []
    bases: list[str] = []
    try:
        for end, basis, allocation in ends:
            ledger.unhold(allocation.items)
            released.append(allocation)
            bases.append(f"{allocation.id}: {basis}")
            if _fits(ledger, target):
                return end, "when these end: " + "; ".join(bases)
    finally:
        for allocation in released:
            ledger.hold(allocation.items)
    if ends:
        return None, "no estimate: even the allocations with an expected end would not free enough"
    return None, "no estimate: the allocations it waits for have no TTL and their tools no run history"
