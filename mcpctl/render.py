"""Rich renderables built from the API's result dicts. Imported only when printing to a terminal.

Rules:
- The console reads no markup and no emoji codes: a tool id such as `[link=http://evil.example/]x[/link]` or
  `:thumbs_up:` is shown as it is written, never turned into a hyperlink, a style or an emoji. mcpctl styles with
  `style=` alone.
- Every cell and title goes through `mcpctl.escape.printable` here, so no string from the daemon reaches the
  terminal with its control characters.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from typing import Any

from rich import box
from rich.console import Console, ConsoleOptions, RenderResult
from rich.segment import Segment
from rich.table import Table

from mcpctl.escape import printable
from mcpctl.view import LEVEL_STYLES, RESOURCE_HEADERS, age, cost_text, items_text, resource_row, used_text

console = Console(markup=False, emoji=False)


def status(data: dict[str, Any]) -> None:
    pairs(status_rows(data))


def pairs(rows: Sequence[tuple[str, str]]) -> None:
    """Label / value lines, the labels in bold."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for label, value in rows:
        table.add_row(printable(label), printable(value))
    console.print(table)


def status_rows(data: dict[str, Any]) -> list[tuple[str, str]]:
    counts = data["allocations"]
    lost = data.get("lost_commits")
    warning = [("WARNING", f"the database lost committed transactions (newest event #{lost['found_event']} at start,"
                           f" #{lost['expected_event']} committed; {lost['wal_commits_dropped']} dropped from a"
                           f" damaged -wal): see `mcpctl events`")] if lost else []
    return warning + [
        ("daemon", f"mcpresd {data['version']} (pid {data['pid']})"),
        ("uptime", age(data["uptime_s"])),
        ("socket", socket_line(data)),
        *([("config", config_line(data["config"]))] if "config" in data else []),
        ("database", data["database"]),
        ("resources", str(data["resources"])),
        ("allocations", f"{counts.get('active', 0)} active, {counts.get('released', 0)} released"),
        ("GPUs from", data["gpu_source"]),
        *([("enforcement", enforcement_line(data["enforcement"]))] if "enforcement" in data else []),
        *([("cluster", cluster_line(data["cluster"]))] if data.get("cluster") else []),
    ]


def socket_line(data: dict[str, Any]) -> str:
    """The daemon's socket, and how mcpctl came to it: `/run/mcpres/mcpresd.sock (system: why)`."""
    found = data.get("found")
    if not found:
        return str(data["socket"])
    source, why = found["source"], found["why"]
    # "$MCPRES_SOCKET is set" says its source already: not "($MCPRES_SOCKET: $MCPRES_SOCKET is set)".
    line = f"{data['socket']} ({why if why.startswith(source) else f'{source}: {why}'})"
    return line if found["path"] == data["socket"] else f"{line}; reached through {found['path']}"


def config_line(config: dict[str, Any]) -> str:
    """`/etc/mcpres/mcpresd.toml (system)`, or why there is none: `embedded defaults: no /etc/...`."""
    if config.get("path"):
        return f"{config['path']} ({config['source']})"
    return str(config["source"])
def cluster_line(cluster: dict[str, Any]) -> str:
    """`slurm via ssh login1: 2 active, 1 queued; Slurm answering` (or `stale: why`)."""
    via = f" via {' '.join(cluster['command'])}" if cluster.get("command") else ""
    state = f"stale: {cluster['stale']}" if cluster.get("stale") else "answering"
    return f"{cluster['backend']}{via}: {cluster['active']} active, {cluster['queued']} queued; Slurm {state}"


def enforcement_line(enforcement: dict[str, Any]) -> str:
    """`soft (max hard) by cgroup-v1: cpu, memory, ...`, or `off: why`."""
    if enforcement["backend"] == "none":
        return f"off: {enforcement.get('why_not') or 'no backend'}"
    line = (f"{enforcement['mode']} (max {enforcement['max_mode']}) by {enforcement['backend']}: "
            f"{', '.join(enforcement['controllers']) or 'controllers unknown'}")
    line = f"{line} ({enforcement['why_not']})" if enforcement.get("why_not") else line
    # The systemd-scope backend says why it was chosen and what it leaves advisory.
    return "; ".join([line, *(str(enforcement[key]) for key in ("why", "advisory") if enforcement.get(key)),
                      *([f"favordynmods {enforcement['favordynmods']}"] if enforcement.get("favordynmods") else [])])


