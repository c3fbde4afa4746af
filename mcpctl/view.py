"""Text for cells and lines, shared by the plain (pipe) and Rich (terminal) outputs."""

from __future__ import annotations

from typing import Any

from mcpresd.protocol import format_amount


def amount_text(value: float, unit: str) -> str:
    return format_amount(value, unit)


def cost_text(allocation: dict[str, Any]) -> str:
    """An allocation's cost so far (or final), with its rate while active: '1.25 (1.50/h)'; '-' for none."""
    cost, rate = allocation.get("cost"), allocation.get("cost_per_hour")
    if cost is None:
        return "-"
    if allocation.get("state") == "active" and isinstance(rate, (int, float)):
        return f"{money(cost)} ({money(rate)}/h)"
    return money(cost)


def used_text(allocation: dict[str, Any], pressure: bool = True) -> str:
    """What it was measured to use, and its enforcement: 'hard: 3.2 cpu-s, 120.5 MiB peak, 1 OOM kill, pressure cpu
    4% mem 12%'; '-' for nothing. `pressure`: with the cgroup's pressure (cgroup v2 only)."""
    measured = allocation.get("measured") or {}
    parts = []
    if "cpu_seconds" in measured:
        parts.append(f"{measured['cpu_seconds']:.1f} cpu-s")
    if "memory_peak" in measured:
        parts.append(f"{measured['memory_peak'] / 1048576:.1f} MiB peak")
    kills = int(measured.get("oom_kills") or 0)
    if kills:
        parts.append(f"{kills} OOM kill{'s' if kills > 1 else ''}")
    if pressure and (stalled := pressure_text(measured)):
        parts.append(f"pressure {stalled}")
    if any(str(risk).startswith("overuse:") for risk in allocation.get("risks") or ()):
        parts.append("over its grant")
    mode = allocation.get("enforce")
    text = ", ".join(parts) or "-"
    return f"{mode}: {text}" if mode and mode != "off" else text


def pressure_text(measured: dict[str, Any]) -> str:
    """The cgroup's pressure over the last 10 s (PSI `some` avg10: the share of time some of its tasks waited):
    'cpu 4% mem 12%'; '' where none was measured (cgroup v1, or no cgroup)."""
    shown = [f"{name} {measured[key]:.0f}%" for name, key in (("cpu", "cpu_pressure_some_avg10"),
                                                              ("mem", "memory_pressure_some_avg10"))
             if isinstance(measured.get(key), (int, float))]
    return " ".join(shown)


def items_text(allocation: dict[str, Any]) -> str:
    """What it holds; for a queued request, what it asks for: 'gpu=1, memory=8G, cpu=2..8'."""
    if not allocation["items"] and allocation.get("request"):
        return ", ".join(demand_text(d) for d in allocation["request"].get("resources") or ())
    return ", ".join(f"{item['resource']}={format_amount(item['amount'], item['unit'])}" for item in allocation["items"])


def demand_text(demand: dict[str, Any]) -> str:
    """One line of a request, sized by what its name says it is (memory, disk:*, net:*); '-' for a line unread."""
    name = demand.get("resource")
    if not isinstance(name, str):
        return "-"
    amounts = [sized(name, a) for a in (demand.get("amount"), demand.get("max")) if isinstance(a, int | float)]
    return f"{name}={'..'.join(amounts)}"


def sized(name: str, value: float) -> str:
    """An amount of the resource named, as the tables print it: 8G of memory or disk:*, 125M/s of net:*, else 2."""
    unit = "bytes" if name == "memory" or name.startswith("disk") else "bytes/s" if name.startswith("net") else ""
    return format_amount(value, unit)


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
        pools_text(resource),
        details,
    ]


RESOURCE_HEADERS = ("NAME", "TYPE", "CAPACITY", "ALLOCATED", "FREE", "POOLS", "DETAILS")


def pools_text(resource: dict[str, Any]) -> str:
    """What slot pools hold of it (counted in ALLOCATED): 'builds 2 cores'; '-' for none."""
    held = resource.get("pools") or {}
    return ", ".join(f"{pool} {format_amount(amount, resource['unit'])}" for pool, amount in held.items()) or "-"


def age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    if seconds < 86400:
        return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"
    return f"{seconds // 86400:.0f}d{seconds % 86400 // 3600:02.0f}h"


# -- monitoring -------------------------------------------------------------

UNSUPPORTED = "unsupported"
LEVEL_STYLES = {"critical": "bold red", "error": "red", "warning": "yellow", "info": "blue"}
"""Rich styles of alert levels, for the terminal outputs."""
SPARKS = "▁▂▃▄▅▆▇█"

_UNITS = {"utilisation": "%", "utilisation_rate": "%", "memory_utilisation": "%", "swap_utilisation": "%",
          "fan_speed_pct": "%", "temperature_c": "°C", "power_w": "W", "clock_sm_mhz": "MHz",
          "used": "bytes", "available": "bytes", "memory_used": "bytes", "foreign_memory": "bytes",
          "read_bps": "bytes/s", "write_bps": "bytes/s", "rx_bps": "bytes/s", "tx_bps": "bytes/s"}


def metric_unit(metric: str) -> str:
    """The unit a metric is measured in: '%', 'bytes', 'bytes/s', '°C', 'W', 'MHz', or '' for counts."""
    if metric in _UNITS:
        return _UNITS[metric]
    return "%" if metric.startswith("core") or metric.endswith(("utilisation", "_pct")) else ""


