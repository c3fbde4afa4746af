"""Enforcement backends: the shell side of mcpresd.core.enforcement. One is chosen at start-up.

Rules:
- A backend turns `Limits` into its own files under a subtree the daemon owns
  (`<controller mount>/<subtree>/alloc-<allocation id>`), moves processes in,
  reads what the processes used, signals and removes. It never decides a limit.
- The cgroup tree is the record of which allocations have processes: after a
  restart the daemon lists `existing()` and ends what belongs to no active
  allocation. Nothing about it is kept in the database.
- `choose()` runs once: cgroup v2 where the unified hierarchy has the cpu and
  memory controllers and the daemon may write it, else cgroup v1 where the
  memory and cpu hierarchies are mounted and writable (with the devices
  hierarchy where it is writable too: hard mode's GPU fence), else (a daemon
  that is not root) systemd-scope where `systemd-run --user` starts a scope,
  else `NoEnforcement` with the reason; `mcpctl status` shows which and why.
- Which allocation a process belongs to is read from /proc/PID/cgroup
  (`allocation_of`), the same way for every backend that names cgroups
  `<subtree>/alloc-<id>`.
- A backend that cannot move processes (`StepScopes`: systemd-scope) names the
  scope each step starts itself in, and ends an allocation its own way.
- Every method is cheap (a few small file reads or writes) and raises OSError
  only from `create` and `move`; readers return None for what is gone.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from mcpresd.core.enforcement import Limits

if TYPE_CHECKING:
    from mcpresd.protocol import ScopeDict

PREFIX = "alloc-"


@dataclass(frozen=True)
class Pressure:
    """One PSI file (cgroup v2 `cpu.pressure`, `memory.pressure`): the share of wall time in the last 10 s that
    some (or all) of the cgroup's runnable tasks stalled waiting for the resource, in %, and the stalled seconds
    since the cgroup was made. `full` is None where the kernel has no full line (cpu before Linux 5.13)."""

    some_avg10: float
    some_total_s: float
    full_avg10: float | None = None
    full_total_s: float | None = None

    def figures(self, prefix: str) -> dict[str, float]:
        shown = {f"{prefix}_some_avg10": self.some_avg10, f"{prefix}_some_s": self.some_total_s}
        if self.full_avg10 is not None and self.full_total_s is not None:
            shown.update({f"{prefix}_full_avg10": self.full_avg10, f"{prefix}_full_s": self.full_total_s})
        return shown


@dataclass(frozen=True)
class CgroupUsage:
    """What an allocation's cgroup measured: CPU seconds since it was made, memory now and at its peak, OOM kills;
    on cgroup v2 also `memory.events` (how often memory.high throttled, memory.max was hit, the OOM killer ran)
    and pressure (PSI). None: the backend has no such file (cgroup v1 has neither)."""

    cpu_seconds: float
    memory_current: int
    memory_peak: int
    oom_kills: int = 0
    oom_events: int | None = None
    memory_high_events: int | None = None
    memory_max_events: int | None = None
    cpu_pressure: Pressure | None = None
    memory_pressure: Pressure | None = None

    def figures(self) -> dict[str, float]:
        """The figures as `measured` keeps them. Built once per object and shared: never change the dict (a
        backend hands back the same CgroupUsage for a cgroup whose files did not change, and the broker skips
        figures it has seen)."""
        built: dict[str, float] | None = self.__dict__.get("_figures")
        if built is None:
            built = self._figures()
            object.__setattr__(self, "_figures", built)
        return built

    def _figures(self) -> dict[str, float]:
        shown = {"cpu_seconds": round(self.cpu_seconds, 6), "memory_peak": float(self.memory_peak),
                 "memory_current": float(self.memory_current), "oom_kills": float(self.oom_kills)}
        for key, count in (("oom_events", self.oom_events), ("memory_high_events", self.memory_high_events),
                           ("memory_max_events", self.memory_max_events)):
            if count is not None:
                shown[key] = float(count)
        if self.cpu_pressure is not None:
            shown.update(self.cpu_pressure.figures("cpu_pressure"))
        if self.memory_pressure is not None:
            shown.update(self.memory_pressure.figures("memory_pressure"))
        return shown


def procs_in(directory: Path) -> list[int]:
    """The pids in a cgroup directory (its cgroup.procs); none where it is gone or unreadable."""
    try:
        return [int(line) for line in (directory / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


class HeldFiles:
    """The cgroup files each sampling round reads, kept open from one round to the next, up to `budget`
    descriptors (the daemon gives what its open-file limit spares; 0 keeps none). A held file is read again with
    one pread at offset 0, which the kernel renders afresh: a seventh of the CPU of an open, read and close
    (1,000 cgroup v1 allocations, four files each: 27 ms a round, 4 ms held).

    A backend forgets an allocation's files before removing its cgroup. A held file whose cgroup went another way
    fails its read (ENODEV) and is opened afresh. Reads (the sampler's thread) and forgetting (the loop's) take
    one lock, so a descriptor is never closed under a read nor its number reused by it.
    """

    def __init__(self, budget: int = 0) -> None:
        self.budget = budget
        self._held: dict[str, dict[str, int]] = {}
        self._count = 0
        self._lock = threading.Lock()

    def read(self, allocation_id: str, path: str) -> bytes:
        """The file's contents (up to 4 KiB); OSError if it cannot be read (FileNotFoundError: no such cgroup)."""
        with self._lock:
            files = self._held.get(allocation_id)
            if files is not None and (fd := files.get(path)) is not None:
                try:
                    return os.pread(fd, 4096, 0)
                except OSError:
                    self._forget(allocation_id)
            fd = os.open(path, os.O_RDONLY)
            if self._count >= self.budget:
                try:
                    return os.read(fd, 4096)
                finally:
                    os.close(fd)
            self._held.setdefault(allocation_id, {})[path] = fd
            self._count += 1
            return os.pread(fd, 4096, 0)

    def read_all(self, allocation_id: str, paths: tuple[str, ...]) -> tuple[bytes, ...]:
        """Each of the allocation's files in `paths` (all its files or some), in one go (one lock, one lookup, while
        all of them are held)."""
        with self._lock:
            files = self._held.get(allocation_id)
            if files is not None:
                try:
                    return tuple(os.pread(files[path], 4096, 0) for path in paths)
                except KeyError:
                    pass  # not all of them held (past the budget, or not read yet): file by file
                except OSError:
                    self._forget(allocation_id)
        return tuple(self.read(allocation_id, path) for path in paths)

    def forget(self, allocation_id: str) -> None:
        """Close the allocation's held files (its cgroup is about to go)."""
        with self._lock:
            self._forget(allocation_id)

    def _forget(self, allocation_id: str) -> None:
        for fd in self._held.pop(allocation_id, {}).values():
            os.close(fd)
            self._count -= 1

    def keep_only(self, allocation_ids: set[str]) -> None:
        """Forget the files of cgroups no longer there (a read that raced their removal may have opened some)."""
        with self._lock:
            for allocation_id in self._held.keys() - allocation_ids:
                self._forget(allocation_id)

    @property
    def held(self) -> int:
        return self._count


