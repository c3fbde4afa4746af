"""systemd-scope (rootless): each step of an allocation runs in a transient scope of the user's systemd manager.

A daemon that is not root cannot move a process out of its user's login session scope (the kernel wants write
access to the common ancestor's cgroup.procs), so it does not move anything: `mcpctl run` execs
`systemd-run --user --scope --unit=alloc-<id>-<pid>.scope --slice=<subtree>.slice --property=... -- cmd` in the
step's process, which becomes the command (same pid: exit status and signals pass as before).

Rules:
- The daemon names the unit and its properties (`step()`, from `Limits`, the same values the cgroup v2 backend
  writes); only mcpctl starts scopes. `create` and `move` record the allocation and its step pids; they call
  nothing and never fail.
- Measured use is read from the scope's cgroup, found through /proc/PID/cgroup of the step (the unified
  hierarchy's line must end in the unit's name), else `<slice's cgroup>/<unit>`: cpu.stat, memory.current,
  memory.peak, memory.events. A scope that is gone keeps the CPU and peak last read from it.
- An allocation's end stops its scopes (`systemctl --user stop UNIT`: SIGTERM, then SIGKILL after TimeoutStopSec,
  set to `[enforce] kill_grace` when the scope was started); --keep-processes leaves them to run out.
- `mcpctl allocate` stays advisory: no process but a step can be put in a scope. Steps running at the same time
  are each held to the allocation's limits, not to one shared limit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from mcpresd.core.enforcement import Limits
from mcpresd.enforce import PREFIX, CgroupUsage, procs_in

if TYPE_CHECKING:
    from mcpresd.protocol import ScopeDict

log = logging.getLogger("mcpresd.enforce")

WANTED = ("cpu", "cpuset", "memory", "pids")
ADVISORY = ("only `mcpctl run` steps are limited, each in a transient scope of the user's systemd manager; "
            "`mcpctl allocate` is a reservation (advisory): no other process can be moved into a scope")
PROBE_TIMEOUT_S = 10.0


def unit_name(allocation_id: str, pid: int) -> str:
    return f"{PREFIX}{allocation_id}-{pid}.scope"


def properties(limits: Limits, kill_grace: float) -> list[str]:
    """The scope's properties for `limits` (systemd.resource-control(5)), in a fixed order.

    soft: CPUWeight (from the granted cores), MemoryHigh. hard: also CPUQuota, AllowedCPUs (named cores),
    MemoryMax, MemorySwapMax, TasksMax. Every scope: CPU and memory accounting (for measured use), and
    TimeoutStopSec = kill_grace, the time between SIGTERM and SIGKILL when the allocation ends.
    """
    found = ["CPUAccounting=yes", "MemoryAccounting=yes", f"TimeoutStopSec={round(kill_grace * 1000)}ms"]
    if limits.cpu_weight is not None:
        found.append(f"CPUWeight={limits.cpu_weight}")
    if limits.cpu_quota_us is not None:
        # systemd takes at most two decimals ("33.333%" is refused): 0.01 % is 100 us a second
        found.append(f"CPUQuota={round(limits.cpu_quota_us * 100 / limits.cpu_period_us, 2):g}%")
    if limits.cpus:
        found.append("AllowedCPUs=" + ",".join(str(c) for c in limits.cpus))
    if limits.memory_soft is not None:
        found.append(f"MemoryHigh={limits.memory_soft}")
    if limits.memory_max is not None:
        found.append(f"MemoryMax={limits.memory_max}")
    if limits.swap_max is not None:
        found.append(f"MemorySwapMax={limits.swap_max}")
    if limits.tasks_max is not None:
        found.append(f"TasksMax={limits.tasks_max}")
    return found


def scope_path(cgroup_file: str) -> str | None:
    """The unified hierarchy's path in a /proc/PID/cgroup text ("0::/user.slice/.../x.scope"), if it has one."""
    for line in cgroup_file.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or None
    return None