def resources(rows: list[dict[str, Any]]) -> None:
    table = Table(title=None, header_style="bold")
    for header in RESOURCE_HEADERS:
        table.add_column(header, justify="right" if header in ("CAPACITY", "ALLOCATED", "FREE") else "left")
    for resource in rows:
        cells = [printable(cell) for cell in resource_row(resource)]
        style = "yellow" if resource["free"] <= 0 else None
        table.add_row(*cells, style=style)
    console.print(table)


def allocations(rows: list[dict[str, Any]]) -> None:
    grid = Table(header_style="bold")
    for header in ("ID", "STATE", "PRIORITY", "ITEMS", "TOOL", "HOLDER", "USED", "AGE", "COST"):
        grid.add_column(header, justify="right" if header == "COST" else "left")
    now = time.time()
    for allocation in rows:
        grid.add_row(
            *(printable(cell) for cell in (
                allocation["id"],
                allocation["state"],
                allocation["priority"],
                items_text(allocation),
                allocation["tool_id"] or "",
                str(allocation["holder_pid"] or ""),
                used_text(allocation),
                age(now - allocation["created_at"]),
                cost_text(allocation),
            )),
            style="dim" if allocation["state"] != "active" else None,
        )
    console.print(grid)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: Collection[str] = (),
          styles: Sequence[str | None] | None = None, title: str | None = None,
          footer: Sequence[str] | None = None) -> None:
    """A plain Rich table of text cells: `right` names the right-aligned columns, `styles` gives each row's style,
    `footer` is a last row set apart (totals)."""
    grid = Table(header_style="bold", box=box.SIMPLE_HEAD, title=None if title is None else printable(title),
                 title_justify="left", title_style="bold", show_footer=footer is not None)
    for index, header in enumerate(headers):
        grid.add_column(header, justify="right" if header in right else "left",
                        footer=printable(footer[index]) if footer is not None else "")
    for index, cells in enumerate(rows):
        grid.add_row(*(printable(cell) for cell in cells), style=styles[index] if styles is not None else None)
    console.print(grid)


def alerts(headers: tuple[str, ...], rows: list[tuple[str, ...]], optional: tuple[str, ...] = ()) -> None:
    """The alerts table; the `optional` columns are left out, last first, while it is wider than the terminal."""
    rows = [tuple(printable(cell) for cell in row) for row in rows]
    keep = list(range(len(headers)))
    widths = [max(len(headers[i]), *(len(row[i]) for row in rows)) for i in keep]
    for name in reversed(optional):
        if sum(widths[i] + 3 for i in keep) + 1 <= console.width:
            break
        keep.remove(headers.index(name))
    table = Table(header_style="bold", box=box.SIMPLE_HEAD)
    for i in keep:
        header = headers[i]
        table.add_column(header, justify="right" if header in ("ID", "VALUE", "MIN", "MAX", "AVG") else "left",
                         no_wrap=header != "HELD BY")
    for cells in rows:
        state, level = cells[1], cells[2]
        table.add_row(*(cells[i] for i in keep),
                      style="dim" if state == "resolved" else LEVEL_STYLES.get(level) if state == "firing" else None)
    console.print(table)


class Frame:
    """A `mcpctl.dashboard` frame, fitted already, rendered as its segments: no wrapping or measuring, which
    halves what each refresh of `mcpctl top` costs."""

    def __init__(self, lines: list[list[tuple[str, str]]], end: str = "") -> None:
        self.lines = lines
        self.end = end

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        style = console.get_style
        newline = Segment.line()
        for index, line in enumerate(self.lines):
            if index:
                yield newline
            for text, name in line:
                yield Segment(printable(text), style(name) if name else None)
        if self.end:
            yield Segment(self.end)