class Enforcer(Protocol):
    """A way to hold an allocation's processes to its limits."""

    name: str
    controllers: tuple[str, ...]
    why_not: str | None
    """Why nothing is enforced (the `none` backend), or what is missing; None when all is there."""

    @property
    def enforces(self) -> bool: ...

    def create(self, allocation_id: str, limits: Limits) -> None: ...

    def exists(self, allocation_id: str) -> bool: ...

    def move(self, allocation_id: str, pid: int) -> None: ...

    def usage(self, allocation_id: str) -> CgroupUsage | None: ...

    def pids(self, allocation_id: str) -> set[int]: ...

    def remove(self, allocation_id: str) -> bool: ...

    def evict(self, allocation_id: str) -> int:
        """Move every process out of the allocation's cgroup (to the root cgroup), for --keep-processes."""
        ...

    def existing(self) -> set[str]: ...

    def measurable(self) -> set[str]:
        """The allocations whose cgroup `usage` can read now, as cheaply as one listing allows (a sampling round
        asks this: `existing` may list every hierarchy); lets go of what it kept for cgroups gone."""
        ...

    def describe(self) -> dict[str, object]: ...


@runtime_checkable
class StepScopes(Protocol):
    """A backend that moves no process: each step starts itself in the scope named here (`mcpctl run`)."""

    def step(self, allocation_id: str, pid: int, limits: Limits, kill_grace: float) -> ScopeDict: ...

    async def end(self, allocation_id: str, keep_processes: bool, grace: float) -> int: ...


class NoEnforcement:
    """Enforcement `off`: no cgroups; allocations are reservations, use is measured by walking process trees."""

    name = "none"
    controllers: tuple[str, ...] = ()

    def __init__(self, why_not: str) -> None:
        self.why_not: str | None = why_not

    @property
    def enforces(self) -> bool:
        return False

    def create(self, allocation_id: str, limits: Limits) -> None:
        raise OSError(f"no enforcement: {self.why_not}")

    def exists(self, allocation_id: str) -> bool:
        return False

    def move(self, allocation_id: str, pid: int) -> None:
        raise OSError(f"no enforcement: {self.why_not}")

    def usage(self, allocation_id: str) -> CgroupUsage | None:
        return None

    def pids(self, allocation_id: str) -> set[int]:
        return set()

    def remove(self, allocation_id: str) -> bool:
        return True

    def evict(self, allocation_id: str) -> int:
        return 0

    def existing(self) -> set[str]:
        return set()

    def measurable(self) -> set[str]:
        return set()

    def describe(self) -> dict[str, object]:
        return {"backend": self.name, "controllers": [], "why_not": self.why_not}


