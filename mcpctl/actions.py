"""What `allocate` and `release` send and print, shared by the Typer commands and the fast path.

Rules: standard library and `mcpresd.protocol` only (this runs on every
`mcpctl allocate` in a shell script). Output is for scripts: the id alone, JSON,
or `export` lines; errors go to stderr with an exit code from `mcpctl.exitcodes`.
Every allocate carries an idempotency key (generated when none is given), so
resending it after a lost connection never allocates twice; a release resent
after a lost connection that finds the allocation released counts as done.
Both ride through a daemon restart for `--retry-for` (exit 5 only after it).
On their common path (a grant, a release) nothing here touches the protocol's
enums or imports `json`: each costs more than the call to the daemon. They are
imported where a rarer path needs them.
"""

from __future__ import annotations

import math
import os
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

from mcpctl import exitcodes
from mcpctl.client import Client, DaemonUnreachable, RpcError, UntrustedDaemon, backoff_delays
from mcpctl.escape import printable
from mcpresd.protocol import (
    ALLOCATE,
    POOL_PREFIX,
    RELEASE,
    UnitError,
    parse_amount,
    parse_duration,
    parse_size,
    resolve_socket,
)

RETRY_FOR = "10s"
"""How long a command keeps trying to reach a daemon that is away (a restart), before exit 5 (--retry-for)."""
RETRY_FOR_ENV = "MCPRES_RETRY_FOR"
REPLY_GRACE_S = 30.0
"""How much longer than its own wait a waiting request gives the daemon to answer."""
ANNOUNCE_AFTER_S = 0.3
"""On a terminal, say that the request is queued once no answer came in this long."""
DEFAULT_PRIORITY = "normal"


class UsageError(ValueError):
    """A command-line value is malformed."""


def retry_seconds(text: str | None) -> float:
    """Seconds of `--retry-for` (default $MCPRES_RETRY_FOR, else 10s); `forever` is infinity, 0 disables."""
    if text is None:
        text = os.environ.get(RETRY_FOR_ENV) or RETRY_FOR
    try:
        seconds = parse_duration(text)
    except UnitError as error:
        raise UsageError(f"--retry-for: {error}") from None
    if seconds is None:
        return math.inf
    if not seconds >= 0 or seconds == math.inf:
        raise UsageError(f"--retry-for takes a duration of zero or more, e.g. 10s or 0; got {text!r}")
    return seconds


def configure_retry(text: str | None) -> float:
    """`retry_seconds`, and whether a socket missing from the start is waited for: only when a retry time
    was asked for (--retry-for or $MCPRES_RETRY_FOR); else no daemon is there and mcpctl exits 5 at once."""
    seconds = retry_seconds(text)
    Client.wait_if_absent = text is not None or bool(os.environ.get(RETRY_FOR_ENV))
    return seconds


class AllocateOptions:
    """The allocate command's options, as both the Typer command and the fast path read them.

    A plain class: a dataclass or NamedTuple would import `dataclasses` or `typing`
    (~5-10 ms), and this module is on every `mcpctl allocate`. Values stay the
    strings the user typed; `allocate_params` checks and converts them.
    """

    __slots__ = ("cpu", "mem", "gpu", "disk", "res", "priority", "tool", "exec_id", "key", "holder_pid", "output",
                 "wait", "no_block", "ttl", "strategy", "where", "max_cost", "preemptible", "pool", "members",
                 "objective", "enforce", "keep_processes", "cluster", "spill")

    def __init__(
        self,
        cpu: str | None = None,
        mem: str | None = None,
        gpu: str | None = None,
        disk: Sequence[str] = (),
        res: Sequence[str] = (),
        priority: str = DEFAULT_PRIORITY,
        tool: str | None = None,
        exec_id: str | None = None,
        key: str | None = None,
        holder_pid: int | None = None,
        output: str = "id",
        wait: str | None = None,
        no_block: bool = False,
        ttl: str | None = None,
        strategy: str | None = None,
        where: Sequence[str] = (),
        max_cost: str | None = None,
        preemptible: bool = False,
        pool: str | None = None,
        members: str | None = None,
        objective: str | None = None,
        enforce: str | None = None,
        keep_processes: bool = False,
        cluster: bool = False,
        spill: bool = False,
    ) -> None:
        self.cpu, self.mem, self.gpu = cpu, mem, gpu
        self.disk, self.res = tuple(disk), tuple(res)
        self.priority, self.tool, self.exec_id, self.key = priority, tool, exec_id, key
        self.holder_pid, self.output = holder_pid, output
        self.wait, self.no_block, self.ttl = wait, no_block, ttl
        self.strategy, self.where, self.max_cost, self.preemptible = strategy, tuple(where), max_cost, preemptible
        self.pool, self.members, self.objective = pool, members, objective
        self.enforce, self.keep_processes = enforce, keep_processes
        self.cluster, self.spill = cluster, spill

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AllocateOptions) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return "AllocateOptions(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__) + ")"


