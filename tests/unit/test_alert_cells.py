"""The alerts table and follow lines: an alert's figures in one unit."""

from __future__ import annotations

from mcpctl.commands.alerts import alert_cells, event_line

MIB = 1 << 20


def test_an_overuse_alerts_min_max_and_average_are_in_mib_as_its_value_is() -> None:
    alert = {"id": 7, "state": "resolved", "level": "warning", "rule": "overuse",
             "resource": "allocation:abc/memory", "last_value": 300 * MIB, "since": 100.0, "duration_s": 60.0,
             "min": 200 * MIB, "max": 400 * MIB, "avg": 300 * MIB}

    cells = alert_cells(alert, 200.0)

    assert (cells[5], cells[8], cells[9], cells[10]) == ("300 MiB", "200 MiB", "400 MiB", "300 MiB")


def test_any_other_alerts_figures_stay_plain_numbers() -> None:
    alert = {"id": 8, "state": "firing", "level": "critical", "rule": "gpu-hot", "resource": "gpu:0",
             "last_value": 91.0, "since": 100.0, "min": 85.0, "max": 93.0, "avg": 89.5}

    cells = alert_cells(alert, 200.0)

    assert (cells[5], cells[8], cells[9], cells[10]) == ("91", "85", "93", "90")


def test_a_resolved_overuse_line_gives_its_figures_in_mib() -> None:
    event = {"ts": 0.0, "kind": "alert.resolved", "resource": "allocation:abc/memory",
             "detail": {"rule": "overuse", "level": "warning", "value": 300 * MIB, "duration_s": 60.0,
                        "min": 200 * MIB, "max": 400 * MIB, "avg": 300 * MIB}}

    assert "(min 200 MiB, max 400 MiB, avg 300 MiB)" in event_line(event)
