"""`mcpctl top`'s frame (mcpctl.dashboard, pure): what fits, in what order, scrolled where; and sparklines."""

from __future__ import annotations

from typing import Any

import pytest

from mcpctl import dashboard
from mcpctl.dashboard import Snapshot, frame, plain
from mcpctl.view import sparkline

NOW = 1_800_000_000.0


def allocation(index: int, state: str = "active", tool: str | None = None, peak: float | None = None) -> dict[str, Any]:
    return {"id": f"{index:016x}", "state": state, "tool_id": tool, "execution_id": None, "holder_pid": 1000 + index,
            "created_at": NOW - 1000 + index, "granted_at": NOW - 1000 + index if state == "active" else None,
            "items": [{"resource": "slot", "amount": 1.0, "unit": "slots"}] if state == "active" else [],
            "request": {"resources": [{"resource": "licence", "amount": 1.0}]},
            "measured": {"memory_peak": peak} if peak is not None else None, "risks": []}


def snapshot(active: int, queued: int = 0, **extra: Any) -> Snapshot:
    return Snapshot(resources=[], metrics={}, alerts=[],
                    active=[allocation(i, **extra) for i in range(active)],
                    queued=[allocation(10_000 + i, state="queued") for i in range(queued)])


def shown_ids(lines: list[dashboard.Line]) -> list[str]:
    return [line.split()[0] for line in plain(lines).splitlines() if line[:1].isdigit() or line[:1] in "abcdef"]


def test_a_queued_request_is_never_hidden_behind_200_active_allocations() -> None:
    lines = frame(snapshot(200, queued=1), 120, 30, NOW, interval=5)

    text = plain(lines)
    assert len(lines) <= 30
    assert f"{10_000:016x}  queued" in text
    assert "+" in text and "more allocations (" in text and ", 0 queued)" in text


def test_the_active_allocations_scroll_from_the_offset() -> None:
    first = shown_ids(frame(snapshot(200), 120, 20, NOW, interval=5))
    scrolled = shown_ids(frame(snapshot(200), 120, 20, NOW, interval=5, offset=5))

    assert scrolled[0] == first[5]
    assert "5 above" in plain(frame(snapshot(200), 120, 20, NOW, interval=5, offset=5))


def test_scrolling_keeps_the_queued_requests_on_top() -> None:
    ids = shown_ids(frame(snapshot(200, queued=2), 120, 20, NOW, interval=5, offset=50))

    assert ids[:2] == [f"{10_000:016x}", f"{10_001:016x}"]
    assert ids[2] == f"{149:016x}"  # newest first: the 51st newest of 0..199


@pytest.mark.parametrize("sort, first", [("newest", 9), ("oldest", 0), ("holder", 0), ("memory", 9), ("tool", 9)])
def test_the_active_allocations_are_sorted_as_asked(sort: str, first: int) -> None:
    data = Snapshot([], {}, [], [allocation(i, peak=float(i)) for i in range(10)], [])

    assert shown_ids(frame(data, 120, None, NOW, interval=5, sort=sort))[0] == f"{first:016x}"
    assert f"sorted by {sort}" in plain(frame(data, 200, None, NOW, interval=5, sort=sort)).splitlines()[0]


def test_a_sparkline_uses_the_height_of_its_data() -> None:
    line = sparkline([3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5], 8)
    assert line == "▁▂▃▄▅▆▇█"


HOSTILE_TOOL = "[b]x[/b]\x9b\u202eé中"


def hostile_snapshot() -> Snapshot:
    """Strings another user or the system chose: a tool id with markup, C1 and a bidi override; a mount's
    name and a health reason with ESC (an OSC 8 hyperlink, a screen clear)."""
    disk = {"name": "disk:/mnt/\x1b[2Jx", "type": "disk", "capacity": 100.0, "allocated": 0.0, "free": 100.0,
            "unit": "bytes", "labels": {}, "uuid": None,
            "health": {"score": 40, "reasons": ["\x1b]8;;http://evil.example/\x1b\\click\x1b]8;;\x1b\\"]}}
    seats = {"name": "seats", "type": "custom", "capacity": 4.0, "allocated": 1.0, "free": 3.0,
             "unit": "[b]u\x9b\u202e", "labels": {}, "uuid": None}
    active = allocation(1, tool=HOSTILE_TOOL) | {"execution_id": "run\u2066é\u2069"}
    return Snapshot(resources=[disk, seats], metrics={}, alerts=[], active=[active], queued=[])


def test_top_shows_hostile_strings_escaped_and_ordinary_text_as_it_is() -> None:
    text = plain(frame(hostile_snapshot(), 250, None, NOW, interval=5))

    assert not {"\x1b", "\x9b", "\u202e", "\u2066", "\u2069"} & set(text)
    assert "disk:/mnt/\\x1b[2Jx" in text
    assert "\\x1b]8;;http://evil.example/\\x1b\\click" in text
    assert "[b]x[/b]\\x9b\\u202eé中" in text
    assert "run\\u2066é\\u2069" in text
    assert "1 [b]u\\x9b\\u202e of 4 [b]u\\x9b\\u202e" in text


def test_top_on_a_terminal_prints_no_escape_sequence_from_the_data() -> None:
    import io
    import re

    from rich.console import Console

    from mcpctl import render

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, color_system="standard", width=250, markup=False)
    console.print(render.Frame(frame(hostile_snapshot(), 250, None, NOW, interval=5), end="\n"))

    styles_removed = re.sub(r"\x1b\[[0-9;]*m", "", screen.getvalue())
    assert "\x1b" not in styles_removed and "\x9b" not in styles_removed and "\u202e" not in styles_removed
    assert "[b]x[/b]\\x9b\\u202eé中" in styles_removed