def allocate_params(options: AllocateOptions) -> dict[str, Any]:
    """Turn command-line options into `allocate` params, or raise UsageError."""
    demands: list[dict[str, Any]] = []
    try:
        if options.cpu is not None:
            demands.append({"resource": "cpu", **_range(options.cpu, "--cpu", _number)})
        if options.mem is not None:
            demands.append({"resource": "memory", **_range(options.mem, "--mem", _size)})
        if options.gpu is not None:
            demands.append({"resource": "gpu", **_range(options.gpu, "--gpu", _number)})
        for entry in options.disk:
            mount, size = _pair(entry, "--disk", "MOUNT=SIZE, e.g. /=10G")
            demands.append({"resource": f"disk:{mount}", **_range(size, "--disk", _size)})
        for entry in options.res:
            name, amount = _pair(entry, "--res", "NAME=AMOUNT, e.g. licence=1")
            demands.append({"resource": name, **_range(amount, "--res", _amount)})
    except UnitError as error:
        raise UsageError(str(error)) from None
    if options.pool is not None:
        demands.append(pool_demand(options.pool, options.members))
    elif options.members is not None:
        raise UsageError("--members goes with --pool: it says how many of the pool's members to take")
    if not demands:
        raise UsageError("ask for something: --cpu, --mem, --gpu, --disk, --res or --pool")
    if options.priority != DEFAULT_PRIORITY and options.priority not in closed_set_values("Priority"):
        from mcpresd.protocol import Priority

        raise UsageError(f"--priority must be one of {', '.join(p.value for p in Priority)}")
    params: dict[str, Any] = {
        "resources": demands,
        "priority": options.priority,
        "holder_pid": options.holder_pid if options.holder_pid is not None else default_holder(),
    }
    for field, value in (("tool_id", options.tool), ("execution_id", options.exec_id)):
        if value is not None:
            params[field] = value
    if options.key is not None:
        params["idempotency_key"] = options.key
    else:
        # A resend after a lost reply must not allocate twice. os.urandom, not uuid: importing uuid costs ~5 ms.
        params["idempotency_key"] = os.urandom(16).hex()
    if options.wait is not None:
        wait = _duration(options.wait, "--wait")
        params["wait"] = "forever" if wait is None else wait
    if options.no_block:
        if options.wait is None:
            raise UsageError("--no-block goes with --wait: it prints the id at once, even if the request is queued")
        if options.output == "env":
            raise UsageError("--env needs the granted devices; it cannot go with --no-block")
        params["detach"] = True
    if options.ttl is not None:
        ttl = _duration(options.ttl, "--ttl", forever=False)
        if ttl is None or ttl <= 0:
            raise UsageError(f"--ttl takes a duration greater than zero, e.g. 30s, 10m or 2h; got {options.ttl!r}")
        params["ttl"] = ttl
    if options.strategy is not None:
        if options.strategy not in closed_set_values("Strategy"):
            from mcpresd.protocol import Strategy

            raise UsageError(f"--strategy must be one of {', '.join(Strategy)}, got {options.strategy!r}")
        params["strategy"] = options.strategy
    if options.where:
        params["where"] = list(options.where)
    if options.max_cost is not None:
        try:
            cost = float(options.max_cost)
        except ValueError:
            cost = -1.0
        if not math.isfinite(cost) or cost < 0:
            raise UsageError(f"--max-cost takes a cost per hour of zero or more, got {options.max_cost!r}")
        params["max_cost"] = cost
    if options.preemptible:
        params["preemptible"] = True
    if options.objective is not None:
        if options.pool is None:
            raise UsageError("--objective goes with --pool: it says which of the named pools to prefer")
        if options.objective not in closed_set_values("Objective"):
            from mcpresd.protocol import Objective

            raise UsageError(f"--objective must be one of {', '.join(Objective)}, got {options.objective!r}")
        params["objective"] = options.objective
    if options.enforce is not None:
        if options.enforce not in closed_set_values("EnforceMode"):
            from mcpresd.protocol import EnforceMode

            raise UsageError(f"--enforce must be one of {', '.join(EnforceMode)}, got {options.enforce!r}")
        params["enforce"] = options.enforce
        if options.holder_pid is not None:
            # A named holder joins the allocation's cgroup; the default holder (the calling script) never does.
            params["confine_holder"] = True
    if options.keep_processes:
        params["keep_processes"] = True
    if options.cluster and options.spill:
        raise UsageError("choose one of --cluster (always the cluster) and --spill (the cluster when the host is full)")
    if options.cluster:
        params["site"] = "cluster"
    elif options.spill:
        params["site"] = "spill"
    return params


