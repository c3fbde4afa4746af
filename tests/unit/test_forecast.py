"""Linear forecasts and their scoring, on plain numbers."""

from __future__ import annotations

import pytest

from mcpresd.core.forecast import Forecast, Line, fit, forecast, mape, score_due, time_until, value_in

EPOCH = 1_700_000_000.0


def line(slope: float, intercept: float, times: list[float]) -> list[tuple[float, float]]:
    return [(t, intercept + slope * (t - times[0])) for t in times]


@pytest.mark.parametrize("start", [0.0, EPOCH])
def test_forecast_on_a_known_line_is_exact(start: float) -> None:
    points = line(0.5, 10.0, [start, start + 2, start + 4, start + 10])
    fitted = fit(points)
    assert fitted is not None
    assert fitted.slope == 0.5
    assert fitted.at(start + 20) == 20.0
    assert value_in(points, now=start + 10, horizon=10) == 20.0
    assert forecast(points, now=start + 10, horizon=10) == Forecast(start + 10, start + 20, 20.0)


@pytest.mark.parametrize("points", [
    [],
    [(0.0, 1.0), (1.0, 2.0)],
    [(5.0, 1.0), (5.0, 2.0), (5.0, 3.0)],
    [(0.0, 1.0), (1.0, float("nan")), (2.0, 3.0)],
])
def test_no_line_from_fewer_than_three_points_or_one_instant(points: list[tuple[float, float]]) -> None:
    assert fit(points) is None
    assert value_in(points, now=10, horizon=5) is None
    assert time_until(points, now=10, threshold=100) is None


def test_a_line_is_read_from_its_origin() -> None:
    assert Line(2.0, 1.0, origin=10.0).at(13.0) == 7.0


def test_time_until_full_on_a_rising_line() -> None:
    points = line(1.0, 50.0, [0, 10, 20, 30])  # 80 at t=30
    assert time_until(points, now=30, threshold=100) == 20.0


@pytest.mark.parametrize("slope, threshold, above, expected", [
    (1.0, 100.0, True, 20.0),      # rising toward it
    (-1.0, 100.0, True, None),     # falling away from it
    (0.0, 100.0, True, None),      # flat
    (1.0, 50.0, True, 0.0),        # already past
    (-2.0, 40.0, False, 20.0),     # time until empty: falling toward it
    (2.0, 40.0, False, None),      # rising away from it
    (-2.0, 90.0, False, 0.0),      # already below
])
def test_time_until_heads_in_the_direction_of_the_line(slope: float, threshold: float, above: bool,
                                                       expected: float | None) -> None:
    points = [(EPOCH + t, 80.0 + slope * t) for t in (0.0, 10.0, 20.0)]
    assert time_until(points, now=EPOCH, threshold=threshold, above=above) == expected


def test_no_answer_is_infinite() -> None:
    flat = [(0.0, 0.0), (1.0, 5e-324), (2.0, 1e-323)]  # a slope of ~5e-324: 100 is reached after inf seconds
    assert time_until(flat, now=2.0, threshold=100.0) is None
    steep = [(0.0, 0.0), (1.0, 1e307), (2.0, 2e307)]
    assert value_in(steep, now=2.0, horizon=1e6) is None
    assert mape([(1e308, 5e-324), (110.0, 100.0)]) == pytest.approx(10.0)


@pytest.mark.parametrize("pairs, expected", [
    ([], None),
    ([(110.0, 100.0)], 10.0),
    ([(90.0, 100.0), (60.0, 50.0)], 15.0),
    ([(5.0, 0.0), (110.0, 100.0)], 10.0),
    ([(5.0, 0.0)], None),
    ([(-40.0, -50.0)], 20.0),
])
def test_mape_is_the_mean_absolute_percentage_error_skipping_zero_actuals(pairs: list[tuple[float, float]],
                                                                          expected: float | None) -> None:
    assert mape(pairs) == (None if expected is None else pytest.approx(expected))


def test_only_forecasts_that_are_due_and_have_an_actual_are_scored() -> None:
    actuals = {10.0: 100.0, 20.0: 50.0}
    forecasts = [Forecast(0, 10, 110), Forecast(0, 20, 60), Forecast(0, 15, 1), Forecast(0, 30, 1)]
    assert score_due(forecasts, now=25, actual_at=actuals.get) == [(110, 100.0), (60, 50.0)]
