"""Metric history: per-minute rollups of raw samples, and how much history is kept.

Rules:
- A sample at time ts belongs to the minute starting at floor(ts / 60) * 60.
- A rollup holds the exact min, max and count of its minute's samples and their
  mean, computed exactly and rounded once (statistics.mean); oldest first.
- Late samples are added by merging a rollup of them into the stored one of the
  same minute; the merged mean is weighted by count.
- Retention: raw samples older than now - raw_max_age and rollups older than
  now - rollup_max_age are dropped; a count limit drops the oldest beyond it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby
from statistics import mean

MINUTE = 60.0


@dataclass(frozen=True)
class Rollup:
    minute_start: float
    min: float
    max: float
    avg: float
    count: int


def minute_of(ts: float) -> float:
    return math.floor(ts / MINUTE) * MINUTE


def roll_up(samples: Sequence[tuple[float, float]]) -> list[Rollup]:
    """One rollup per minute that has samples, oldest first. Samples are (time, value) in any order."""
    ordered = sorted(samples, key=lambda s: minute_of(s[0]))
    return [_rollup_of(minute, [value for _, value in group])
            for minute, group in groupby(ordered, key=lambda s: minute_of(s[0]))]


def _rollup_of(minute: float, values: list[float]) -> Rollup:
    return Rollup(minute, min(values), max(values), float(mean(values)), len(values))


def merge(a: Rollup, b: Rollup) -> Rollup:
    """Two rollups of the same minute as one."""
    if a.minute_start != b.minute_start:
        raise ValueError(f"cannot merge the minutes {a.minute_start:g} and {b.minute_start:g}")
    count = a.count + b.count
    avg = math.fsum((a.avg * a.count, b.avg * b.count)) / count if count else 0.0
    return Rollup(a.minute_start, min(a.min, b.min), max(a.max, b.max), avg, count)


def retention_cutoffs(now: float, raw_max_age: float, rollup_max_age: float) -> tuple[float, float]:
    """(raw cutoff, rollup cutoff): rows older than these times are dropped."""
    if raw_max_age < 0 or rollup_max_age < 0:
        raise ValueError("retention ages must be >= 0")
    return now - raw_max_age, now - rollup_max_age


def keep_newest(count: int, limit: int) -> int:
    """How many of the oldest rows to drop so that at most `limit` of `count` remain."""
    if limit < 0:
        raise ValueError("the limit must be >= 0")
    return max(0, count - limit)
