"""Linear forecasts over recent (time, value) samples, and how good past forecasts were.

Rules:
- A line is fitted by least squares (statistics.linear_regression) to the
  finite points; fewer than 3 of them, or all at one time, give no forecast.
- Times are taken relative to the first point's time (`origin`), so epoch-sized
  timestamps do not eat the precision of the intercept.
- `time_until` answers "when will the value reach the threshold": 0 if it is
  there already, None if the line is flat or heading away from it.
- Forecasts are scored by MAPE (mean absolute percentage error, in %) against
  the values that followed; pairs whose actual value is 0 are skipped.
- No answer is infinite (JSON cannot carry it): a line too flat to reach its
  threshold in a finite time, or a prediction past the largest float, is None,
  and a pair whose error overflows is skipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from statistics import linear_regression

MIN_POINTS = 3


@dataclass(frozen=True)
class Line:
    slope: float
    intercept: float
    """The value at `origin`."""
    origin: float = 0.0

    def at(self, t: float) -> float:
        return self.intercept + self.slope * (t - self.origin)


@dataclass(frozen=True)
class Forecast:
    made_at: float
    target_time: float
    predicted: float


def fit(points: Sequence[tuple[float, float]]) -> Line | None:
    finite = [(t, v) for t, v in points if math.isfinite(t) and math.isfinite(v)]
    if len(finite) < MIN_POINTS:
        return None
    origin = finite[0][0]
    times = [t - origin for t, _ in finite]
    if min(times) == max(times):
        return None
    slope, intercept = linear_regression(times, [v for _, v in finite])
    return Line(slope, intercept, origin)


def value_in(points: Sequence[tuple[float, float]], now: float, horizon: float) -> float | None:
    """The value the line predicts `horizon` seconds after `now`."""
    line = fit(points)
    value = None if line is None else line.at(now + horizon)
    return value if value is not None and math.isfinite(value) else None


def forecast(points: Sequence[tuple[float, float]], now: float, horizon: float) -> Forecast | None:
    predicted = value_in(points, now, horizon)
    return None if predicted is None else Forecast(now, now + horizon, predicted)


def time_until(points: Sequence[tuple[float, float]], now: float, threshold: float, *,
               above: bool = True) -> float | None:
    """Seconds from `now` until the value reaches `threshold` (>= it; <= it with above=False)."""
    line = fit(points)
    if line is None:
        return None
    current = line.at(now)
    if (current >= threshold) if above else (current <= threshold):
        return 0.0
    heading = line.slope > 0 if above else line.slope < 0
    if not heading:
        return None
    seconds = (threshold - current) / line.slope
    return seconds if math.isfinite(seconds) else None  # a slope of 1e-320: never, as far as a float can tell


def mape(pairs: Sequence[tuple[float, float]]) -> float | None:
    """Mean absolute percentage error of (predicted, actual) pairs, in %; None if no actual is non-zero."""
    errors = [error for error in (abs(predicted - actual) / abs(actual) for predicted, actual in pairs if actual != 0)
              if math.isfinite(error)]
    return 100.0 * math.fsum(errors) / len(errors) if errors else None


def score_due(forecasts: Iterable[Forecast], now: float,
              actual_at: Callable[[float], float | None]) -> list[tuple[float, float]]:
    """(predicted, actual) for each forecast whose target time has come and whose actual value is known."""
    pairs = []
    for f in forecasts:
        if f.target_time <= now and (actual := actual_at(f.target_time)) is not None:
            pairs.append((f.predicted, actual))
    return pairs
