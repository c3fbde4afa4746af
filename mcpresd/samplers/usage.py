"""What holders use: CPU time and resident memory of each holder's process tree, GPU memory of its processes.

Rules:
- Read with psutil off the event loop, once per sampling round, only for allocations held by a process.
- CPU seconds are the tree's total as read now (the broker subtracts what it had used before the grant);
  memory is the tree's resident set now (the broker keeps the peak).
- A process that vanished or cannot be read is skipped, never an error.
"""

from __future__ import annotations

from collections.abc import Callable

import psutil

GpuProcesses = dict[str, list[tuple[int | None, int | None, tuple[int, ...]]]]


def holder_usage(holders: dict[str, int], gpu_processes: GpuProcesses,
                 cgroups: Callable[[str], dict[str, float] | None] | None = None) -> dict[str, dict[str, float]]:
    """{allocation id: {"cpu_seconds", "memory_peak"[, "gpu_memory_peak"]}} for each holder pid given.

    Where `cgroups` has figures for an allocation (its cgroup: everything its processes ever started, double-forked
    children included), those replace the walk: cpu_seconds, memory_peak, memory_current and oom_kills.
    """
    usage: dict[str, dict[str, float]] = {}
    for allocation_id, pid in holders.items():
        measured = cgroups(allocation_id) if cgroups is not None else None
        if measured is not None:
            usage[allocation_id] = measured
            continue
        try:
            root = psutil.Process(pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        cpu, rss = 0.0, 0
        for process in tree:
            try:
                with process.oneshot():
                    times = process.cpu_times()
                    cpu += times.user + times.system
                    rss += process.memory_info().rss
            except psutil.Error:
                continue
        try:
            times = root.cpu_times()
            cpu += times.children_user + times.children_system  # children that already exited
        except psutil.Error:
            pass
        figures = {"cpu_seconds": cpu, "memory_peak": float(rss)}
        gpu_memory = sum(used or 0 for processes in gpu_processes.values() for gpu_pid, used, lineage in processes
                         if gpu_pid == pid or pid in lineage)
        if gpu_memory:
            figures["gpu_memory_peak"] = float(gpu_memory)
        usage[allocation_id] = figures
    return usage
