"""The tools file: which tools of the wrapped server are gated, and what each call asks mcpresd for.

Rules of this module:
- Loading is strict. Every key is checked when the gateway starts, so a typo
  never turns into an ungated tool: an unknown key, a wrong type or a bad
  amount raises ToolsFileError naming the file, the entry and the key.
- Units are parsed by `mcpresd.protocol` (sizes, amounts, durations), as the
  rest of mcpctl parses them.
- The first `[[tool]]` whose `match` glob fits the tool's name decides; a tool
  that matches no entry, or an entry that asks for nothing, is ungated.
"""

from __future__ import annotations

import fnmatch
import math
import tomllib
from dataclasses import dataclass

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Literal

from mcpresd.protocol import (
    MAX_NAME_LENGTH,
    POOL_PREFIX,
    Priority,
    Strategy,
    UnitError,
    format_size,
    parse_amount,
    parse_duration,
    parse_size,
)

DEFAULT_WAIT = "10m"
"""How long a gated call waits in the queue unless its entry says otherwise."""
DEFAULT_PROGRESS_INTERVAL = 1.0
DEFAULT_RECONNECT_INTERVAL = 5.0
DEFAULT_STOP_GRACE = 1.5
DEFAULT_CANCEL_GRACE = 30.0
MAX_WAIT_S = 365 * 86400.0
"""The daemon's limit for `wait` and `ttl`."""

SERVER_KEYS = ("name", "on_broker_down", "progress_interval", "reconnect_interval", "stop_grace", "cancel_grace")
TOOL_KEYS = ("match", "gpu", "cpu", "mem", "res", "pool", "members", "priority", "wait", "ttl", "strategy", "where")


class ToolsFileError(Exception):
    """The tools file is missing, is not TOML, or breaks one of its rules."""


@dataclass(frozen=True)
class Rule:
    """One `[[tool]]` entry: a glob over tool names and the allocate params a matching call sends."""

    match: str
    resources: tuple[dict[str, Any], ...]
    priority: str = Priority.NORMAL.value
    wait: float | None = 600.0
    """Seconds a call may queue; None waits forever."""
    ttl: float | None = None
    strategy: str | None = None
    where: tuple[str, ...] = ()
    summary: str = ""
    """What it asks for, for people: `gpu 1, mem 8G`."""

    @property
    def gated(self) -> bool:
        return bool(self.resources)

    def allocate_params(self, tool_id: str, execution_id: str) -> dict[str, Any]:
        """`allocate` params for one call, detached (the gateway adds the holder: its server's keeper)."""
        params: dict[str, Any] = {
            "resources": [dict(demand) for demand in self.resources],
            "priority": self.priority,
            "tool_id": tool_id,
            "execution_id": execution_id,
            "wait": "forever" if self.wait is None else self.wait,
            "detach": True,
        }
        if self.ttl is not None:
            params["ttl"] = self.ttl
        if self.strategy is not None:
            params["strategy"] = self.strategy
        if self.where:
            params["where"] = list(self.where)
        return params


@dataclass(frozen=True)
class GatewayConfig:
    """The whole tools file."""

    server: str | None = None
    on_broker_down: Literal["open", "closed"] = "open"
    progress_interval: float = DEFAULT_PROGRESS_INTERVAL
    reconnect_interval: float = DEFAULT_RECONNECT_INTERVAL
    stop_grace: float = DEFAULT_STOP_GRACE
    """How long the server gets to exit once its stdin is closed, before SIGTERM (and SIGKILL 1 s later)."""
    cancel_grace: float = DEFAULT_CANCEL_GRACE
    """How long a cancelled running call keeps its allocation, waiting for the server's answer to it."""
    rules: tuple[Rule, ...] = ()

    def rule_for(self, tool: str) -> Rule | None:
        """The first entry whose glob matches `tool` (case-sensitive), if it gates the tool."""
        for rule in self.rules:
            if fnmatch.fnmatchcase(tool, rule.match):
                return rule if rule.gated else None
        return None


def load(path: str) -> GatewayConfig:
    """Read and check a tools file; ToolsFileError says what is wrong, and where."""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        raise ToolsFileError(f"{path}: no such file") from None
    except OSError as error:
        raise ToolsFileError(f"{path}: cannot read it ({error.strerror})") from None
    except tomllib.TOMLDecodeError as error:
        raise ToolsFileError(f"{path}: not valid TOML: {error}") from None
    except UnicodeDecodeError:
        raise ToolsFileError(f"{path}: not valid TOML: not UTF-8") from None
    return parse(data, path)


