"""A fast path for `mcpctl allocate`, `mcpctl release` and `mcpctl run -- CMD`, the commands scripts run in loops.

Importing Typer costs more than the whole allocation (see bench/). This parser
accepts exactly the options the Typer commands define (a test keeps the two in
step) and hands anything else (help, typos, unknown options) to Typer, which
stays the single source of help and usage errors.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

from mcpctl.actions import AllocateOptions, UsageError, closed_set_values, configure_retry, run_allocate, run_release
from mcpresd.protocol import resolve_socket

ALLOCATE_VALUES = {
    "--cpu": "cpu",
    "--mem": "mem",
    "--gpu": "gpu",
    "--priority": "priority",
    "--tool": "tool",
    "--exec": "exec_id",
    "--key": "key",
    "--holder-pid": "holder_pid",
    "--wait": "wait",
    "--ttl": "ttl",
    "--strategy": "strategy",
    "--max-cost": "max_cost",
    "--pool": "pool",
    "--members": "members",
    "--objective": "objective",
    "--enforce": "enforce",
}
ALLOCATE_LISTS = {"--disk": "disk", "--res": "res", "--where": "where"}
ALLOCATE_FLAGS = {"--json": "json", "--env": "env", "--no-block": "no_block", "--preemptible": "preemptible",
                  "--keep-processes": "keep_processes", "--cluster": "cluster", "--spill": "spill"}
OUTPUT_FLAGS = frozenset({"json", "env"})
RUN_VALUES = {**{name: key for name, key in ALLOCATE_VALUES.items() if name != "--holder-pid"},
              "--allocation": "allocation"}
RUN_LISTS = ALLOCATE_LISTS
RUN_FLAGS = {name: key for name, key in ALLOCATE_FLAGS.items() if name not in ("--json", "--env", "--no-block")}
RELEASE_FLAGS = {"--json": "json"}
RELEASE_VALUES = {"--measured": "measured"}
GLOBAL_VALUES = {"--socket": "socket", "--retry-for": "retry_for"}
CHOICES = {"priority": "Priority", "strategy": "Strategy", "objective": "Objective", "enforce": "EnforceMode"}
"""Options Typer takes only from one of the protocol's enums (whose values load only when one is given)."""


def try_fast(argv: Sequence[str]) -> int | None:
    """Run allocate or release without Typer if `argv` is plainly well-formed; else None."""
    args = list(argv)
    globals_: dict[str, str] = {}
    while args and args[0].split("=", 1)[0] in GLOBAL_VALUES:
        name = args[0].split("=", 1)[0]
        value, args = _take_value(args, name)
        if value is None:
            return None
        globals_[GLOBAL_VALUES[name]] = value
    if not args:
        return None
    command, rest = args[0], args[1:]
    runner = _COMMANDS.get(command)
    if runner is None:
        return None
    try:
        retry_for = configure_retry(globals_.get("retry_for"))
    except UsageError:
        return None  # Typer says what is wrong with it
    return runner(resolve_socket(globals_.get("socket")).path, retry_for, rest)


def _take_value(args: list[str], option: str) -> tuple[str | None, list[str]]:
    head = args[0]
    if head == option:
        if len(args) < 2 or args[1].startswith("-") and len(args[1]) > 1 and not _is_number(args[1]):
            return None, args
        return args[1], args[2:]
    if head.startswith(option + "="):
        return head[len(option) + 1 :], args[1:]
    return None, args


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _allocate(socket_path: str, retry_for: float, args: list[str]) -> int | None:
    values: dict[str, str] = {}
    lists: dict[str, list[str]] = {name: [] for name in ALLOCATE_LISTS.values()}
    flags: set[str] = set()
    while args:
        head = args[0]
        name = head.split("=", 1)[0]
        if name in ALLOCATE_VALUES or name in ALLOCATE_LISTS:
            value, args = _take_value(args, name)
            if value is None:
                return None
            if name in ALLOCATE_LISTS:
                lists[ALLOCATE_LISTS[name]].append(value)
            elif ALLOCATE_VALUES[name] in values:
                return None
            else:
                values[ALLOCATE_VALUES[name]] = value
        elif head in ALLOCATE_FLAGS:
            flags.add(ALLOCATE_FLAGS[head])
            args = args[1:]
        else:
            return None
    outputs = flags & OUTPUT_FLAGS
    if len(outputs) > 1:
        return None
    for option, closed_set in CHOICES.items():
        if option in values and values[option] not in closed_set_values(closed_set):
            return None  # Typer says which values it takes
    holder_text = values.pop("holder_pid", None)
    holder_pid = None
    if holder_text is not None:
        if not holder_text.isdigit() or int(holder_text) < 1:
            return None
        holder_pid = int(holder_text)
    options = AllocateOptions(
        **values,
        disk=lists["disk"],
        res=lists["res"],
        where=lists["where"],
        holder_pid=holder_pid,
        output=next(iter(outputs), "id"),
        no_block="no_block" in flags,
        preemptible="preemptible" in flags,
        keep_processes="keep_processes" in flags,
        cluster="cluster" in flags,
        spill="spill" in flags,
    )
    return run_allocate(socket_path, options, retry_for)


