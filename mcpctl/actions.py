"""What `allocate` and `release` send and print, shared by the Typer commands and the fast path.

Rules: standard library and `mcpresd.protocol` only (this runs on every
`mcpctl allocate` in a shell script). Output is for scripts: the id alone, JSON,
or `export` lines; errors go to stderr with an exit code from `mcpctl.exitcodes`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

from mcpctl import exitcodes
from mcpctl.client import Client, DaemonUnreachable, RpcError
from mcpresd.protocol import Method, Priority, UnitError, parse_amount, parse_size


class UsageError(ValueError):
    """A command-line value is malformed."""


class AllocateOptions:
    """The allocate command's options, as both the Typer command and the fast path read them.

    A plain class: a dataclass or NamedTuple would import `dataclasses` or `typing`
    (~5-10 ms), and this module is on every `mcpctl allocate`.
    """

    __slots__ = ("cpu", "mem", "gpu", "disk", "res", "priority", "tool", "exec_id", "key", "holder_pid", "output")

    def __init__(
        self,
        cpu: str | None = None,
        mem: str | None = None,
        gpu: str | None = None,
        disk: Sequence[str] = (),
        res: Sequence[str] = (),
        priority: str = "normal",
        tool: str | None = None,
        exec_id: str | None = None,
        key: str | None = None,
        holder_pid: int | None = None,
        output: str = "id",
    ) -> None:
        self.cpu, self.mem, self.gpu = cpu, mem, gpu
        self.disk, self.res = tuple(disk), tuple(res)
        self.priority, self.tool, self.exec_id, self.key = priority, tool, exec_id, key
        self.holder_pid, self.output = holder_pid, output

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
            demands.append({"resource": "cpu", "amount": _number(options.cpu, "--cpu")})
        if options.mem is not None:
            demands.append({"resource": "memory", "amount": parse_size(options.mem)})
        if options.gpu is not None:
            demands.append({"resource": "gpu", "amount": _number(options.gpu, "--gpu")})
        for entry in options.disk:
            mount, size = _pair(entry, "--disk", "MOUNT=SIZE, e.g. /=10G")
            demands.append({"resource": f"disk:{mount}", "amount": parse_size(size)})
        for entry in options.res:
            name, amount = _pair(entry, "--res", "NAME=AMOUNT, e.g. licence=1")
            demands.append({"resource": name, "amount": parse_amount(amount)})
    except UnitError as error:
        raise UsageError(str(error)) from None
    if not demands:
        raise UsageError("ask for something: --cpu, --mem, --gpu, --disk or --res")
    if options.priority not in {p.value for p in Priority}:
        raise UsageError(f"--priority must be one of {', '.join(p.value for p in Priority)}")
    params: dict[str, Any] = {
        "resources": demands,
        "priority": options.priority,
        "holder_pid": options.holder_pid if options.holder_pid is not None else os.getppid(),
    }
    for field, value in (("tool_id", options.tool), ("execution_id", options.exec_id),
                         ("idempotency_key", options.key)):
        if value is not None:
            params[field] = value
    return params


def _number(text: str, option: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{option} takes a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise UsageError(f"{option} must be a positive finite number, got {text!r}")
    return value


def _pair(entry: str, option: str, shape: str) -> tuple[str, str]:
    name, sep, value = entry.rpartition("=")
    if not sep or not name or not value:
        raise UsageError(f"{option} takes {shape}; got {entry!r}")
    return name, value


def env_lines(allocation: dict[str, Any]) -> list[str]:
    """`export` lines for eval: the allocation id and the granted GPUs by UUID."""
    import shlex

    uuids = [item["uuid"] or item["resource"] for item in allocation["items"] if item["type"] == "gpu"]
    return [
        f"export MCPRES_ALLOCATION_ID={shlex.quote(allocation['id'])}",
        f"export CUDA_VISIBLE_DEVICES={shlex.quote(','.join(uuids))}",
        "export CUDA_DEVICE_ORDER=PCI_BUS_ID",
    ]


def fail(message: str, code: int) -> int:
    print(f"mcpctl: {message}", file=sys.stderr)
    return code


def rpc_failure(error: RpcError) -> int:
    hint = ""
    if error.code == 1002:
        hint = " (try later, ask for less, or see `mcpctl allocations`)"
    elif error.code == 1001:
        hint = " (see `mcpctl resources`)"
    if hint.strip() in error.message:
        hint = ""
    return fail(error.message + hint, exitcodes.for_error(error.code))


def run_allocate(socket_path: str, options: AllocateOptions) -> int:
    try:
        params = allocate_params(options)
    except UsageError as error:
        return fail(str(error), exitcodes.USAGE)
    try:
        with Client(socket_path) as client:
            allocation = client.call(Method.ALLOCATE, params)
    except DaemonUnreachable as error:
        return fail(f"{error} (start it with `mcpresd`)", exitcodes.UNREACHABLE)
    except RpcError as error:
        return rpc_failure(error)
    if allocation["state"] != "active":
        return fail(f"the allocation for key {options.key!r} ({allocation['id']}) was already released; "
                    "use a new --key", exitcodes.ERROR)
    if options.output == "json":
        print(json.dumps(allocation, indent=2))
    elif options.output == "env":
        print("\n".join(env_lines(allocation)))
    else:
        print(allocation["id"])
    return exitcodes.OK


def run_release(socket_path: str, ids: Sequence[str], output: str = "text") -> int:
    if not ids:
        return fail("give the id(s) of the allocation(s) to release", exitcodes.USAGE)
    worst = exitcodes.OK
    released = []
    try:
        with Client(socket_path) as client:
            for allocation_id in ids:
                try:
                    released.append(client.call(Method.RELEASE, {"id": allocation_id}))
                except RpcError as error:
                    worst = max(worst, rpc_failure(error))
    except DaemonUnreachable as error:
        return fail(f"{error} (start it with `mcpresd`)", exitcodes.UNREACHABLE)
    if output == "json":
        print(json.dumps(released, indent=2))
    return worst
