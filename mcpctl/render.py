"""Rich renderables built from the API's result dicts. Imported only when printing to a terminal."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.table import Table

from mcpctl.view import age, items_text, resource_row

console = Console()


def status(data: dict[str, Any]) -> None:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for label, value in status_rows(data):
        table.add_row(label, value)
    console.print(table)


def status_rows(data: dict[str, Any]) -> list[tuple[str, str]]:
    counts = data["allocations"]
    return [
        ("daemon", f"mcpresd {data['version']} (pid {data['pid']})"),
        ("uptime", age(data["uptime_s"])),
        ("socket", data["socket"]),
        ("database", data["database"]),
        ("resources", str(data["resources"])),
        ("allocations", f"{counts.get('active', 0)} active, {counts.get('released', 0)} released"),
        ("GPUs from", data["gpu_source"]),
    ]


def resources(rows: list[dict[str, Any]]) -> None:
    table = Table(title=None, header_style="bold")
    for header in ("NAME", "TYPE", "CAPACITY", "ALLOCATED", "FREE", "DETAILS"):
        table.add_column(header, justify="right" if header in ("CAPACITY", "ALLOCATED", "FREE") else "left")
    for resource in rows:
        cells = resource_row(resource)
        style = "yellow" if resource["free"] <= 0 else None
        table.add_row(*cells, style=style)
    console.print(table)


def allocations(rows: list[dict[str, Any]]) -> None:
    table = Table(header_style="bold")
    for header in ("ID", "STATE", "PRIORITY", "ITEMS", "TOOL", "HOLDER", "AGE"):
        table.add_column(header)
    now = time.time()
    for allocation in rows:
        table.add_row(
            allocation["id"],
            allocation["state"],
            allocation["priority"],
            items_text(allocation),
            allocation["tool_id"] or "",
            str(allocation["holder_pid"] or ""),
            age(now - allocation["created_at"]),
            style="dim" if allocation["state"] != "active" else None,
        )
    console.print(table)
