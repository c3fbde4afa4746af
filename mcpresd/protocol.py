"""The contract between mcpresd and its clients, written once.

Rules of this module:
- Standard library only, and cheap to import: `mcpctl allocate` imports it on
  every call, so nothing here may pull in json-schema, typing machinery at
  run time, Rich or sqlite.
- Method names, parameter and result shapes, error codes, framing limits and
  the unit parsers used on both sides live here and nowhere else.
- Framing: one UTF-8 JSON text per line (JSON-RPC 2.0), blank lines ignored,
  at most MAX_MESSAGE_BYTES per line.
"""

from __future__ import annotations

import math
import os
from enum import IntEnum, StrEnum

# The wire shapes below are for type checkers only: `typing` costs ~4 ms of import, and
# `mcpctl allocate` imports this module on every call.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Collection
    from typing import Any, Literal, NotRequired, TypedDict, TypeGuard

from mcpresd import __version__

VERSION = __version__
JSONRPC = "2.0"
MAX_MESSAGE_BYTES = 1024 * 1024
MAX_BATCH = 1000
MAX_NAME_LENGTH = 200
ALLOCATIONS_PAGE = 1000
"""The most allocations one `allocations.list` returns: a longer list is read page by page (`before_id`)."""
MAX_TEXT_LENGTH = 1000
MAX_DEMANDS = 64
MAX_QUANTITY = float(1 << 63)
"""The largest capacity, amount, measurement or cost a client or the config may give (2**63, ~9.2e18):
sums and products of such numbers stay finite, so every reply can be written as JSON."""
MIN_QUANTITY = 1e-9
"""The smallest positive capacity, amount or budget limit (the ledger's tolerance; no denormals)."""


class Method(StrEnum):
    """Every JSON-RPC method the daemon serves."""

    DAEMON_STATUS = "daemon.status"
    RESOURCES_LIST = "resources.list"
    RESOURCES_ADD = "resources.add"
    RESOURCES_REMOVE = "resources.remove"
    RESOURCES_REFRESH = "resources.refresh"
    ALLOCATE = "allocate"
    RELEASE = "release"
    ALLOCATIONS_LIST = "allocations.list"
    ALLOCATIONS_GET = "allocations.get"
    ALLOCATIONS_WAIT = "allocations.wait"
    ALLOCATIONS_RENEW = "allocations.renew"
    ALLOCATIONS_EXPLAIN = "allocations.explain"
    ALLOCATIONS_ATTACH = "allocations.attach"
    EVENTS_LIST = "events.list"
    EVENTS_SUBSCRIBE = "events.subscribe"
    METRICS_CURRENT = "metrics.current"
    METRICS_HISTORY = "metrics.history"
    ALERTS_LIST = "alerts.list"
    PREDICT = "predict"
    DB_BACKUP = "db.backup"
    RESOURCES_SET_COST = "resources.set_cost"
    POOLS_LIST = "pools.list"
    POOLS_GET = "pools.get"
    POOLS_CREATE = "pools.create"
    POOLS_DELETE = "pools.delete"
    POOLS_DRAIN = "pools.drain"
    POOLS_UNDRAIN = "pools.undrain"
    POOLS_EVENTS = "pools.events"
    BUDGETS_SET = "budgets.set"
    BUDGETS_LIST = "budgets.list"
    BUDGETS_DELETE = "budgets.delete"
    USAGE = "usage"
    RECOMMEND = "recommend"
    OPTIMISE = "optimise"


EVENT_NOTIFICATION = "event"
"""Method name of the notifications a subscribed connection receives: params is one event."""