def allocation_in(cgroup_file: str, subtree: str) -> str | None:
    """The allocation whose cgroup (`.../<subtree>/alloc-<id>`, in any hierarchy) a /proc/PID/cgroup text names."""
    for line in cgroup_file.splitlines():
        path = line.split(":", 2)[-1].rstrip("/")
        parent, _, name = path.rpartition("/")
        if name.startswith(PREFIX) and len(name) > len(PREFIX) and (parent + "/").endswith(f"/{subtree}/"):
            return name[len(PREFIX):]
    return None


def allocation_of(pid: int, subtree: str, proc: str = "/proc") -> str | None:
    """The allocation whose cgroup holds `pid`; None for a process in none of them, or gone."""
    try:
        with open(f"{proc}/{pid}/cgroup") as file:
            return allocation_in(file.read(), subtree)
    except OSError:
        return None


def signal_all(pids: Iterable[int], signum: int) -> int:
    """Send `signum` to each pid; how many were still there to receive it."""
    sent = 0
    for pid in pids:
        try:
            os.kill(pid, signum)
            sent += 1
        except ProcessLookupError:
            pass
    return sent


async def stop_processes(enforcer: Enforcer, allocation_id: str, grace: float, poll: float = 0.05) -> int:
    """SIGTERM every process in the allocation's cgroup, SIGKILL what is left after `grace`, remove the cgroup.

    Returns how many processes were signalled. Gives up on removing after `grace` + 5 s more (logged by the caller
    through `existing()` on the next start).
    """
    loop = asyncio.get_running_loop()
    stopped = signal_all(enforcer.pids(allocation_id), signal.SIGTERM)
    deadline = loop.time() + grace
    while stopped and enforcer.pids(allocation_id) and loop.time() < deadline:
        await asyncio.sleep(poll)
    deadline = loop.time() + 5.0
    while True:
        left = enforcer.pids(allocation_id)
        if left:
            signal_all(left, signal.SIGKILL)
        elif enforcer.remove(allocation_id):
            return stopped
        if loop.time() > deadline:
            return stopped
        await asyncio.sleep(poll)


async def let_go(enforcer: Enforcer, allocation_id: str, keep_processes: bool, grace: float) -> int:
    """End an allocation's cgroup: its processes stopped (or moved out, kept), the cgroup removed; how many stopped."""
    if isinstance(enforcer, StepScopes):
        return await enforcer.end(allocation_id, keep_processes, grace)
    if keep_processes:
        enforcer.evict(allocation_id)
    return await stop_processes(enforcer, allocation_id, grace)


def choose(subtree: str, *, mounts: str = "/proc/self/mounts") -> Enforcer:
    """The backend this host allows, with the cgroup subtree `subtree` under each controller."""
    from mcpresd.enforce.cgroup_v1 import CgroupV1
    from mcpresd.enforce.cgroup_v2 import CgroupV2

    try:
        table = Path(mounts).read_text()
    except OSError as error:
        return NoEnforcement(f"cannot read {mounts}: {error.strerror}")
    v1: dict[str, Path] = {}
    v2_reason = "no cgroup v2 hierarchy is mounted"
    unified: Path | None = None
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        where, kind, options = Path(fields[1]), fields[2], fields[3].split(",")
        if kind == "cgroup2":
            unified = where
            try:
                available = set((where / "cgroup.controllers").read_text().split())
            except OSError:
                available = set()
            missing = {"cpu", "memory"} - available
            if missing:
                v2_reason = f"the cgroup v2 hierarchy at {where} has no {' or '.join(sorted(missing))} controller"
            elif not os.access(where / subtree if (where / subtree).exists() else where, os.W_OK):
                v2_reason = f"the cgroup v2 hierarchy at {where} is not writable by uid {os.getuid()} " \
                            "(run as root, or with Delegate=yes)"
            else:
                return CgroupV2(where, subtree)
        elif kind == "cgroup":
            for controller in ("cpu", "cpuacct", "cpuset", "memory", "pids", "devices"):
                if controller in options:
                    v1[controller] = where
    devices_why_not = None
    if "devices" in v1 and not os.access(v1["devices"], os.W_OK):
        devices_why_not = f"the devices hierarchy is not writable by uid {os.getuid()}"
        del v1["devices"]  # the GPU device fence is left out, not every limit
    if "memory" in v1 and "cpu" in v1:
        if all(os.access(path, os.W_OK) for path in v1.values()):
            return CgroupV1(v1, subtree, devices_why_not)
        reason = f"{v2_reason}; the cgroup v1 hierarchies are not writable by uid {os.getuid()}"
    else:
        reason = f"{v2_reason}; no cgroup v1 memory and cpu hierarchies either"
    if os.getuid() == 0:
        return NoEnforcement(reason)
    from mcpresd.enforce.systemd_scope import probe

    scopes = probe(subtree, unified)
    if isinstance(scopes, str):
        return NoEnforcement(f"{reason}; {scopes}")
    scopes.why = f"{reason}; systemd-run --user starts scopes"
    return scopes