def parse(data: dict[str, Any], path: str = "tools file") -> GatewayConfig:
    unknown = sorted(set(data) - {"server", "tool"})
    if unknown:
        raise ToolsFileError(f"{path}: unknown key {unknown[0]!r} (the file has [server] and [[tool]] entries)")
    server = data.get("server", {})
    if not isinstance(server, dict):
        raise ToolsFileError(f"{path}: server must be a table: [server]")
    where = f"{path}: [server]"
    _no_unknown(server, SERVER_KEYS, where)
    name = server.get("name")
    if name is not None:
        name = server_name(name, f"{where} name")
    on_broker_down = server.get("on_broker_down", "open")
    if on_broker_down not in ("open", "closed"):
        raise ToolsFileError(f"{where} on_broker_down: must be \"open\" or \"closed\", got {on_broker_down!r}")
    progress = _interval(server.get("progress_interval"), DEFAULT_PROGRESS_INTERVAL, f"{where} progress_interval")
    reconnect = _interval(server.get("reconnect_interval"), DEFAULT_RECONNECT_INTERVAL,
                          f"{where} reconnect_interval")
    stop_grace = _interval(server.get("stop_grace"), DEFAULT_STOP_GRACE, f"{where} stop_grace")
    cancel_grace = _interval(server.get("cancel_grace"), DEFAULT_CANCEL_GRACE, f"{where} cancel_grace")
    entries = data.get("tool", [])
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise ToolsFileError(f"{path}: tool must be an array of tables: [[tool]] entries")
    rules = tuple(_rule(entry, f"{path}: [[tool]] #{number}") for number, entry in enumerate(entries, 1))
    return GatewayConfig(server=name, on_broker_down=on_broker_down, progress_interval=progress,
                         reconnect_interval=reconnect, stop_grace=stop_grace, cancel_grace=cancel_grace,
                         rules=rules)


def server_name(value: object, where: str) -> str:
    """A server name: the first half of every tool id, `<server>/<tool>`."""
    if not isinstance(value, str) or not value.strip():
        raise ToolsFileError(f"{where}: must be a non-empty string, got {value!r}")
    if "/" in value or any(ch.isspace() or ord(ch) < 0x20 for ch in value) or len(value) > 100:
        raise ToolsFileError(f"{where}: at most 100 characters, no '/', whitespace or control characters; "
                             f"got {value!r}")
    return value


def _rule(entry: dict[str, Any], where: str) -> Rule:
    match = entry.get("match")
    if not isinstance(match, str) or not match:
        raise ToolsFileError(f"{where}: match: every entry needs a tool name or glob, e.g. match = \"render_*\"")
    where = f"{where} (match = {match!r})"
    _no_unknown(entry, TOOL_KEYS, where)
    demands: list[dict[str, Any]] = []
    summary: list[str] = []
    if "gpu" in entry:
        gpus = _amount(entry["gpu"], f"{where} gpu")
        if gpus >= 1 and gpus != int(gpus):
            raise ToolsFileError(f"{where} gpu: ask for a whole number of GPUs or a share below 1 of one, "
                                 f"got {entry['gpu']!r}")
        demands.append({"resource": "gpu", "amount": gpus})
        summary.append(f"gpu {gpus:g}")
    if "cpu" in entry:
        cores = _amount(entry["cpu"], f"{where} cpu")
        demands.append({"resource": "cpu", "amount": cores})
        summary.append(f"cpu {cores:g}")
    if "mem" in entry:
        size = _size(entry["mem"], f"{where} mem")
        demands.append({"resource": "memory", "amount": float(size)})
        summary.append(f"mem {format_size(size)}")
    if "res" in entry:
        for name, amount in _resources(entry["res"], f"{where} res"):
            demands.append({"resource": name, "amount": amount})
            summary.append(f"{name} {amount:g}")
    if "pool" in entry:
        pool = entry["pool"]
        if not isinstance(pool, str) or not pool.strip() or any(not p.strip() for p in pool.split(",")):
            raise ToolsFileError(f"{where} pool: pool names, globs or selectors, comma-separated, e.g. "
                                 f"\"build-*\"; got {pool!r}")
        members = entry.get("members", 1)
        if isinstance(members, bool) or not isinstance(members, int) or members < 1:
            raise ToolsFileError(f"{where} members: a whole number of pool members, 1 or more; got {members!r}")
        demands.append({"resource": POOL_PREFIX + pool, "amount": members})
        summary.append(f"pool {pool}" + (f" x{members}" if members != 1 else ""))
    elif "members" in entry:
        raise ToolsFileError(f"{where} members: goes with pool: it says how many of the pool's members to take")
    priority = entry.get("priority", Priority.NORMAL.value)
    if priority not in {p.value for p in Priority}:
        raise ToolsFileError(f"{where} priority: one of {', '.join(p.value for p in Priority)}; got {priority!r}")
    wait = _duration(entry.get("wait", DEFAULT_WAIT), f"{where} wait", allow_forever=True)
    ttl = None
    if "ttl" in entry:
        ttl = _duration(entry["ttl"], f"{where} ttl", allow_forever=False)
        if ttl is None or ttl <= 0:
            raise ToolsFileError(f"{where} ttl: a duration greater than zero, e.g. \"30m\"; got {entry['ttl']!r}")
    strategy = entry.get("strategy")
    if strategy is not None and strategy not in {s.value for s in Strategy}:
        raise ToolsFileError(f"{where} strategy: one of {', '.join(Strategy)}; got {strategy!r}")
    selectors = entry.get("where", [])
    if not isinstance(selectors, list) or not all(isinstance(s, str) and s for s in selectors):
        raise ToolsFileError(f"{where} where: a list of selectors, e.g. [\"memory>=40G\"]; got {selectors!r}")
    if not demands and any(key in entry for key in ("priority", "wait", "ttl", "strategy", "where")):
        raise ToolsFileError(f"{where}: asks for nothing (no gpu, cpu, mem, res or pool), so its other keys "
                             f"do nothing; an entry that asks for nothing marks its tools ungated")
    return Rule(match=match, resources=tuple(demands), priority=priority, wait=wait, ttl=ttl, strategy=strategy,
                where=tuple(selectors), summary=", ".join(summary))


