"""Facts about holder processes, read from /proc.

A pid alone is not an identity: pids are reused. A holder is the pair
(pid, start time in clock ticks since boot), so a new process that happens to
get a dead holder's pid never keeps that holder's allocations alive.

A caller names its holder, so the name is checked (`resolve_holder`): it must
be a process (a thread group's leader), the caller's own unless the caller
administers, and a pid from the caller's pid namespace is translated to the
daemon's; a pid the caller could not mean is refused, never recorded.

Translating looks at the caller's ancestors and children first (where `mcpctl`'s holders are); a walk of
every process in /proc, which runs on the daemon's event loop, is done for one uid at most once every
NAMESPACE_SEARCH_INTERVAL_S, so a caller naming pids that do not exist cannot stall the daemon.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterator

from mcpresd.core.errors import InvalidHolder

NAMESPACE_SEARCH_INTERVAL_S = 0.5
"""The least time between two walks of /proc on behalf of one uid (each costs a stat per process on the host)."""
_searched_at: dict[int, float] = {}


def process_start_time(pid: int) -> int | None:
    """The process's start time (field 22 of /proc/PID/stat), or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    except OSError:
        return None
    return parse_start_time(data)


def parse_start_time(stat: bytes) -> int | None:
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    close = stat.rfind(b")")
    if close < 0:
        return None
    fields = stat[close + 2 :].split()
    if len(fields) < 20 or fields[0] == b"Z":
        return None
    try:
        return int(fields[19])
    except ValueError:
        return None


def is_alive(pid: int, start_time: int | None) -> bool:
    """True while the holder process (with that start time, when known) is running."""
    current = process_start_time(pid)
    if current is None:
        return False
    return start_time is None or current == start_time


def parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except OSError:
        return None
    close = data.rfind(b")")
    fields = data[close + 2 :].split()
    try:
        return int(fields[1])
    except (IndexError, ValueError):
        return None


def lineage(pid: int, limit: int = 64) -> tuple[int, ...]:
    """`pid` and its ancestors up to init, nearest first (bounded: pid loops cannot happen, but a limit is cheap)."""
    chain = [pid]
    while len(chain) < limit:
        parent = parent_pid(chain[-1])
        if parent is None or parent <= 1 or parent in chain:
            break
        chain.append(parent)
    return tuple(chain)


class Status:
    """What /proc/PID/status says about who a process is: its thread group, its uids and its pid in each namespace."""

    __slots__ = ("pid", "tgid", "uids", "nspid")

    def __init__(self, pid: int, tgid: int, uids: tuple[int, ...], nspid: tuple[int, ...]) -> None:
        self.pid, self.tgid, self.uids, self.nspid = pid, tgid, uids, nspid


def parse_status(data: bytes) -> Status | None:
    """The Pid, Tgid, Uid and NSpid lines of a /proc/PID/status file (NSpid: outermost namespace first)."""
    try:
        pid, tgid = _numbers(data, b"Pid"), _numbers(data, b"Tgid")
        uids, nspid = _numbers(data, b"Uid"), _numbers(data, b"NSpid")
    except ValueError:
        return None
    if not pid or not tgid:
        return None
    return Status(pid[0], tgid[0], uids, nspid or pid)


def _numbers(data: bytes, name: bytes) -> tuple[int, ...]:
    # Looked up, not split into lines: status has ~60 lines and this runs on every allocate with a holder.
    start = data.find(b"\n" + name + b":")
    if start < 0:
        return ()
    start += len(name) + 2
    end = data.find(b"\n", start)
    return tuple(int(part) for part in data[start : end if end >= 0 else len(data)].split())


def process_status(pid: int) -> Status | None:
    """The process's (or thread's) status, or None if it does not exist or cannot be read."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            return parse_status(status.read())
    except OSError:
        return None


def pid_namespace(pid: int | str) -> tuple[int, int] | None:
    """The identity (device, inode) of the process's pid namespace, or None if it is gone or not ours to read."""
    try:
        info = os.stat(f"/proc/{pid}/ns/pid")
    except OSError:
        return None
    return info.st_dev, info.st_ino