class SystemdScope:
    name = "systemd-scope"

    def __init__(self, subtree: str, mount: Path, *, slice_dir: Path | None, controllers: tuple[str, ...],
                 why: str, proc: str = "/proc") -> None:
        self.slice = f"{subtree}.slice"
        self.mount = mount
        self.slice_dir = slice_dir
        """The slice's cgroup directory, where the user manager put the start-up probe; None if not seen there."""
        self.controllers = controllers
        self.why = why
        self.proc = proc
        missing = [c for c in WANTED if c not in controllers]
        if slice_dir is None or not controllers:
            self.why_not: str | None = (f"the scopes' cgroups are not visible under {mount}: limits are handed to "
                                        "systemd unconfirmed, and use is measured from the process tree")
        elif missing:
            self.why_not = (f"the user manager delegates no {', '.join(missing)} controller"
                            + (": AllowedCPUs is not applied" if "cpuset" in missing else ""))
        else:
            self.why_not = None
        self._steps: dict[str, dict[int, str]] = {}
        """Allocation id -> {step pid: unit}, as recorded by move(); scanned units are added by _units()."""
        self._dirs: dict[str, Path] = {}
        self._last: dict[str, CgroupUsage] = {}

    @property
    def enforces(self) -> bool:
        return True

    def step(self, allocation_id: str, pid: int, limits: Limits, kill_grace: float) -> ScopeDict:
        """The scope a step (`pid`) of the allocation is started in: a pure value, sent to mcpctl."""
        return {"unit": unit_name(allocation_id, pid), "slice": self.slice,
                "properties": properties(limits, kill_grace)}

    def create(self, allocation_id: str, limits: Limits) -> None:
        self._steps.setdefault(allocation_id, {})

    def exists(self, allocation_id: str) -> bool:
        return allocation_id in self._steps or bool(self._scanned().get(allocation_id))

    def move(self, allocation_id: str, pid: int) -> None:
        self._steps.setdefault(allocation_id, {})[pid] = unit_name(allocation_id, pid)

    def _scanned(self) -> dict[str, dict[int, str]]:
        """The allocations' scopes in the slice's cgroup (they outlive a daemon restart)."""
        found: dict[str, dict[int, str]] = {}
        if self.slice_dir is None:
            return found
        try:
            entries = [entry.name for entry in os.scandir(self.slice_dir) if entry.name.startswith(PREFIX)]
        except OSError:
            return found
        for name in entries:
            allocation_id, _, rest = name[len(PREFIX):].rpartition("-")
            pid = rest.removesuffix(".scope")
            if allocation_id and pid.isdigit() and name.endswith(".scope"):
                found.setdefault(allocation_id, {})[int(pid)] = name
        return found

    def _units(self, allocation_id: str) -> dict[int, str]:
        return {**self._scanned().get(allocation_id, {}), **self._steps.get(allocation_id, {})}

    def _dir(self, unit: str, pid: int) -> Path | None:
        """The scope's cgroup directory: where /proc/PID/cgroup of its step says, else below the slice's."""
        known = self._dirs.get(unit)
        if known is not None:
            return known
        try:
            with open(f"{self.proc}/{pid}/cgroup") as file:
                path = scope_path(file.read())
        except OSError:
            path = None
        directory = None
        if path is not None and path.rstrip("/").endswith("/" + unit):
            directory = self.mount / path.strip("/")
        elif self.slice_dir is not None and (self.slice_dir / unit).is_dir():
            directory = self.slice_dir / unit
        if directory is not None:
            self._dirs[unit] = directory
        return directory

    def usage(self, allocation_id: str) -> CgroupUsage | None:
        total: CgroupUsage | None = None
        for pid, unit in list(self._units(allocation_id).items()):
            directory = self._dir(unit, pid)
            figures = _read(directory) if directory is not None else None
            if figures is not None:
                self._last[unit] = figures
            elif unit in self._last:  # the scope ended: its CPU and peak stay counted
                last = self._last[unit]
                figures = CgroupUsage(last.cpu_seconds, 0, last.memory_peak, last.oom_kills)
            if figures is None:
                continue
            total = figures if total is None else CgroupUsage(
                total.cpu_seconds + figures.cpu_seconds, total.memory_current + figures.memory_current,
                total.memory_peak + figures.memory_peak, total.oom_kills + figures.oom_kills)
        return total

    def pids(self, allocation_id: str) -> set[int]:
        found: set[int] = set()
        for pid, unit in list(self._units(allocation_id).items()):
            directory = self._dir(unit, pid)
            if directory is not None:
                found.update(procs_in(directory))
        return found

    def remove(self, allocation_id: str) -> bool:
        """Forget the allocation once its scopes are empty (systemd removes an empty scope itself)."""
        if self.pids(allocation_id):
            return False
        self._forget(allocation_id)
        return True

    def _forget(self, allocation_id: str) -> None:
        for unit in self._steps.pop(allocation_id, {}).values():
            self._dirs.pop(unit, None)
            self._last.pop(unit, None)

    def evict(self, allocation_id: str) -> int:
        return 0  # a scope's processes cannot be moved out of it; kept, they run on in their scope

    def existing(self) -> set[str]:
        return set(self._steps) | set(self._scanned())

    def measurable(self) -> set[str]:
        return self.existing()

    def describe(self) -> dict[str, object]:
        return {"backend": self.name, "controllers": list(self.controllers), "why_not": self.why_not,
                "why": self.why, "advisory": ADVISORY, "slice": self.slice,
                "cgroup": None if self.slice_dir is None else str(self.slice_dir)}

    async def end(self, allocation_id: str, keep_processes: bool, grace: float) -> int:
        """The allocation ended: stop its scopes (kept: leave them to run out); how many processes were in them."""
        if keep_processes:
            self._forget(allocation_id)
            return 0
        count = len(self.pids(allocation_id))
        for pid, unit in sorted(self._units(allocation_id).items()):
            seen = self._dirs.get(unit)
            if seen is not None and not seen.exists():
                continue  # its step ended and systemd removed the scope: nothing to stop
            await _systemctl_stop(unit, grace + 10.0)
        self._forget(allocation_id)
        return count


