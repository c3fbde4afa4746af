"""Facts about holder processes, read from /proc.

A pid alone is not an identity: pids are reused. A holder is the pair
(pid, start time in clock ticks since boot), so a new process that happens to
get a dead holder's pid never keeps that holder's allocations alive.
"""

from __future__ import annotations


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
