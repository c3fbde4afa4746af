"""The contract between mcpresd and its clients, written once.

Rules of this module:
- Standard library only, and cheap to import: `mcpctl allocate` imports it on
  every call, so nothing here may pull in json-schema, typing machinery at
  run time, Rich or sqlite.
- Method names, parameter and result shapes, error codes, framing limits and
  the unit parsers used on both sides live here and nowhere else (the enums
  are written in protocol_enums.py and load from here on first use).
- Framing: one UTF-8 JSON text per line (JSON-RPC 2.0), blank lines ignored,
  at most MAX_MESSAGE_BYTES per line.
"""

from __future__ import annotations

import math
import os

# The wire shapes below are for type checkers only: `typing` costs ~4 ms of import, and
# `mcpctl allocate` imports this module on every call.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Collection
    from typing import Any, Literal, NotRequired, TypedDict, TypeGuard

    from mcpresd.protocol_enums import (
        AllocationState as AllocationState,
        BudgetScope as BudgetScope,
        EnforceMode as EnforceMode,
        ErrorCode as ErrorCode,
        FactoryKind as FactoryKind,
        Method as Method,
        Objective as Objective,
        Period as Period,
        PoolState as PoolState,
        Priority as Priority,
        ResourceType as ResourceType,
        Strategy as Strategy,
    )

from mcpresd import __version__

VERSION = __version__
JSONRPC = "2.0"
MAX_MESSAGE_BYTES = 1024 * 1024
MAX_BATCH = 1000
MAX_ADD = 10_000
"""The most resources one `resources.add` may register (its `resources` list); a line holds at most 1 MiB."""
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

# -- closed sets ------------------------------------------------------------
# Method, ErrorCode, Priority and the other enums are defined in mcpresd/protocol_enums.py and load on
# their first use here (`from mcpresd.protocol import Method` works as ever): `enum` costs ~4 ms to import,
# more than a whole `mcpctl allocate` adds to Python's start-up. The two methods that command and
# `mcpctl release` send on every call are plain strings, and Method takes them from here (as ErrorCode does
# the two codes `mcpctl run` expects).

ALLOCATE = "allocate"
RELEASE = "release"
ALLOCATION_NOT_FOUND = 1003
ALREADY_RELEASED = 1004
"""The codes `mcpctl run`'s closing release expects (the daemon saw the command exit first); ErrorCode takes
them from here."""

ENUMS = ("Method", "ErrorCode", "Priority", "AllocationState", "EnforceMode", "Strategy", "Objective", "PoolState",
         "FactoryKind", "Period", "BudgetScope", "ResourceType")
"""The classes of mcpresd/protocol_enums.py, all of them (a test keeps this in step)."""

if not TYPE_CHECKING:

    def __getattr__(name: str) -> object:
        if name not in ENUMS:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        from mcpresd import protocol_enums

        for enum_name in ENUMS:
            globals()[enum_name] = getattr(protocol_enums, enum_name)
        return globals()[name]


EVENT_NOTIFICATION = "event"
"""Method name of the notifications a subscribed connection receives: params is one event."""

POOL_PREFIX = "pool:"
"""A demand whose resource is `pool:NAME[,NAME...]` asks for whole members of those pools."""


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
        pools: dict[str, float]
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


    class ScopeDict(TypedDict):
        """A step's transient scope (systemd-scope backend): `systemd-run --user --scope --unit=UNIT
        --slice=SLICE --property=P ... -- CMD`."""

        unit: str
        slice: str
        properties: list[str]


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
        scope: NotRequired[ScopeDict]
        """systemd-scope backend only: the transient scope `mcpctl run` starts its step in."""


    class ConfigOriginDict(TypedDict):
        """The config file the daemon read (None: the embedded defaults) and how it was chosen."""

        path: str | None
        source: str

    class StatusDict(TypedDict):
        version: str
        pid: int
        uptime_s: float
        socket: str
        config: ConfigOriginDict
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


SOCKET_ENV = "MCPRES_SOCKET"
SYSTEM_SOCKET = "/run/mcpres/mcpresd.sock"
"""The system daemon's socket (systemd/mcpresd.socket)."""


def user_runtime_dir() -> tuple[str, str]:
    """This user's runtime directory for mcpres, and why it is that one.

    $XDG_RUNTIME_DIR if it is a directory of this user's (sudo may keep the invoking user's); else
    /run/user/UID, which the login manager makes and cron, `env -i` or su do not name; else a private
    /tmp/mcpres-UID.
    """
    uid = os.getuid()
    ignored = ""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        try:
            owner = os.stat(runtime).st_uid if os.path.isdir(runtime) else None
        except OSError:
            owner = None
        if owner == uid:
            return os.path.join(runtime, "mcpres"), "$XDG_RUNTIME_DIR"
        ignored = (f"; $XDG_RUNTIME_DIR={runtime} ignored: "
                   + ("not a directory" if owner is None else f"it belongs to uid {owner}, not to uid {uid}"))
    login = f"/run/user/{uid}"
    try:
        if os.path.isdir(login) and os.stat(login).st_uid == uid:
            return os.path.join(login, "mcpres"), f"{login}{ignored or ' ($XDG_RUNTIME_DIR unset)'}"
    except OSError:
        pass
    return os.path.join("/tmp", f"mcpres-{uid}"), f"no runtime directory (no $XDG_RUNTIME_DIR, no {login}){ignored}"