def closed_set_values(closed_set: str) -> set[str]:
    """The values of one of the protocol's enums (Priority, Strategy, ...), loaded only when an option names one."""
    import mcpresd.protocol

    values: set[str] = {member.value for member in getattr(mcpresd.protocol, closed_set)}
    return values


EXEC_WRAPPERS = frozenset({"timeout", "env", "nice", "ionice", "stdbuf", "nohup", "setsid", "taskset", "chrt", "time",
                           "flock"})
"""Commands that run another one and end with it: never the holder a script means (`timeout 30 mcpctl ...`)."""


def default_holder() -> int:
    """The process a bare `mcpctl allocate` is held by: the script that ran it.

    That is mcpctl's parent, except where the parent ends as soon as mcpctl does: a subshell
    (`id=$(mcpctl allocate ... || exit 1)`, `... | tr -d '\\n'`: a fork of the same program with
    the same command line as its own parent) or an exec wrapper (`timeout`, `flock`, ... by the
    executable's name). Those are skipped, walking up; never to init, and not at all where /proc
    is not this process's pid namespace's. A few /proc reads, no more.
    """
    parent = os.getppid()
    try:
        if os.readlink("/proc/self") != str(os.getpid()):
            return parent
    except OSError:
        return parent
    holder = parent
    for _ in range(16):
        above = _parent_of(holder)
        if above is None or above <= 1:
            break
        identity = _identity(holder)
        if identity is None:
            break
        if not _is_wrapper(identity) and _identity(above) != identity:
            break
        holder = above
    return holder


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
        return int(data[data.rfind(b")") + 2 :].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _identity(pid: int) -> tuple[str, bytes, bytes | None] | None:
    """A process's executable, command line and auxiliary vector; None if they cannot be read (gone, another user's).

    A fork keeps its parent's auxiliary vector byte for byte; a new exec of the same command gets
    new stack addresses in it (ASLR). So an interactive `bash` started from `bash` is not taken
    for a subshell; where it cannot be read, executable and command line decide.
    """
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            identity = os.readlink(f"/proc/{pid}/exe"), cmdline.read()
    except OSError:
        return None
    try:
        with open(f"/proc/{pid}/auxv", "rb") as auxv:
            return (*identity, auxv.read())
    except OSError:
        return (*identity, None)


def _is_wrapper(identity: tuple[str, bytes, bytes | None]) -> bool:
    """By the executable's name, or by argv[0] where one executable is many commands (busybox)."""
    return (os.path.basename(identity[0]) in EXEC_WRAPPERS
            or os.path.basename(identity[1].split(b"\0", 1)[0]).decode(errors="replace") in EXEC_WRAPPERS)


def pool_demand(names: str, members: str | None) -> dict[str, Any]:
    """`--pool a,b --members N`: N whole members of the named pools (names, globs or selectors)."""
    if not names.strip() or any(not part.strip() for part in names.split(",")):
        raise UsageError(f"--pool takes pool names, globs or selectors, comma-separated (e.g. build or "
                         f"'build-*,cost<1'); got {names!r}")
    count = 1
    if members is not None:
        if not members.strip().isdigit() or int(members) < 1:
            raise UsageError(f"--members takes a whole number of pool members, 1 or more; got {members!r}")
        count = int(members)
    return {"resource": POOL_PREFIX + names, "amount": count}


MEASURED_KEYS = {"cpu_seconds": "seconds", "memory_peak": "size", "gpu_utilisation": "fraction",
                 "gpu_memory_peak": "size"}
"""What a release may report the holder used, and how each value is written."""


def parse_measured(text: str) -> dict[str, float]:
    """`cpu_seconds=12.5,memory_peak=2G` (keys of MEASURED_KEYS) into release's `measured`; else UsageError."""
    shape = ("--measured takes KEY=VALUE pairs, comma-separated, e.g. cpu_seconds=12.5,memory_peak=2G "
             f"(keys: {', '.join(MEASURED_KEYS)})")
    measured: dict[str, float] = {}
    for entry in text.split(","):
        key, sep, value = entry.strip().partition("=")
        if not sep or not value.strip() or key not in MEASURED_KEYS:
            raise UsageError(f"{shape}; got {entry.strip()!r}")
        if key in measured:
            raise UsageError(f"--measured names {key} twice")
        kind = MEASURED_KEYS[key]
        try:
            number = float(value)
        except ValueError:
            if kind != "size":
                raise UsageError(f"--measured {key} takes a number, got {value!r}") from None
            try:
                number = float(parse_size(value))
            except UnitError as error:
                raise UsageError(f"--measured {key}: {error}") from None
        if not math.isfinite(number) or number < 0:
            raise UsageError(f"--measured {key} must be a finite number of zero or more, got {value!r}")
        if kind == "fraction" and number > 1:
            raise UsageError(f"--measured {key} is a fraction from 0 to 1, got {value!r}")
        measured[key] = int(number) if kind == "size" else number
    return measured


def _range(text: str, option: str, parse: Callable[[str, str], float]) -> dict[str, float]:
    """`AMOUNT` or `MIN..MAX`: the daemon grants as much as fits between the two."""
    low, sep, high = text.partition("..")
    if not sep:
        return {"amount": parse(text, option)}
    if not low or not high:
        raise UsageError(f"{option} takes an amount or a range MIN..MAX (e.g. 2..8), got {text!r}")
    least, most = parse(low, option), parse(high, option)
    if most < least:
        raise UsageError(f"{option}: the range {text!r} ends below its start")
    return {"amount": least, "max": most}


def _number(text: str, option: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{option} takes a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise UsageError(f"{option} must be a positive finite number, got {text!r}")
    return value


def _size(text: str, option: str) -> float:
    return float(parse_size(text))


def _amount(text: str, option: str) -> float:
    return parse_amount(text)


def _duration(text: str, option: str, *, forever: bool = True) -> float | None:
    try:
        return parse_duration(text, forever=forever)
    except UnitError as error:
        raise UsageError(f"{option}: {error}") from None


def _pair(entry: str, option: str, shape: str) -> tuple[str, str]:
    name, sep, value = entry.rpartition("=")
    if not sep or not name or not value:
        raise UsageError(f"{option} takes {shape}; got {entry!r}")
    return name, value


def format_duration(seconds: float | None) -> str:
    """600 -> '10m', 90 -> '1m30s', 0.5 -> '0.5s', None -> 'forever'."""
    if seconds is None:
        return "forever"
    if seconds < 60:
        return f"{seconds:.1f}".rstrip("0").rstrip(".") + "s"
    parts = []
    whole = int(round(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if whole >= size:
            parts.append(f"{whole // size}{unit}")
            whole %= size
    return "".join(parts)


def gpu_uuids(allocation: dict[str, Any]) -> list[str]:
    """The granted GPUs by UUID (by name if one has none), each once, in grant order."""
    seen: dict[str, None] = {}
    for item in allocation["items"]:
        if item["type"] == "gpu":
            seen[item["uuid"] or item["resource"]] = None
    return list(seen)


def run_environment(allocation: dict[str, Any]) -> dict[str, str]:
    """What a command run inside an allocation finds in its environment. A cluster allocation's GPUs are on its
    node, where Slurm sets CUDA_VISIBLE_DEVICES for each step: here it names the job instead."""
    cluster = allocation.get("cluster")
    if isinstance(cluster, dict):
        return {"MCPRES_ALLOCATION_ID": allocation["id"], "SLURM_JOB_ID": str(cluster.get("job_id") or "")}
    return {
        "MCPRES_ALLOCATION_ID": allocation["id"],
        "CUDA_VISIBLE_DEVICES": ",".join(gpu_uuids(allocation)),
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
    }


def env_lines(allocation: dict[str, Any]) -> list[str]:
    """`export` lines for eval: the allocation id and the granted GPUs by UUID."""
    import shlex

    return [f"export {name}={shlex.quote(value)}" for name, value in run_environment(allocation).items()]


def fail(message: str, code: int) -> int:
    """`message` on stderr, its lines `printable` (names in it come from the daemon), and `code` to exit with."""
    print("mcpctl: " + "\n".join(map(printable, message.split("\n"))), file=sys.stderr)
    return code


def rpc_failure(error: RpcError) -> int:
    from mcpresd.protocol import ErrorCode

    hint = ""
    if error.code == ErrorCode.INSUFFICIENT_CAPACITY:
        hint = " (try later, ask for less, wait with --wait, or see `mcpctl allocations`)"
        if "pool " in error.message:
            hint = " (try later, ask for less, wait with --wait, or see `mcpctl allocations` and `mcpctl pools`)"
    elif error.code == ErrorCode.UNKNOWN_RESOURCE:
        hint = " (see `mcpctl resources`)"
    elif error.code in (ErrorCode.UNKNOWN_POOL, ErrorCode.POOL_DRAINING):
        hint = " (see `mcpctl pools`)"
    elif error.code == ErrorCode.BUDGET_EXCEEDED:
        hint = " (see `mcpctl budgets`)"
    elif error.code == 1012 and isinstance(error.data, dict) and error.data.get("id") and not error.data.get("reason"):
        hint = f" (see `mcpctl explain {error.data['id']}`)"
    named = hint.partition("`")[2].partition("`")[0]
    if hint.strip() in error.message or (named and f"`{named}`" in error.message):
        hint = ""  # the daemon's message points there already
    message = error.message
    field = error.data.get("field") if isinstance(error.data, dict) else None
    option = OPTION_OF_FIELD.get(field) if isinstance(field, str) else None
    if option is not None and isinstance(field, str) and message.startswith(field + " "):
        message = f"{option} ({field}){message[len(field):]}"  # the option the user typed, then the API's name
    return fail(printable(message) + hint, exitcodes.for_error(error.code))


OPTION_OF_FIELD = {"tool_id": "--tool", "execution_id": "--exec", "idempotency_key": "--key"}
"""The mcpctl options whose daemon field has another name, for the daemon's errors about them."""


def with_iso_times(data: Any) -> Any:
    """`data` with `NAME_iso` (ISO 8601, local time with its offset) beside every epoch time `NAME`: the keys
    ending in `_at` or `_until`, and `ts`. The epoch fields stay as they are."""
    import datetime

    if isinstance(data, list):
        return [with_iso_times(item) for item in data]
    if not isinstance(data, dict):
        return data
    out: dict[str, Any] = {}
    for key, value in data.items():
        out[key] = with_iso_times(value)
        if ((key.endswith(("_at", "_until")) or key == "ts") and isinstance(value, int | float)
                and not isinstance(value, bool) and f"{key}_iso" not in data):
            out[f"{key}_iso"] = datetime.datetime.fromtimestamp(value).astimezone().isoformat(timespec="milliseconds")
        elif (key.endswith(("_at", "_until")) or key == "ts") and value is None and f"{key}_iso" not in data:
            out[f"{key}_iso"] = None
    return out


def quiet_stdout() -> None:
    """Whoever read stdout is gone; point it at /dev/null so the interpreter's last flush stays quiet."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
    finally:
        os.close(devnull)


def emit(text: str) -> str | None:
    """Write `text` and a newline on stdout and flush it; None if done, else why not: stdout closed (`>&-`),
    its reader gone (`| head`, EPIPE) or a write error (`>/dev/full`)."""
    out = sys.stdout
    if out is None:
        return "stdout is closed"
    try:
        out.write(text + "\n")
        out.flush()
    except OSError as error:
        quiet_stdout()
        return "its reader is gone" if isinstance(error, BrokenPipeError) else error.strerror or str(error)
    return None


def warn_risks(allocation: dict[str, Any]) -> None:
    """On a terminal, the daemon's risk notes on a grant (a GPU busy outside mcpres, throttling) as warnings."""
    if sys.stderr.isatty():
        for note in allocation.get("risks") or ():
            print(f"mcpctl: warning: {printable(note)}", file=sys.stderr)


def unreachable(error: DaemonUnreachable) -> int:
    if isinstance(error, UntrustedDaemon):
        return fail(str(error), exitcodes.UNTRUSTED)
    return fail(f"{error} (start it with `mcpresd`){searched(error.path)}", exitcodes.UNREACHABLE)


def searched(path: str) -> str:
    """Where mcpctl looked for the daemon, if `path` was found by looking (not --socket or $MCPRES_SOCKET)."""
    choice = resolve_socket()
    if choice.source not in ("user", "system") or path not in choice.tried:
        return ""
    return (f"\n  looked for: {' and '.join(choice.tried)} ({choice.why}; $MCPRES_SOCKET unset)"
            "\n  to start one: `mcpresd &`, or as a service: `mcpresd install --user` (or --system, as root)")


def request_allocation(socket_path: str, params: dict[str, Any], retry_for: float = 0.0) -> dict[str, Any]:
    """Send `allocate`; resend it (same idempotency key) while the daemon restarts, for `retry_for` seconds
    after the connection was refused or lost; a request that waits is resent for as long as it may wait.

    Raises RpcError, DaemonUnreachable or KeyboardInterrupt.
    """
    if "idempotency_key" not in params:
        params["idempotency_key"] = os.urandom(16).hex()
    wait = params.get("wait", 0)
    if wait == 0 or params.get("detach"):
        with Client(socket_path, retry_for=retry_for) as client:
            result: dict[str, Any] = client.call(ALLOCATE, params)
            return result
    limit = None if wait == "forever" else float(wait)
    deadline = None if limit is None else time.monotonic() + limit
    announce = sys.stderr.isatty()
    failed_at: float | None = None
    delays = backoff_delays()
    while True:
        try:
            with Client(socket_path, timeout=None if limit is None else limit + REPLY_GRACE_S) as client:
                client.send(ALLOCATE, params)
                failed_at = None
                delays = backoff_delays()
                if announce and not client.ready(ANNOUNCE_AFTER_S):
                    _announce_queued(socket_path, params["idempotency_key"], limit, client)
                announce = False
                result = client.reply()
                return result
        except DaemonUnreachable as error:
            now = time.monotonic()
            if not error.transient or (error.absent and failed_at is None and not Client.wait_if_absent):
                raise
            if failed_at is None:
                failed_at = now
                if retry_for > 0:
                    Client(socket_path, retry_for=retry_for).say_waiting(error)
            if now - failed_at >= retry_for or (deadline is not None and now >= deadline):
                raise
            if deadline is not None:
                params["wait"] = max(0.001, deadline - now)
            time.sleep(min(next(delays), failed_at + retry_for - now))


def _announce_queued(socket_path: str, key: str, limit: float | None, waiting: Client) -> None:
    """Tell the person at the terminal the request is queued, with its id (found by its key on a second connection)."""
    from mcpresd.protocol import Method

    found = None
    try:
        with Client(socket_path, timeout=5.0) as client:
            for _ in range(5):
                queued = client.call(Method.ALLOCATIONS_LIST, {"state": "queued"})
                found = next((a["id"] for a in queued if a.get("idempotency_key") == key
                              and a.get("owner_uid") == os.getuid()), None)
                if found is not None or waiting.ready(0.1):
                    break
    except (DaemonUnreachable, RpcError):
        pass
    if found is None and waiting.ready(0):
        return
    how_long = "with no time limit" if limit is None else f"up to {format_duration(limit)}"
    name = f" as {printable(found)}" if found else ""
    print(f"mcpctl: queued{name}, waiting ({how_long})...", file=sys.stderr, flush=True)


def run_allocate(socket_path: str, options: AllocateOptions, retry_for: float = 0.0) -> int:
    try:
        params = allocate_params(options)
    except UsageError as error:
        return fail(str(error), exitcodes.USAGE)
    try:
        allocation = request_allocation(socket_path, params, retry_for)
    except DaemonUnreachable as error:
        return unreachable(error)
    except RpcError as error:
        return rpc_failure(error)
    except KeyboardInterrupt:
        return exitcodes.INTERRUPTED
    state = allocation["state"]
    if state == "queued" and not options.no_block:
        return fail(f"allocation {allocation['id']} is still queued; wait for it with "
                    f"`mcpctl wait {allocation['id']}`", exitcodes.UNAVAILABLE)
    if state not in ("active", "queued"):
        return fail(f"the allocation for key {options.key!r} ({allocation['id']}) was already {state}; "
                    "use a new --key", exitcodes.ERROR)
    warn_risks(allocation)
    if "scope" in allocation and options.holder_pid is not None:
        print(f"mcpctl: note: pid {options.holder_pid} was not moved into a cgroup: this daemon limits only "
              f"commands started by `mcpctl run` (each in a transient systemd scope); allocation "
              f"{allocation['id']} is a reservation (advisory). Run its work with "
              f"`mcpctl run --allocation {allocation['id']} -- CMD`.", file=sys.stderr)
    if options.output == "json":
        import json

        text = json.dumps(with_iso_times(allocation), indent=2)
    elif options.output == "env":
        text = "\n".join(env_lines(allocation))
    else:
        text = allocation["id"]
    why = emit(text)
    if why is not None:
        return _unseen(socket_path, allocation["id"], why)
    return exitcodes.OK


def _unseen(socket_path: str, allocation_id: str, why: str) -> int:
    """The id could not be written: no script will ever release it, so release it now."""
    try:
        with Client(socket_path, timeout=30.0) as client:
            client.call(RELEASE, {"id": allocation_id})
    except (DaemonUnreachable, RpcError) as error:
        return fail(f"could not write allocation {allocation_id} to stdout ({why}), nor release it: {error}; "
                    f"release it with `mcpctl release {allocation_id}`", exitcodes.ERROR)
    return fail(f"could not write allocation {allocation_id} to stdout ({why}); released it", exitcodes.ERROR)


def run_release(socket_path: str, ids: Sequence[str], output: str = "text", retry_for: float = 0.0,
                measured: str | None = None) -> int:
    """Release `ids`; `measured` (the --measured text) reports what the holder used, for accounting."""
    if not ids:
        return fail("give the id(s) of the allocation(s) to release", exitcodes.USAGE)
    params: dict[str, Any] = {}
    if measured is not None:
        try:
            params["measured"] = parse_measured(measured)
        except UsageError as error:
            return fail(str(error), exitcodes.USAGE)
    worst = exitcodes.OK
    released = []
    try:
        with Client(socket_path, retry_for=retry_for) as client:
            for allocation_id in ids:
                try:
                    released.append(client.call(RELEASE, {"id": allocation_id, **params}))
                except RpcError as error:
                    from mcpresd.protocol import ErrorCode, Method

                    if error.code == ErrorCode.ALREADY_RELEASED and client.resent:
                        # The first try went through; its reply was lost to a daemon restart.
                        released.append(client.call(Method.ALLOCATIONS_GET, {"id": allocation_id}))
                        continue
                    worst = max(worst, rpc_failure(error))
    except DaemonUnreachable as error:
        return unreachable(error)
    if output == "json":
        import json

        emit(json.dumps(with_iso_times(released), indent=2))
    return worst