def metric_text(metric: str, value: object, *, space: bool = True) -> str:
    """A sampled value for people: '42 %', '7.5G', '63 °C'; 'n/a' where the device has no such reading,
    '?' where the read failed. Never 0 for either."""
    if value == UNSUPPORTED:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "?"
    unit = metric_unit(metric)
    if unit in ("bytes", "bytes/s"):
        return format_amount(value, unit)
    number = f"{value:.0f}" if abs(value) >= 10 or unit == "MHz" else f"{value:.1f}".rstrip("0").rstrip(".")
    if not unit:
        return f"{value:.2f}".rstrip("0").rstrip(".") if metric == "load1" else number
    return f"{number} {unit}" if space else f"{number}{unit}"


def alert_value_text(resource: object, value: object) -> str:
    """An alert's value: an overuse alert's memory in MiB (`allocation:ID/memory`), any other as a number."""
    if isinstance(resource, str) and resource.startswith("allocation:") and resource.endswith("/memory") \
            and isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value / 1048576:.0f} MiB"
    return number_text(value)


def number_text(value: object) -> str:
    """A reading without its unit: '100', '4.2', '?' for none."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "?"
    return f"{value:.0f}" if abs(value) >= 10 else f"{value:.1f}".rstrip("0").rstrip(".")


def human_duration(seconds: float) -> str:
    """Two units at most, spaced: 4320 -> '1h 12m', 1800 -> '30m', 42 -> '42s', 93784 -> '1d 2h'."""
    whole = int(round(max(0.0, seconds)))
    if whole < 60:
        return f"{whole}s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if whole >= size:
            parts.append(f"{whole // size}{unit}")
            whole %= size
        elif parts:
            break
        if len(parts) == 2:
            break
    return " ".join(parts)


def sparkline(values: list[float | None], width: int, bounds: tuple[float, float] | None = None) -> str:
    """At most `width` characters of ▁..█ (a blank for a gap), each the mean of its share of `values`,
    scaled to `bounds` (0..100 for a percentage) or else to the values' own range."""
    if not values or width <= 0:
        return ""
    buckets: list[float | None] = []
    count = min(width, len(values))
    for index in range(count):
        chunk = [v for v in values[index * len(values) // count:(index + 1) * len(values) // count] if v is not None]
        buckets.append(sum(chunk) / len(chunk) if chunk else None)
    known = [v for v in buckets if v is not None]
    if not known:
        return " " * count
    low, high = bounds if bounds is not None else (min(known), max(known))
    span = high - low
    last = len(SPARKS) - 1

    def spark(value: float) -> str:
        if span <= 0:
            return SPARKS[last // 2]
        return SPARKS[max(0, min(last, int((value - low) / span * len(SPARKS))))]

    return "".join(" " if v is None else spark(v) for v in buckets)


# -- pools, cost and usage --------------------------------------------------

BUDGET_STYLES = {"ok": "green", "soft": "yellow", "exceeded": "bold red"}
"""Rich styles of budget states, for the terminal outputs."""
_SIZED_KINDS = {"memory", "disk", "gpu_memory", "network"}
_SHORT_KINDS = {"memory": "mem", "network": "net"}


def money(value: object) -> str:
    """A cost: '12.50', '0.0042' for small ones, '<0.0001' for tiny ones, '-' for none (costs carry no currency)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    if value == 0 or abs(value) >= 0.01:
        return f"{value:,.2f}"
    if abs(value) >= 0.0001:
        return f"{value:.4f}".rstrip("0")
    return "<0.0001"


def percent(fraction: object) -> str:
    """0.42 -> '42%'; '-' for none."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        return "-"
    return f"{fraction * 100:.0f}%"


def kind_amount(kind: str, value: object) -> str:
    """An amount of a resource kind: sizes for memory and disks ('12G'), plain numbers else ('3.5')."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    if kind in _SIZED_KINDS:
        return format_amount(value, "bytes")
    return _short(value)


def _short(value: float) -> str:
    """Two or three significant digits, never an exponent: 42, 3.5, 0.042, '<0.001'."""
    if value == 0 or abs(value) >= 10:
        return f"{value:.0f}"
    if abs(value) >= 0.1:
        return f"{value:.1f}".rstrip("0").rstrip(".")
    if abs(value) >= 0.001:
        return f"{value:.3f}".rstrip("0").rstrip(".")
    return "<0.001"


def kind_hours(hours: dict[str, Any] | None) -> str:
    """Resource-hours per kind, compactly: 'cpu 3.5h gpu 1.2h mem 12G·h'."""
    parts = []
    for kind, value in sorted((hours or {}).items()):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = _SHORT_KINDS.get(kind, kind)
        if kind in _SIZED_KINDS:
            parts.append(f"{name} {format_amount(value, 'bytes')}·h")
        else:
            parts.append(f"{name} {_short(value)}h")
    return " ".join(parts) or "-"


def kind_fractions(fractions: dict[str, Any] | None) -> str:
    """Fractions per kind as percentages: 'cpu 42% mem 61%'."""
    parts = [f"{_SHORT_KINDS.get(kind, kind)} {percent(value)}" for kind, value in sorted((fractions or {}).items())
             if not isinstance(value, bool) and isinstance(value, (int, float))]
    return " ".join(parts) or "-"