def resolve_holder(named: int, peer: int | None, uid: int, administers: bool) -> tuple[int, int]:
    """The pid (in the daemon's namespace) and start time of the process a caller names as `holder_pid`.

    `peer` is the caller's pid from SO_PEERCRED, already in the daemon's namespace. A caller in a
    nested pid namespace (a container, `unshare --pid`) names pids of its own namespace: those are
    looked up among the processes of that namespace, never taken as the daemon's. Refused
    (InvalidHolder): a pid that names no process the caller can mean, a thread that is not its
    process's leader, and, unless the caller administers, a process of another user.
    """
    if peer is None:
        raise InvalidHolder(f"holder_pid {named} cannot be resolved: the connecting process is outside the "
                            "daemon's pid namespace; leave holder_pid out so the connection holds the allocation",
                            holder_pid=named, reason="other_namespace")
    pid = named
    if pid_namespace(peer) != _own_namespace():  # a stat first: the status file costs more, and most callers are ours
        caller = process_status(peer)
        if caller is None:
            raise InvalidHolder(f"holder_pid {named} cannot be resolved: the connecting process {peer} has exited",
                                holder_pid=named, reason="caller_gone")
        namespace = pid_namespace(peer)
        if len(caller.nspid) > _own_depth() and namespace is None:
            raise InvalidHolder(f"holder_pid {named} cannot be resolved: the daemon may not read the pid namespace "
                                "of the connecting process; leave holder_pid out so the connection holds the "
                                "allocation", holder_pid=named, reason="other_namespace")
        if len(caller.nspid) > _own_depth() and namespace is not None:
            pid = _in_namespace_of(peer, namespace, len(caller.nspid), named, uid)
    status = process_status(pid)
    start = process_start_time(pid)
    if status is None or start is None:
        raise InvalidHolder(f"holder process {named} does not exist", holder_pid=named, reason="not_found")
    if status.tgid != status.pid:
        raise InvalidHolder(f"holder_pid {named} is a thread, not a process: name its process "
                            f"({status.tgid})", holder_pid=named, reason="thread")
    if not administers and uid not in status.uids[:2]:
        raise InvalidHolder(f"holder process {named} is not yours: name a process running as uid {uid}",
                            holder_pid=named, reason="not_yours")
    return pid, start


@functools.cache
def _own_depth() -> int:
    """How many pid namespaces deep the daemon runs (1 on the host)."""
    status = process_status(os.getpid())
    return len(status.nspid) if status is not None else 1


@functools.cache
def _own_namespace() -> tuple[int, int] | None:
    return pid_namespace(os.getpid())


def _in_namespace_of(peer: int, namespace: tuple[int, int], depth: int, named: int, uid: int) -> int:
    """The daemon's pid of the process that `peer`'s pid namespace (`depth` deep) calls `named`.

    Looks first where holders are (the caller's ancestors and children), then, at most once per
    NAMESPACE_SEARCH_INTERVAL_S for `uid`, at every process; only processes in the caller's own namespace
    match (NSpid's last entry is the pid it sees). Refused (InvalidHolder, `not_found`) if none does.
    """
    def named_there(pid: int) -> bool:
        status = process_status(pid)
        return (status is not None and status.tgid == status.pid and len(status.nspid) == depth
                and status.nspid[-1] == named and pid_namespace(pid) == namespace)

    for pid in _near(peer):
        if named_there(pid):
            return pid
    now = time.monotonic()
    if now - _searched_at.get(uid, -NAMESPACE_SEARCH_INTERVAL_S) < NAMESPACE_SEARCH_INTERVAL_S:
        raise InvalidHolder(f"holder process {named} is neither an ancestor nor a child of the caller, and its pid "
                            f"namespace was searched for uid {uid} less than {NAMESPACE_SEARCH_INTERVAL_S:g} s ago; "
                            "retry in a moment", holder_pid=named, reason="not_found")
    _searched_at[uid] = now
    for entry in os.listdir("/proc"):
        if entry.isdigit() and pid_namespace(entry) == namespace and named_there(int(entry)):
            return int(entry)
    raise InvalidHolder(f"holder process {named} does not exist in the caller's pid namespace",
                        holder_pid=named, reason="not_found")


def _near(peer: int) -> Iterator[int]:
    yield from lineage(peer)
    try:
        with open(f"/proc/{peer}/task/{peer}/children", "rb") as children:
            yield from (int(child) for child in children.read().split())
    except (OSError, ValueError):
        pass
