"""What `mcpctl top` shows: one frame laid out for a terminal's size, as lines of styled segments.

Rules:
- Standard library only: the same frame is printed as plain text on a pipe and
  turned into Rich text on a terminal (`mcpctl.render.frame`); Rich is never
  imported here.
- A frame never has a line wider than `width`, nor more lines than `height`
  (None: as many as it needs). Space goes first to the header line, then to the
  resources, then to firing alerts, then to allocations; what does not fit is
  counted on a "+N more" line. A wider terminal gets wider bars and more
  details and columns.
- Queued requests come first among the allocations and are never scrolled or
  counted away while there is room for them; the active ones follow in the
  order asked (`SORTS`), from the scroll `offset` on.
- A value the device does not offer reads "n/a", a failed read "?", never 0.
- Every string from the daemon is `printable` before it is measured: a control
  character in a name or a reason is shown escaped, and counted as wide as
  its escape.
"""

from __future__ import annotations

import datetime
import unicodedata
from collections.abc import Iterable
from typing import Any, NamedTuple

from mcpctl.escape import printable
from mcpctl.view import (LEVEL_STYLES, UNSUPPORTED, age, alert_value_text, amount_text, metric_text, number_text,
                         pressure_text, used_text)

Segment = tuple[str, str]
"""Text and a Rich style name ('' for none)."""
Line = list[Segment]

TITLE = "mcpres top"


class Snapshot(NamedTuple):
    """The results of one refresh's batch."""

    resources: list[dict[str, Any]]
    metrics: dict[str, Any]
    alerts: list[dict[str, Any]]
    active: list[dict[str, Any]]
    queued: list[dict[str, Any]]

    def as_json(self) -> dict[str, Any]:
        return self._asdict()


SORTS = ("newest", "oldest", "tool", "holder", "memory")
"""The orders `s` cycles the active allocations through (memory: the largest measured peak first)."""


def frame(snapshot: Snapshot, width: int, height: int | None, now: float, *, interval: float,
          note: str | None = None, ascii_only: bool = False, sort: str = SORTS[0], offset: int = 0) -> list[Line]:
    width = max(1, width)
    firing = [a for a in snapshot.alerts if a.get("state") == "firing"]
    lines = [header(snapshot, width, now, interval, len(firing), note, sort)]
    room = None if height is None else max(0, height - 1)
    active = sort_active(snapshot.active, sort)
    offset = max(0, min(offset, len(active) - 1))
    for title, rows, noun in (
        (*resource_rows(snapshot, width, ascii_only), "resources"),
        (*alert_rows(firing, width, now), "firing alerts"),
        (*allocation_rows(snapshot.queued + active[offset:], width, now, firing), "allocations"),
    ):
        if not rows:
            continue
        queued = len(snapshot.queued) if noun == "allocations" else 0
        block = _fit(title, rows, room, noun, width, queued, skipped=offset if noun == "allocations" else 0)
        lines += block
        if room is not None:
            room -= len(block)
    return lines


def sort_active(active: list[dict[str, Any]], sort: str) -> list[dict[str, Any]]:
    if sort == "oldest":
        return sorted(active, key=lambda a: a["created_at"])
    if sort == "tool":
        return sorted(active, key=lambda a: (a.get("tool_id") is None, a.get("tool_id") or "", -a["created_at"]))
    if sort == "holder":
        return sorted(active, key=lambda a: (a.get("holder_pid") or 0, -a["created_at"]))
    if sort == "memory":
        return sorted(active, key=lambda a: (-((a.get("measured") or {}).get("memory_peak") or 0), -a["created_at"]))
    return sorted(active, key=lambda a: -a["created_at"])


def plain(lines: list[Line]) -> str:
    return "\n".join(printable("".join(text for text, _ in line).rstrip()) for line in lines)


# -- the header -------------------------------------------------------------


