"""Retention: how long events, ended allocations and idempotency keys are kept, and the pruning step.

Rules:
- Each call of `prune` (one per broker tick) deletes at most `batch` events and `batch` ended allocations,
  oldest first, so no store job holds the database for long; a backlog drains over the following ticks.
- The newest event is never pruned: event ids are rowids and must only rise (subscribers resume by id).
- An ended allocation's usage outlives it in the hourly totals (`usage_hours`): `usage` and budgets stay right
  after it is pruned. A `usage` window that reaches back past the allocations kept starts on the hour.
- An idempotency key expires `key_expiry` after the request that used it, once the allocation it made has
  ended: a request with it then makes a new allocation. A key of a queued or active allocation never expires.
- 0 keeps for ever (days) or never expires (keys).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from mcpresd.core.model import Allocation

DAY = 86400.0


@dataclass(frozen=True)
class Retention:
    """[retention] from the config."""

    events_days: float = 90.0
    ended_allocations_days: float = 90.0
    key_expiry: float = DAY
    batch: int = 500

    def events_before(self, now: float) -> float | None:
        """Events older than this are pruned; None: kept for ever."""
        return now - self.events_days * DAY if self.events_days > 0 else None

    def allocations_before(self, now: float) -> float | None:
        """Allocations that ended before this are pruned; None: kept for ever."""
        return now - self.ended_allocations_days * DAY if self.ended_allocations_days > 0 else None

    def key_expired(self, allocation: Allocation, now: float) -> bool:
        return (self.key_expiry > 0 and allocation.released_at is not None
                and allocation.created_at + self.key_expiry <= now)


class PrunedStore(Protocol):
    def prune_events(self, before: float, limit: int) -> int: ...

    def prune_ended_allocations(self, before: float, limit: int) -> int: ...


def prune(store: PrunedStore, retention: Retention, now: float) -> tuple[int, int]:
    """One small batch of each: (events, allocations) deleted."""
    events_before, allocations_before = retention.events_before(now), retention.allocations_before(now)
    events = 0 if events_before is None else store.prune_events(events_before, retention.batch)
    allocations = 0 if allocations_before is None else store.prune_ended_allocations(allocations_before,
                                                                                     retention.batch)
    return events, allocations
