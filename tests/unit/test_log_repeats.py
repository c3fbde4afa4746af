"""A warning that repeats word for word is logged once, then summarised once its window has passed."""

from __future__ import annotations

import logging

from mcpresd.daemon import RepeatFilter


def record(message: str, at: float, level: int = logging.WARNING) -> logging.LogRecord:
    entry = logging.LogRecord("mcpresd", level, __file__, 1, "cannot write %s: %s", (message, "denied"), None)
    entry.created = at
    return entry


def passed(records: list[logging.LogRecord], window_s: float = 300.0) -> list[str]:
    repeats = RepeatFilter(window_s)
    return [r.getMessage() for r in records if repeats.filter(r)]


def test_a_warning_every_5s_is_logged_once_then_summarised_after_the_window() -> None:
    lines = passed([record("/x.prom", 5.0 * i) for i in range(130)])

    assert lines == ["cannot write /x.prom: denied",
                     "cannot write /x.prom: denied (repeated 59 times in the last 300 s)",
                     "cannot write /x.prom: denied (repeated 59 times in the last 300 s)"]


def test_different_warnings_are_each_logged() -> None:
    assert passed([record("/a", 0.0), record("/b", 1.0), record("/a", 2.0)]) == [
        "cannot write /a: denied", "cannot write /b: denied"]


def test_info_lines_are_never_held_back() -> None:
    assert len(passed([record("/a", float(i), logging.INFO) for i in range(5)])) == 5


def test_a_warning_back_after_a_quiet_window_is_logged_plainly() -> None:
    assert passed([record("/a", 0.0), record("/a", 400.0)]) == ["cannot write /a: denied"] * 2