def _run(socket_path: str, retry_for: float, args: list[str]) -> int | None:
    """`mcpctl run [OPTIONS] -- CMD...`: only with the `--` (anything else goes to Typer)."""
    if "--" not in args:
        return None
    split = args.index("--")
    options_args, argv = args[:split], args[split + 1:]
    if not argv:
        return None
    values: dict[str, str] = {}
    lists: dict[str, list[str]] = {name: [] for name in RUN_LISTS.values()}
    flags: set[str] = set()
    while options_args:
        head = options_args[0]
        name = head.split("=", 1)[0]
        if name in RUN_VALUES or name in RUN_LISTS:
            value, options_args = _take_value(options_args, name)
            if value is None:
                return None
            if name in RUN_LISTS:
                lists[RUN_LISTS[name]].append(value)
            elif RUN_VALUES[name] in values:
                return None
            else:
                values[RUN_VALUES[name]] = value
        elif head in RUN_FLAGS:
            flags.add(RUN_FLAGS[head])
            options_args = options_args[1:]
        else:
            return None
    for option, closed_set in CHOICES.items():
        if option in values and values[option] not in closed_set_values(closed_set):
            return None  # Typer says which values it takes
    from mcpctl.launch import run_command, run_step

    allocation = values.pop("allocation", None)
    if allocation is not None:
        if values or any(lists.values()) or flags:
            return None  # Typer says which options --allocation does not take
        return run_step(socket_path, allocation, argv, retry_for)
    options = AllocateOptions(**values, disk=lists["disk"], res=lists["res"], where=lists["where"], holder_pid=None,
                              output="id", no_block=False,
                              preemptible="preemptible" in flags, keep_processes="keep_processes" in flags,
                              cluster="cluster" in flags, spill="spill" in flags)
    return run_command(socket_path, options, argv, retry_for)


def _release(socket_path: str, retry_for: float, args: list[str]) -> int | None:
    values: dict[str, str] = {}
    ids: list[str] = []
    flags: set[str] = set()
    while args:
        head = args[0]
        name = head.split("=", 1)[0]
        if name in RELEASE_VALUES:
            value, args = _take_value(args, name)
            if value is None or RELEASE_VALUES[name] in values:
                return None
            values[RELEASE_VALUES[name]] = value
        elif head in RELEASE_FLAGS:
            flags.add(RELEASE_FLAGS[head])
            args = args[1:]
        elif head.startswith("-"):
            return None
        else:
            ids.append(head)
            args = args[1:]
    if not ids:
        return None
    return run_release(socket_path, ids, "json" if "json" in flags else "text", retry_for, values.get("measured"))


def _gateway(socket: str, retry_for: float, rest: list[str]) -> int | None:
    """`mcpctl gateway` without Typer: agent hosts start it for every session (help still goes to Typer)."""
    options = rest[: rest.index("--")] if "--" in rest else rest
    if "--" not in rest or any(a in ("-h", "--help") for a in options):
        return None
    from mcpctl.gateway.cli import parse_and_run

    return parse_and_run(["--socket", socket, *rest])


_COMMANDS: dict[str, Callable[[str, float, list[str]], int | None]] = {
    "allocate": _allocate, "release": _release, "run": _run, "gateway": _gateway}