def _read(directory: Path) -> CgroupUsage | None:
    try:
        cpu_us = _keyed(directory / "cpu.stat").get("usage_usec", 0)
        current = int((directory / "memory.current").read_text())
        peak_file = directory / "memory.peak"
        peak = int(peak_file.read_text()) if peak_file.exists() else current
        oom = _keyed(directory / "memory.events").get("oom_kill", 0)
    except (OSError, ValueError):
        return None
    return CgroupUsage(cpu_seconds=cpu_us / 1e6, memory_current=current, memory_peak=peak, oom_kills=oom)


def _keyed(path: Path) -> dict[str, int]:
    values: dict[str, int] = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            values[key] = int(value)
    return values


async def _systemctl_stop(unit: str, timeout: float) -> None:
    """`systemctl --user stop UNIT`, waited for (SIGTERM, TimeoutStopSec, SIGKILL); a unit not loaded is gone."""
    try:
        process = await asyncio.create_subprocess_exec(
            "systemctl", "--user", "stop", unit, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
    except OSError as error:
        log.warning("cannot stop scope %s: systemctl: %s", unit, error.strerror or error)
        return
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), timeout)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
        log.warning("scope %s: systemctl --user stop did not return in %.0f s", unit, timeout)
        return
    if process.returncode not in (0, 5):  # 5: the unit is not loaded (its step ended, the scope was collected)
        log.warning("scope %s: systemctl --user stop exited %s: %s", unit, process.returncode,
                    stderr.decode(errors="replace").strip())


def probe(subtree: str, mount: Path | None, timeout: float = PROBE_TIMEOUT_S) -> SystemdScope | str:
    """The backend if the user's systemd manager starts scopes for this daemon's user; else why not.

    One scope is started to find out (`cat /proc/self/cgroup` in it): where the user manager puts this
    subtree's slice, and so which controllers its scopes get.
    """
    if mount is None:
        return "no cgroup v2 hierarchy is mounted, so a user manager's scopes cannot be limited"
    if shutil.which("systemd-run") is None:
        return "systemd-run is not installed"
    slice_name = f"{subtree}.slice"
    try:
        done = subprocess.run(["systemd-run", "--user", "--scope", "--quiet", "--collect", f"--slice={slice_name}",
                               "--", "cat", "/proc/self/cgroup"], stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"systemd-run --user did not answer in {timeout:.0f} s"
    except OSError as error:
        return f"systemd-run --user: {error.strerror or error}"
    if done.returncode != 0:
        said = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return f"systemd-run --user cannot start a scope ({said})"
    path = scope_path(done.stdout)
    slice_dir = None
    controllers: tuple[str, ...] = ()
    if path is not None:
        scope = Path(path.strip("/"))
        if scope.name.endswith(".scope") and scope.parent.name == slice_name:
            slice_dir = mount / scope.parent
            for directory in (slice_dir, *slice_dir.parents):
                try:
                    offered = (directory / "cgroup.controllers").read_text().split()
                except OSError:
                    if directory == mount:
                        break
                    continue
                controllers = tuple(c for c in WANTED if c in offered)
                break
    why = f"uid {os.getuid()} cannot write a cgroup subtree, and systemd-run --user starts scopes"
    return SystemdScope(subtree, mount, slice_dir=slice_dir, controllers=controllers, why=why)
