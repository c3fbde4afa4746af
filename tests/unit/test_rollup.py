"""Per-minute rollups of metric history and retention arithmetic."""

from __future__ import annotations

import pytest

from mcpresd.core.rollup import Rollup, keep_newest, merge, minute_of, retention_cutoffs, roll_up


def test_rollups_are_exact() -> None:
    samples = [(0.0, 10.0), (59.999, 30.0), (30.0, 20.0), (60.0, 0.1), (61.0, 0.2), (119.0, 0.3), (185.0, -5.0)]
    assert roll_up(samples) == [
        Rollup(0.0, 10.0, 30.0, 20.0, 3),
        Rollup(60.0, 0.1, 0.3, 0.2, 3),
        Rollup(180.0, -5.0, -5.0, -5.0, 1),
    ]


def test_no_samples_give_no_rollups() -> None:
    assert roll_up([]) == []


@pytest.mark.parametrize("ts, minute", [(0.0, 0.0), (59.99, 0.0), (60.0, 60.0), (-0.5, -60.0),
                                        (1_700_000_123.4, 1_700_000_100.0)])
def test_a_sample_belongs_to_the_minute_it_falls_in(ts: float, minute: float) -> None:
    assert minute_of(ts) == minute


def test_merging_late_samples_equals_rolling_them_up_together() -> None:
    early = [(120.0, 1.0), (130.0, 2.0), (140.0, 6.0)]
    late = [(150.0, 3.0), (179.0, 8.0)]
    (a,), (b,) = roll_up(early), roll_up(late)
    assert merge(a, b) == roll_up(early + late)[0] == Rollup(120.0, 1.0, 8.0, 4.0, 5)


def test_rollups_of_different_minutes_are_not_merged() -> None:
    with pytest.raises(ValueError):
        merge(Rollup(0.0, 1, 1, 1, 1), Rollup(60.0, 1, 1, 1, 1))


def test_retention_cutoffs_are_now_minus_each_age() -> None:
    assert retention_cutoffs(now=10_000.0, raw_max_age=3600.0, rollup_max_age=7 * 86400.0) == (6400.0, -594800.0)


def test_negative_retention_ages_are_refused() -> None:
    with pytest.raises(ValueError):
        retention_cutoffs(now=0.0, raw_max_age=-1.0, rollup_max_age=1.0)


@pytest.mark.parametrize("count, limit, drop", [(0, 10, 0), (10, 10, 0), (15, 10, 5), (3, 0, 3)])
def test_keep_newest_drops_only_the_oldest_beyond_the_limit(count: int, limit: int, drop: int) -> None:
    assert keep_newest(count, limit) == drop