def _no_unknown(table: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in known:
            raise ToolsFileError(f"{where}: unknown key {key!r} (known: {', '.join(known)})")


def _amount(value: object, where: str) -> float:
    if isinstance(value, bool):
        raise ToolsFileError(f"{where}: a positive number, got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
        if not math.isfinite(number) or number <= 0:
            raise ToolsFileError(f"{where}: a positive finite number, got {value!r}")
        return number
    if isinstance(value, str):
        try:
            return parse_amount(value)
        except UnitError as error:
            raise ToolsFileError(f"{where}: {error}") from None
    raise ToolsFileError(f"{where}: a positive number, got {value!r}")


def _size(value: object, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ToolsFileError(f"{where}: a size of at least one byte, got {value!r}")
        return value
    if isinstance(value, str):
        try:
            return parse_size(value)
        except UnitError as error:
            raise ToolsFileError(f"{where}: {error}") from None
    raise ToolsFileError(f"{where}: a size such as \"8G\" or a number of bytes, got {value!r}")


def _resources(value: object, where: str) -> list[tuple[str, float]]:
    """`res = ["licence=1", "gpu:0=0.5"]` or `res = { licence = 1 }`."""
    pairs: list[tuple[str, object]] = []
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, list):
        for entry in value:
            if not isinstance(entry, str):
                raise ToolsFileError(f"{where}: entries are \"NAME=AMOUNT\" strings, got {entry!r}")
            name, sep, amount = entry.rpartition("=")
            if not sep or not name or not amount:
                raise ToolsFileError(f"{where}: entries are \"NAME=AMOUNT\", e.g. \"licence=1\"; got {entry!r}")
            pairs.append((name, amount))
    else:
        raise ToolsFileError(f"{where}: a list of \"NAME=AMOUNT\" strings or a table NAME = AMOUNT; got {value!r}")
    if not pairs:
        raise ToolsFileError(f"{where}: names no resource")
    result = []
    for resource, given in pairs:
        if not resource or len(resource) > MAX_NAME_LENGTH or any(ord(ch) < 0x20 for ch in resource):
            raise ToolsFileError(f"{where}: {resource!r} is not a resource name")
        result.append((resource, _amount(given, f"{where} {resource}")))
    return result


def _duration(value: object, where: str, *, allow_forever: bool) -> float | None:
    if isinstance(value, bool):
        raise ToolsFileError(f"{where}: a duration such as \"30s\" or \"10m\", got {value!r}")
    if isinstance(value, (int, float)):
        seconds: float | None = float(value)
    elif isinstance(value, str):
        try:
            seconds = parse_duration(value)
        except UnitError as error:
            raise ToolsFileError(f"{where}: {error}") from None
    else:
        raise ToolsFileError(f"{where}: a duration such as \"30s\" or \"10m\", got {value!r}")
    if seconds is None:
        if not allow_forever:
            raise ToolsFileError(f"{where}: a finite duration, got {value!r}")
        return None
    if not math.isfinite(seconds) or seconds < 0 or seconds > MAX_WAIT_S:
        raise ToolsFileError(f"{where}: between 0 and 365 days" + (", or \"forever\"" if allow_forever else "")
                             + f"; got {value!r}")
    return seconds


def _interval(value: object, default: float, where: str) -> float:
    if value is None:
        return default
    seconds = _duration(value, where, allow_forever=False)
    if seconds is None or seconds <= 0:
        raise ToolsFileError(f"{where}: a duration greater than zero, e.g. \"1s\"; got {value!r}")
    return seconds