class ErrorCode(IntEnum):
    """JSON-RPC error codes: the reserved ones, then mcpres's own (1000-1999)."""

    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL_ERROR = -32603

    UNKNOWN_RESOURCE = 1001
    INSUFFICIENT_CAPACITY = 1002
    ALLOCATION_NOT_FOUND = 1003
    ALREADY_RELEASED = 1004
    RESOURCE_EXISTS = 1005
    RESOURCE_IN_USE = 1006
    IDEMPOTENCY_CONFLICT = 1007
    PERMISSION_DENIED = 1008
    INVALID_HOLDER = 1009
    STORAGE_ERROR = 1010
    NEVER_FITS = 1011
    WAIT_TIMEOUT = 1012
    WITHDRAWN = 1013
    LIMIT_EXCEEDED = 1014
    BUDGET_EXCEEDED = 1015
    POOL_DRAINING = 1016
    UNKNOWN_POOL = 1017
    POOL_EXISTS = 1018
    CLUSTER_FAILED = 1019


class Priority(StrEnum):
    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"
    CRITICAL = "critical"


class AllocationState(StrEnum):
    QUEUED = "queued"
    ACTIVE = "active"
    RELEASED = "released"
    WITHDRAWN = "withdrawn"


class EnforceMode(StrEnum):
    """How an allocation's grant is enforced on its processes (docs/api.md, "Enforcement")."""

    OFF = "off"
    SOFT = "soft"
    HARD = "hard"


class Strategy(StrEnum):
    """How the daemon chooses among resources that fit a typed demand (docs/scheduling.md)."""

    FIRST_FIT = "first-fit"
    BEST_FIT = "best-fit"
    WORST_FIT = "worst-fit"
    ROUND_ROBIN = "round-robin"
    LEAST_LOADED = "least-loaded"
    COST_OPTIMISED = "cost-optimised"
    PERFORMANCE_OPTIMISED = "performance-optimised"
    BALANCED = "balanced"
    LOCALITY_AWARE = "locality-aware"


class Objective(StrEnum):
    """What the allocator optimises when a request may be served from several pools."""

    COST = "cost"
    PERFORMANCE = "performance"
    LATENCY = "latency"
    UTILISATION = "utilisation"
    BALANCED = "balanced"


class PoolState(StrEnum):
    ACTIVE = "active"
    DRAINING = "draining"
    DRAINED = "drained"


class FactoryKind(StrEnum):
    """How a pool gets its members: fixed (listed or selected), carved from a parent, or made by commands."""

    STATIC = "static"
    SLOTS = "slots"
    COMMAND = "command"


