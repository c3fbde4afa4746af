"""Text for cells and lines, shared by the plain (pipe) and Rich (terminal) outputs."""

from __future__ import annotations

from typing import Any

from mcpresd.protocol import format_amount


def amount_text(value: float, unit: str) -> str:
    return format_amount(value, unit)


def items_text(allocation: dict[str, Any]) -> str:
    return ", ".join(f"{item['resource']}={format_amount(item['amount'], item['unit'])}" for item in allocation["items"])


def resource_row(resource: dict[str, Any]) -> list[str]:
    unit = resource["unit"]
    labels = resource["labels"]
    if resource["type"] == "gpu":
        details = f"{labels.get('name', '')} {resource['uuid'] or ''}".strip()
    elif resource["type"] == "disk":
        details = str(labels.get("device", ""))
    elif resource["type"] == "network" and labels.get("speed_known") is False:
        details = "link speed unknown"
    else:
        details = ""
    return [
        resource["name"],
        resource["type"],
        format_amount(resource["capacity"], unit),
        format_amount(resource["allocated"], unit),
        format_amount(resource["free"], unit),
        details,
    ]


def age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    if seconds < 86400:
        return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"
    return f"{seconds // 86400:.0f}d{seconds % 86400 // 3600:02.0f}h"