def default_runtime_dir() -> str:
    """Where a per-user daemon puts its socket (`user_runtime_dir`)."""
    return user_runtime_dir()[0]


def default_socket_path() -> str:
    """The socket a daemon serves by default: $MCPRES_SOCKET, else this user's."""
    env = os.environ.get(SOCKET_ENV)
    if env:
        return env
    return os.path.join(default_runtime_dir(), "mcpresd.sock")


class SocketChoice:
    """The socket a client talks to, where that came from (`source`), why, and every path looked at."""

    __slots__ = ("path", "source", "why", "tried")

    def __init__(self, path: str, source: str, why: str, tried: tuple[str, ...]) -> None:
        self.path = path
        self.source = source  # "--socket", "$MCPRES_SOCKET", "user" or "system"
        self.why = why
        self.tried = tried

    def describe(self) -> dict[str, Any]:
        return {"path": self.path, "source": self.source, "why": self.why, "tried": list(self.tried)}


def resolve_socket(given: str | None = None) -> SocketChoice:
    """The daemon's socket for a client: --socket, else $MCPRES_SOCKET, else the first of this user's socket
    and the system socket that exists, else this user's (where `mcpresd` started by hand listens).

    The one rule for every client (Typer commands, the fast path, the gateway); it never connects.
    """
    if given:
        return SocketChoice(given, "--socket", "given with --socket", (given,))
    env = os.environ.get(SOCKET_ENV)
    if env:
        return SocketChoice(env, "$" + SOCKET_ENV, f"${SOCKET_ENV} is set", (env,))
    runtime, why = user_runtime_dir()
    user = os.path.join(runtime, "mcpresd.sock")
    tried = (user, SYSTEM_SOCKET) if user != SYSTEM_SOCKET else (user,)
    if _is_socket(user):
        return SocketChoice(user, "user", f"your daemon's socket exists (in {why})", tried)
    if _is_socket(SYSTEM_SOCKET):
        return SocketChoice(SYSTEM_SOCKET, "system", f"no socket at {user} (your daemon's, in {why}); "
                                                     "the system daemon's socket exists", tried)
    return SocketChoice(user, "user", f"no socket at {user} (your daemon's, in {why}) nor at {SYSTEM_SOCKET} "
                                      "(the system daemon's)", tried)


def _is_socket(path: str) -> bool:
    import stat

    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except PermissionError:
        return True  # there may be one: connecting says whether it may be used
    except OSError:
        return False


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


def parse_duration(text: str, *, forever: bool = True) -> float | None:
    """Seconds from `30`, `30s`, `10m`, `2h`, `1h30m`, `500ms`, `1d`; `forever` gives None (no limit), unless
    `forever` is false (a setting that needs a finite time): then it is refused like any other word."""
    raw = text.strip().lower()
    if forever and raw in ("forever", "inf", "infinite", "none"):
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
                    f"not a duration: {text!r} (use seconds or a number with ms, s, m, h or d, e.g. 30s, 10m, 1h30m"
                    + (", or 'forever')" if forever else ")")
                ) from None
            try:
                value += float(number) * _DURATION_UNITS[unit]
            except ValueError:
                raise UnitError(f"not a duration: {text!r}") from None
            rest = rest[len(unit):]
    if not math.isfinite(value) or value < 0:
        raise UnitError(f"a duration must be a finite number of seconds, zero or more, got {text!r}")
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


# -- framing for clients ----------------------------------------------------
# CPython's C accelerator of `json` is used directly: importing `json` imports `re` (and with it `enum`),
# ~5 ms, more than a whole `mcpctl allocate` adds to Python's start-up. The text is json.dumps's and the
# values json.loads's; anything the accelerator does not take (no `_json`, a BOM, UTF-16, bad JSON) goes
# to `json` itself, so the result and the error are json's own.

try:
    import _json
except ImportError:  # another Python
    _json = None  # type: ignore[assignment]


def _not_serializable(value: object) -> object:
    raise TypeError(f"Object of type {value.__class__.__name__} is not JSON serializable")


class _LoadsContext:
    """What the C scanner reads from its context: json.loads's defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}.__getitem__


_encode_chunks = (None if _json is None else
                  _json.make_encoder(None, _not_serializable, _json.encode_basestring_ascii, None, ":", ",", False,
                                     False, True))
_scan = None if _json is None else _json.make_scanner(_LoadsContext())  # type: ignore[arg-type]


def encode_line(message: Any) -> bytes:
    """`message` as one line of the framing: `json.dumps(message, separators=(",", ":"))`, then a newline."""
    if _encode_chunks is None:
        import json

        return json.dumps(message, separators=(",", ":")).encode() + b"\n"
    return "".join(_encode_chunks(message, 0)).encode() + b"\n"


def decode_line(line: bytes) -> Any:
    """One line of the framing as a value, as `json.loads(line)` gives it (and its JSONDecodeError)."""
    if _scan is not None:
        try:
            text = line.decode()
            start = len(text) - len(text.lstrip(" \t\n\r"))
            value, end = _scan(text, start)
            if not text[end:].strip(" \t\n\r"):
                return value
        except (ValueError, StopIteration):
            pass
    import json

    return json.loads(line)