def header(snapshot: Snapshot, width: int, now: float, interval: float, firing: int, note: str | None,
           sort: str = SORTS[0]) -> Line:
    metrics = snapshot.metrics
    sampled = metrics.get("ts")
    parts: list[Segment] = [(TITLE, "bold"), ("  " + datetime.datetime.fromtimestamp(now).strftime("%H:%M:%S"), "")]
    if note:
        parts.append(("  " + printable(note), "bold red"))
    parts.append((f"  {firing} firing" if firing else "  no alerts", "bold red" if firing else "green"))
    parts.append((f"  {len(snapshot.active)} active, {len(snapshot.queued)} queued", ""))
    parts.append((f"  {len(snapshot.resources)} resources", "dim"))
    if sampled is None:
        parts.append(("  no samples yet", "yellow"))
    elif now - sampled > 3 * max(interval, metrics.get("interval_s") or 0):
        parts.append((f"  samples {age(now - sampled)} old", "yellow"))
    parts.append((f"  every {interval:g}s", "dim"))
    parts.append((f"  sorted by {sort} (s)", "dim"))
    while len(parts) > 1 and _width(parts) > width:
        parts.pop()
    return _crop(parts, width)


# -- resources --------------------------------------------------------------


def resource_rows(snapshot: Snapshot, width: int, ascii_only: bool) -> tuple[Line, list[Line]]:
    readings: dict[str, dict[str, Any]] = snapshot.metrics.get("resources") or {}
    processes: dict[str, list[dict[str, Any]]] = snapshot.metrics.get("processes") or {}
    name_w = max(8, min(width // 5, max((len(printable(r["name"])) for r in snapshot.resources), default=8)))
    fixed = name_w + 1 + 1 + 4 + 2 + 1 + 4 + 2
    bar_w = max(4, min(24, (width - fixed - 30) // 2))
    detail_w = width - fixed - 2 * bar_w
    title = _crop([(_cell("RESOURCE", name_w) + " " + _cell("ALLOCATED", bar_w + 5) + "  "
                    + _cell("MEASURED", bar_w + 5) + "  " + ("DETAILS" if detail_w >= 7 else ""), "bold")], width)
    rows = []
    for resource in snapshot.resources:
        values = readings.get(resource["name"], {})
        allocated = 100.0 * resource["allocated"] / resource["capacity"] if resource["capacity"] else 0.0
        line: Line = [(_cell(printable(resource["name"]), name_w) + " ", "bold")]
        line += _bar(allocated, bar_w, "cyan", ascii_only)
        line.append(("  ", ""))
        line += _bar(measured(resource, values), bar_w, None, ascii_only)
        if detail_w > 2:
            line.append(("  ", ""))
            line += _crop(details(resource, values, detail_w, processes.get(resource["name"], ())), detail_w)
        rows.append(_crop(line, width))
    return title, rows


def measured(resource: dict[str, Any], values: dict[str, Any]) -> object:
    """The measured use in %: `utilisation`, or for a network link the busier direction over its speed;
    'unsupported', None (unknown) or '' (nothing measures this resource)."""
    if "utilisation" in values:
        return values["utilisation"]
    if "rx_bps" in values or "tx_bps" in values:
        rates = [v for v in (values.get("rx_bps"), values.get("tx_bps")) if isinstance(v, (int, float))]
        if not rates or not resource["capacity"]:
            return None
        return 100.0 * max(rates) / resource["capacity"]
    return ""


def details(resource: dict[str, Any], values: dict[str, Any], room: int,
            processes: Iterable[dict[str, Any]] = ()) -> Line:
    """What matters most first: health, then the type's own readings; more of them when there is room.

    A GPU's compute processes (`processes`, from metrics.current) come after its power, each as
    'pid N MEM', largest first, in yellow where its use is foreign; then how many there are."""
    wide = room >= 60
    parts: Line = []
    health = resource.get("health") or {}
    score = health.get("score")
    if isinstance(score, (int, float)) and score < 100:
        held_back = health.get("granted") is False
        parts.append((f"health {score:g}" + (" (not granted)" if held_back else ""),
                      "bold red" if held_back or score < 50 else "yellow"))
    kind = resource["type"]
    text = _metric_texts(values)
    if kind == "gpu":
        total = resource["labels"].get("memory")
        memory = f"mem {text('memory_utilisation')}"
        if wide and isinstance(values.get("memory_used"), (int, float)) and isinstance(total, (int, float)):
            memory += f" {text('memory_used')}/{amount_text(total, 'bytes')}"
        parts += [(memory, ""), (text("temperature_c"), _hot(values.get("temperature_c"))), (text("power_w"), "")]
        parts += _gpu_processes(processes)
        if wide:
            parts += [(f"{text('processes')} proc", "dim"), (text("clock_sm_mhz"), "dim"),
                      (f"fan {text('fan_speed_pct')}", "dim")]
            foreign = values.get("foreign_memory")
            if isinstance(foreign, (int, float)) and foreign > 0:
                parts.append((f"{text('foreign_memory')} used outside mcpres", "yellow"))
    elif kind == "cpu":
        parts.append((f"load {text('load1')}", ""))
        parts.append((f"{resource['capacity']:g} cores", "dim"))
    elif kind == "memory":
        parts.append((f"used {text('used')} of {amount_text(resource['capacity'], 'bytes')}", ""))
        if wide:
            parts.append((f"swap {text('swap_utilisation')}", "dim"))
    elif kind == "disk":
        parts += [(f"used {text('used')}", ""), (f"r {text('read_bps')}", "dim"), (f"w {text('write_bps')}", "dim")]
    elif kind == "network":
        parts += [(f"rx {text('rx_bps')}", ""), (f"tx {text('tx_bps')}", "")]
    else:
        parts.append((f"{amount_text(resource['allocated'], resource['unit'])} of "
                      f"{amount_text(resource['capacity'], resource['unit'])}", ""))
    if wide and health.get("reasons") and isinstance(score, (int, float)) and score < 100:
        parts.append(("why: " + "; ".join(health["reasons"]), "dim"))
    line: Line = []
    for text, style in parts:
        part = (printable(text), style)  # a custom resource's unit is an admin's
        if _width(line) + (2 if line else 0) + _width([part]) > room:
            break
        if line:
            line.append(("  ", ""))
        line.append(part)
    return line


def _gpu_processes(processes: Iterable[dict[str, Any]]) -> Line:
    named = sorted((p for p in processes if isinstance(p.get("pid"), int)),
                   key=lambda p: (-(p.get("used_memory") or 0), p["pid"]))
    return [(f"pid {p['pid']} {metric_text('memory_used', p.get('used_memory'), space=False)}",
             "yellow" if p.get("foreign") else "") for p in named]


def _metric_texts(values: dict[str, Any]) -> Any:
    def text(metric: str) -> str:
        return metric_text(metric, values.get(metric), space=False)
    return text


def _hot(value: object) -> str:
    return "red" if isinstance(value, (int, float)) and value >= 85 else ""


def _bar(percent: object, width: int, style: str | None, ascii_only: bool) -> Line:
    full, empty = ("#", ".") if ascii_only else ("█", "░")
    if percent == "":
        return [(" " * width + "    -", "dim")]
    if not isinstance(percent, (int, float)):
        return [(("·" if not ascii_only else " ") * width, "dim"), ("  n/a" if percent == UNSUPPORTED else "    ?", "dim")]
    value = min(100.0, max(0.0, float(percent)))
    filled = round(value / 100 * width)
    colour = style or ("red" if value >= 90 else "yellow" if value >= 70 else "green")
    return [(full * filled, colour), (empty * (width - filled), "dim"), (f" {value:3.0f}%", colour)]


# -- alerts and allocations -------------------------------------------------


def alert_rows(firing: list[dict[str, Any]], width: int, now: float) -> tuple[Line, list[Line]]:
    wide = width >= 120
    headers = ["LEVEL", "ALERT", "RESOURCE", "VALUE", "SINCE"] + (["MIN", "MAX", "HELD BY"] if wide else [])
    order = {"critical": 0, "error": 1, "warning": 2, "info": 3}
    cells = []
    for alert in sorted(firing, key=lambda a: (order.get(a["level"], 9), -(a.get("fired_at") or 0))):
        row = [(alert["level"], LEVEL_STYLES.get(alert["level"], "")), (alert["rule"], "bold"),
               (alert["resource"], ""),
               (alert_value_text(alert["resource"], alert.get("last_value")), ""),
               (_since(alert.get("fired_at") or alert["since"], now), "")]
        if wide:
            holders = ", ".join(f"{h['id']}" + (f" ({h['tool_id']})" if h.get("tool_id") else "")
                                for h in alert.get("allocations") or [])
            row += [(number_text(alert.get("min")), "dim"), (number_text(alert.get("max")), "dim"), (holders or "-", "dim")]
        cells.append(row)
    return _table(headers, cells, width, flex=len(headers) - 1 if wide else 1)


def _since(timestamp: float, now: float) -> str:
    return f"{datetime.datetime.fromtimestamp(timestamp).strftime('%H:%M:%S')} ({age(now - timestamp)})"


def allocation_rows(allocations: list[dict[str, Any]], width: int, now: float,
                    firing: list[dict[str, Any]] | None = None) -> tuple[Line, list[Line]]:
    headers = ["ALLOCATION", "STATE", "TOOL", "EXECUTION", "HOLDER", "AGE", "USED", "PRESSURE", "ALERTS", "HOLDS"]
    alerts = alerts_by_allocation(firing or [])
    cells = []
    for allocation in allocations:
        active = allocation["state"] == "active"
        since = allocation.get("granted_at") if active else None
        holder = str(allocation["holder_pid"]) if allocation.get("holder_pid") else allocation.get("holder") or "-"
        if allocation["items"]:
            items = ", ".join(f"{i['resource']}={amount_text(i['amount'], i['unit'])}" for i in allocation["items"])
        else:
            asked = (allocation.get("request") or {}).get("resources") or []
            items = "asks " + ", ".join(f"{d['resource']}={d['amount']:g}" for d in asked) if asked else "-"
        cells.append([(allocation["id"], "" if active else "yellow"), (allocation["state"], "" if active else "yellow"),
                      (allocation.get("tool_id") or "-", ""), (allocation.get("execution_id") or "-", "dim"),
                      (holder, ""), (age(now - (since or allocation["created_at"])), ""),
                      (used_text(allocation, pressure=False), "red" if any(str(r).startswith("overuse") for r in
                                                                           allocation.get("risks") or []) else ""),
                      (pressure_text(allocation.get("measured") or {}) or "-", ""),
                      (", ".join(text for text, _ in alerts.get(allocation["id"], ())) or "-",
                       _worst(level for _, level in alerts.get(allocation["id"], ()))),
                      (items or "-", "dim")])
    return _table(headers, cells, width, flex=len(headers) - 1, caps={headers.index("USED"): 48})


def alerts_by_allocation(firing: list[dict[str, Any]]) -> dict[str, list[tuple[str, str]]]:
    """{allocation id: [(what, level)]} for the firing alerts that name it: an overuse alert on it ('overuse
    memory'), or a metric alert on a resource it holds (its rule)."""
    named: dict[str, list[tuple[str, str]]] = {}
    for alert in firing:
        resource = str(alert.get("resource") or "")
        what = f"{alert['rule']} {resource.rsplit('/', 1)[-1]}" if resource.startswith("allocation:") else alert["rule"]
        for held in alert.get("allocations") or ():
            named.setdefault(str(held.get("id")), []).append((what, str(alert.get("level"))))
    return named


def _worst(levels: Any) -> str:
    order = {"critical": 0, "error": 1, "warning": 2, "info": 3}
    worst = min(levels, key=lambda level: order.get(level, 9), default=None)
    return LEVEL_STYLES.get(worst, "") if worst else ""


def _table(headers: list[str], rows: list[list[Segment]], width: int, flex: int,
           caps: dict[int, int] | None = None) -> tuple[Line, list[Line]]:
    """Columns as wide as their cells (capped at 24, or `caps` by index), the `flex` one giving way first, then
    cells cropped."""
    rows = [[(printable(text), style) for text, style in row] for row in rows]
    widths = [min((caps or {}).get(i, 24), max([len(h), *(_width([row[i]]) for row in rows)]))
              for i, h in enumerate(headers)]
    widths[flex] = max([len(headers[flex]), *(_width([row[flex]]) for row in rows)])
    excess = sum(widths) + 2 * (len(widths) - 1) - width
    if excess > 0:
        widths[flex] = max(len(headers[flex]), widths[flex] - excess)
    while sum(widths) + 2 * (len(widths) - 1) > width and len(widths) > 2:
        widths.pop()
    title: Line = [("  ".join(_cell(h, w) for h, w in zip(headers, widths)).rstrip(), "bold")]
    lines = []
    for row in rows:
        line: Line = []
        for index, ((text, style), w) in enumerate(zip(row, widths)):
            line.append(((_cell(text, w) if index < len(widths) - 1 else _cell(text, w).rstrip())
                         + ("  " if index < len(widths) - 1 else ""), style))
        lines.append(_crop(line, width))
    return _crop(title, width), lines


# -- fitting ----------------------------------------------------------------


def _fit(title: Line, rows: list[Line], room: int | None, noun: str, width: int, queued: int,
         skipped: int = 0) -> list[Line]:
    """The block whole, or its title, the first rows and a "+N more" line; the first `queued` rows (queued
    requests) are shown before any other; `skipped` rows were scrolled past above."""
    above = f" ({skipped} above: k, up)" if skipped else ""
    if room is None or 1 + len(rows) + bool(skipped) <= room:
        return [title, *rows, *([_crop([(f"+{skipped} more above (k, up)", "dim")], width)] if skipped else [])]
    if room <= 0:
        return []
    shown = max(0, room - 2)
    hidden = len(rows) - shown
    note = f"+{hidden} more {noun}"
    if queued:
        waiting = max(0, queued - shown)
        note += f" ({hidden - waiting} active, {waiting} queued)"
    note += (" (j, down)" if noun == "allocations" else "") + above
    more = _crop([(note, "dim")], width)
    return [more] if room == 1 else [title, *rows[:shown], more]


def _char_width(char: str) -> int:
    if char.isascii():
        return 1
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def _text_width(text: str) -> int:
    return len(text) if text.isascii() else sum(_char_width(c) for c in text)


def _width(line: Line) -> int:
    return sum(_text_width(text) for text, _ in line)


def _cell(text: str, width: int) -> str:
    """`text` cropped (with …) or padded to exactly `width` cells."""
    size = _text_width(text)
    if size <= width:
        return text + " " * (width - size)
    cropped = _crop([(text, "")], width - 1)
    return cropped[0][0] + "…" + " " * (width - 1 - _width(cropped)) if cropped else "…"[:width]


def _crop(line: Line, width: int) -> Line:
    out: Line = []
    used = 0
    for text, style in line:
        size = _text_width(text)
        if used + size <= width:
            out.append((text, style))
            used += size
            continue
        kept = ""
        for char in text:
            if used + _char_width(char) > width:
                break
            kept += char
            used += _char_width(char)
        if kept:
            out.append((kept, style))
        break
    return out