class Period(StrEnum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"


class BudgetScope(StrEnum):
    TOOL = "tool"
    OWNER = "owner"
    POOL = "pool"


POOL_PREFIX = "pool:"
"""A demand whose resource is `pool:NAME[,NAME...]` asks for whole members of those pools."""


class ResourceType(StrEnum):
    CPU = "cpu"
    MEMORY = "memory"
    DISK = "disk"
    NETWORK = "network"
    GPU = "gpu"
    CUSTOM = "custom"


# -- wire shapes ------------------------------------------------------------

Labels = dict[str, str | int | float | bool | None]

if TYPE_CHECKING:

    class ResourceDict(TypedDict):
        name: str
        type: str
        capacity: float
        unit: str
        labels: Labels
        uuid: str | None
        cost_per_unit_hour: float | None
        source: Literal["discovered", "config", "api", "pool"]
        allocated: float
        free: float
        health: dict[str, Any] | None


    class DemandDict(TypedDict):
        """One line of a request: a resource name, a GPU UUID, or a type (`gpu`)."""

        resource: str
        amount: float


    class AllocateParams(TypedDict):
        resources: list[DemandDict]
        priority: NotRequired[str]
        tool_id: NotRequired[str | None]
        execution_id: NotRequired[str | None]
        idempotency_key: NotRequired[str | None]
        holder_pid: NotRequired[int | None]


    class ItemDict(TypedDict):
        resource: str
        type: str
        amount: float
        unit: str
        uuid: str | None


    class AllocationDict(TypedDict):
        id: str
        state: str
        items: list[ItemDict]
        priority: str
        tool_id: str | None
        execution_id: str | None
        idempotency_key: str | None
        owner_uid: int
        requester_pid: int | None
        holder_pid: int | None
        holder: str
        created_at: float
        granted_at: float | None
        released_at: float | None
        release_reason: str | None
        wait_until: float | None
        ttl_s: float | None
        expires_at: float | None
        preemptible: bool
        preempt_at: float | None
        risks: list[str]
        request: dict[str, Any] | None
        cost: float | None
        cost_per_hour: float | None
        pools: list[str]
        measured: dict[str, float] | None
        enforce: str


    class StatusDict(TypedDict):
        version: str
        pid: int
        uptime_s: float
        socket: str
        database: str
        resources: int
        allocations: dict[str, int]
        gpu_source: str
        decision_cache: dict[str, int]
        lost_commits: dict[str, float] | None
        enforcement: dict[str, Any]


    class BackupDict(TypedDict):
        """The result of db.backup: where the copy is, its size, and its number of database pages."""

        path: str
        bytes: int
        pages: int


    class ErrorDict(TypedDict):
        code: int
        message: str
        data: NotRequired[dict[str, Any]]


# -- paths ------------------------------------------------------------------


def default_runtime_dir() -> str:
    """Where a per-user daemon puts its socket: $XDG_RUNTIME_DIR, else a private /tmp dir."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "mcpres")
    return os.path.join("/tmp", f"mcpres-{os.getuid()}")


def default_socket_path() -> str:
    env = os.environ.get("MCPRES_SOCKET")
    if env:
        return env
    return os.path.join(default_runtime_dir(), "mcpresd.sock")


def socket_directory_problem(directory: str, trusted: Collection[int]) -> str | None:
    """Why a socket's directory is unsafe (a user outside `trusted` could put their own socket there), or None.

    The daemon's rule for its socket's directory, for clients: owned by a trusted uid (a symbolic link too),
    and not writable by group or others unless sticky (/tmp: there SO_PEERCRED tells who made the socket).
    A directory that does not exist is not a problem here: connecting finds no socket.
    """
    import stat

    try:
        info = os.lstat(directory)
        if stat.S_ISLNK(info.st_mode):
            if info.st_uid not in trusted:
                return f"{directory} is a symbolic link made by uid {info.st_uid}"
            info = os.stat(directory)
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode):
        return f"{directory} is not a directory"
    if info.st_uid not in trusted:
        return f"{directory} belongs to uid {info.st_uid}"
    if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
        return f"{directory} is writable by other users (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


# -- units ------------------------------------------------------------------

_SIZE_SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


class UnitError(ValueError):
    """A size, amount or duration could not be parsed."""


def parse_size(text: str) -> int:
    """Parse `512M`, `8G`, `1.5T`, `8GiB` or plain bytes into bytes (binary multiples)."""
    lowered = text.strip().lower()
    if lowered.endswith("ib"):
        lowered = lowered[:-2]
    elif lowered.endswith("b"):
        lowered = lowered[:-1]
    suffix = lowered[-1:] if lowered[-1:].isalpha() else ""
    number = lowered[: len(lowered) - len(suffix)] if suffix else lowered
    if suffix not in _SIZE_SUFFIXES or not number:
        raise UnitError(f"not a size: {text!r} (use bytes or a number with K, M, G, T or P, e.g. 512M, 8G, 1.5T)")
    try:
        value = float(number)
    except ValueError:
        raise UnitError(f"not a size: {text!r} (use bytes or a number with K, M, G, T or P, e.g. 512M, 8G, 1.5T)") from None
    if not math.isfinite(value) or value <= 0:
        raise UnitError(f"a size must be positive and finite, got {text!r}")
    result = int(value * _SIZE_SUFFIXES[suffix])
    if result <= 0:
        raise UnitError(f"a size must be at least one byte, got {text!r}")
    return result


def parse_amount(text: str) -> float:
    """Parse a positive finite number (`2`, `0.5`); sizes are accepted too (`8G`)."""
    try:
        value = float(text)
    except ValueError:
        return float(parse_size(text))
    if not math.isfinite(value) or value <= 0:
        raise UnitError(f"an amount must be a positive finite number, got {text!r}")
    return value


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float | None:
    """Seconds from `30`, `30s`, `10m`, `2h`, `1h30m`, `500ms`, `1d`; `forever` gives None (no limit)."""
    raw = text.strip().lower()
    if raw in ("forever", "inf", "infinite", "none"):
        return None
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
        number = ""
        rest = raw
        if not rest:
            raise UnitError(f"not a duration: {text!r}") from None
        while rest:
            digits = len(rest) - len(rest.lstrip("0123456789."))
            number, rest = rest[:digits], rest[digits:]
            unit = "ms" if rest.startswith("ms") else rest[:1]
            if not number or unit not in _DURATION_UNITS:
                raise UnitError(
                    f"not a duration: {text!r} (use seconds or a number with ms, s, m, h or d, e.g. 30s, 10m, 1h30m,"
                    " or 'forever')"
                ) from None
            try:
                value += float(number) * _DURATION_UNITS[unit]
            except ValueError:
                raise UnitError(f"not a duration: {text!r}") from None
            rest = rest[len(unit):]
    if not math.isfinite(value) or value < 0:
        raise UnitError(f"a duration must be zero or more seconds, got {text!r}")
    return value


def format_size(value: float) -> str:
    """Bytes to a short human size: 8589934592 -> '8G', 1536 -> '1.5K'."""
    for suffix, factor in (("P", 1 << 50), ("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if abs(value) >= factor:
            scaled = value / factor
            return f"{scaled:.1f}".rstrip("0").rstrip(".") + suffix
    return f"{value:g}"


def format_amount(value: float, unit: str) -> str:
    if unit == "bytes" or unit == "bytes/s":
        return format_size(value) + ("/s" if unit == "bytes/s" else "")
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return f"{text} {unit}" if unit else text


def is_valid_number(value: object) -> TypeGuard[int | float]:
    """A JSON number that is a real, finite amount (bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float (JSON allows 400 digits)
        return False


def prometheus_text(readings: dict[str, dict[str, float | str | None]]) -> str:
    """Current values in the Prometheus text exposition format; unsupported and unknown values are left out."""
    lines: list[str] = []
    by_metric: dict[str, list[tuple[str, float]]] = {}
    for resource, values in sorted(readings.items()):
        for metric, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                name = "mcpres_" + "".join(c if c.isalnum() else "_" for c in metric)
                by_metric.setdefault(name, []).append((resource, float(value)))
    for name, samples in sorted(by_metric.items()):
        lines.append(f"# TYPE {name} gauge")
        for resource, value in samples:
            label = resource.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            lines.append(f'{name}{{resource="{label}"}} {value:.17g}')
    return "\n".join(lines) + "\n"



def compact_json_encoder(*, allow_nan: bool) -> Callable[[Any], str]:
    """A function that writes a value as compact, ASCII-only JSON (non-ASCII as \\u escapes), built once.

    `json.JSONEncoder.encode` builds CPython's C encoder afresh on every call, which costs more than encoding
    a small object; the daemon encodes every reply and every row's JSON column, so it builds one here. Without
    the C accelerator (another Python) it is the plain encoder. No check for circular references: the daemon
    encodes only trees it built. With `allow_nan` False, NaN and infinities raise ValueError.
    """
    import json
    import json.encoder

    plain = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=allow_nan)
    make = getattr(json.encoder, "c_make_encoder", None)  # CPython's accelerator; None (or absent) elsewhere
    if make is None:
        return plain.encode
    encode_chunks = make(None, plain.default, json.encoder.encode_basestring_ascii, None, ":", ",", False, False,
                         allow_nan)

    def encode(value: Any) -> str:
        return "".join(encode_chunks(value, 0))

    return encode
