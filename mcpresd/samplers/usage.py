"""What holders use: CPU time and resident memory of each holder's process tree, GPU memory of its processes.

Rules:
- Read off the event loop, once per sampling round, only for allocations held by a process.
- One pass over /proc per round, whatever the number of allocations: each process's stat is read once (parent,
  CPU time, start time), the children map is built once, and every held tree is summed from it; the resident set
  comes from statm (stat's rss field is the kernel's approximate per-CPU count), read once for each process in a
  held tree. Allocations that share a holder share its figures. An allocation with a cgroup is read from its
  cgroup instead.
- A holder's tree is the holder and its descendants that started no earlier than the holder (a reused pid's
  strays are not its children), as psutil's `Process.children(recursive=True)` counts them.
- CPU seconds are the tree's total as read now, with the holder's exited children (the broker subtracts what it
  had used before the grant); memory is the tree's resident set now (the broker keeps the peak).
- A process that vanished or cannot be read is skipped, never an error.
- A tree whose figures did not change since the round before gives back the same dict (`kept`): the broker skips
  by identity what it has already folded, so an idle holder's allocations cost a lookup each.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from mcpresd.files import read_small as _read

GpuProcesses = dict[str, list[tuple[int | None, int | None, tuple[int, ...]]]]

PROC = "/proc"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True, slots=True)
class ProcessStat:
    """What one read of /proc/PID/stat gives: CPU and exited children's CPU in clock ticks."""

    ppid: int
    cpu_ticks: int
    children_ticks: int
    start_ticks: int


def parse_stat(data: bytes) -> ProcessStat | None:
    """/proc/PID/stat's fields after the command name (which may hold spaces and parentheses); None if malformed."""
    fields = data[data.rfind(b")") + 2:].split()
    try:
        return ProcessStat(ppid=int(fields[1]), cpu_ticks=int(fields[11]) + int(fields[12]),
                           children_ticks=int(fields[13]) + int(fields[14]), start_ticks=int(fields[19]))
    except (IndexError, ValueError):
        return None


def read_stat(pid: int, proc: str = PROC) -> ProcessStat | None:
    try:
        return parse_stat(_read(f"{proc}/{pid}/stat"))
    except OSError:
        return None


def read_processes(proc: str = PROC) -> dict[int, ProcessStat]:
    """Every process's stat, each read once."""
    processes: dict[int, ProcessStat] = {}
    try:
        names = os.listdir(proc)
    except OSError:
        return processes
    for name in names:
        if name.isdigit():
            stat = read_stat(int(name), proc)
            if stat is not None:
                processes[int(name)] = stat
    return processes


def resident_pages(pid: int, proc: str = PROC) -> int:
    """The resident set from /proc/PID/statm, as psutil's memory_info().rss reads it; 0 if gone."""
    try:
        return int(_read(f"{proc}/{pid}/statm").split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def children_map(processes: dict[int, ProcessStat]) -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for pid, stat in processes.items():
        children.setdefault(stat.ppid, []).append(pid)
    return children


def tree_figures(pid: int, processes: dict[int, ProcessStat], children: dict[int, list[int]],
                 resident: Callable[[int], int]) -> tuple[float, int] | None:
    """(CPU seconds, resident bytes) of `pid`'s tree; None if `pid` is gone."""
    root = processes.get(pid)
    if root is None:
        return None
    ticks, pages = root.cpu_ticks + root.children_ticks, resident(pid)
    seen, stack = {pid}, [pid]
    while stack:
        for child in children.get(stack.pop(), ()):
            stat = processes[child]
            if child in seen or stat.start_ticks < root.start_ticks:
                continue
            seen.add(child)
            stack.append(child)
            ticks += stat.cpu_ticks
            pages += resident(child)
    return ticks / CLOCK_TICKS, pages * PAGE_SIZE


def holder_usage(holders: dict[str, int], gpu_processes: GpuProcesses,
                 cgroups: Callable[[str], dict[str, float] | None] | None = None,
                 proc: str = PROC, kept: dict[int, dict[str, float]] | None = None) -> dict[str, dict[str, float]]:
    """{allocation id: {"cpu_seconds", "memory_peak"[, "gpu_memory_peak"]}} for each holder pid given.

    Where `cgroups` has figures for an allocation (its cgroup: everything its processes ever started, double-forked
    children included), those replace the walk: cpu_seconds, memory_peak, memory_current and oom_kills.

    `kept` ({holder pid: its tree's figures}, updated in place) carries the figures from one round to the next: a
    tree whose figures did not change gives back the same dict as the round before, so the broker skips what it
    has already folded (an idle script's 10,000 allocations) by identity. The figures are never changed.
    """
    usage: dict[str, dict[str, float]] = {}
    walked = holders
    if cgroups is not None:
        walked = {}
        for allocation_id, pid in holders.items():
            measured = cgroups(allocation_id)
            if measured is not None:
                usage[allocation_id] = measured
            else:
                walked[allocation_id] = pid
    if not walked:
        return usage
    processes = read_processes(proc)
    held = set(walked.values())  # 10,000 allocations of scripts: a hundred holders
    for pid in held - processes.keys():
        stat = read_stat(pid, proc)  # a thread id, or a process that started since the listing
        if stat is not None:
            processes[pid] = stat
    children = children_map(processes)
    pages: dict[int, int] = {}

    def resident(pid: int) -> int:
        if pid not in pages:
            pages[pid] = resident_pages(pid, proc)
        return pages[pid]

    gpu_used = [(gpu_pid, used or 0, lineage) for listed in gpu_processes.values()
                for gpu_pid, used, lineage in listed if used]
    by_pid: dict[int, dict[str, float]] = {}
    for pid in held:
        figures = tree_figures(pid, processes, children, resident)
        if figures is not None:
            cpu, rss = figures
            tree = {"cpu_seconds": cpu, "memory_peak": float(rss)}
            gpu_memory = sum(used for gpu_pid, used, lineage in gpu_used if gpu_pid == pid or pid in lineage)
            if gpu_memory:
                tree["gpu_memory_peak"] = float(gpu_memory)
            if kept is not None:
                before = kept.get(pid)
                if before == tree:
                    tree = before
            by_pid[pid] = tree
    if kept is not None:
        kept.clear()
        kept.update(by_pid)
    # Read-only: the allocations with one holder share its figures.
    usage.update({allocation_id: by_pid[pid] for allocation_id, pid in walked.items() if pid in by_pid})
    return usage

