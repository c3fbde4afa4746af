"""cgroup v1: one directory per allocation in each controller's hierarchy (`<mount>/<subtree>/alloc-<id>`).

Files written: cpu.shares, cpu.cfs_quota_us and cpu.cfs_period_us; cpuset.cpus and cpuset.mems (copied from
the parent, which v1 requires before a task may join; the granted cores in hard mode); memory.soft_limit_in_bytes
(soft), memory.limit_in_bytes and memory.memsw.limit_in_bytes (hard, where swap accounting is on); pids.max.
Files read: cpuacct.usage, memory.usage_in_bytes, memory.max_usage_in_bytes, memory.oom_control (oom_kill), kept
open between sampling rounds (`HeldFiles`); a cgroup whose four files read as the round before gives back the same
CgroupUsage, so nothing downstream redoes its work for an idle allocation. A cgroup whose CPU time did not move
since its last read is read for its memory now only (two files, not four): no task in it ran, so none charged
memory or was OOM-killed (peak and OOM kills are cumulative: the next read after a task ran finds them).

Devices (hard mode): where the allocation is denied GPUs' device nodes (`Limits.gpu_devices_denied`), a
directory in the devices hierarchy too, with `c 195:N rwm` written to devices.deny for each; the kernel then
refuses those nodes' open() with EPERM. Only such allocations get a devices directory (a v1 move costs an RCU
grace period per hierarchy). devices.list cannot show the denials: a cgroup that allows by default lists only
`a *:* rwm`.
"""

from __future__ import annotations

import errno
import os
from dataclasses import replace
from pathlib import Path

from mcpresd.core.enforcement import Limits
from mcpresd.enforce import PREFIX, CgroupUsage, HeldFiles, procs_in
from mcpresd.files import read_small as _read

CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "pids", "devices")
NVIDIA_MAJOR = 195
"""The character major of /dev/nvidia0..N (and of nvidiactl, 195:255, which is never denied)."""


class CgroupV1:
    name = "cgroup-v1"

    def __init__(self, mounts: dict[str, Path], subtree: str, devices_why_not: str | None = None) -> None:
        """`devices_why_not`: why the devices hierarchy is left out though mounted (not writable)."""
        self.mounts = {c: Path(p) for c, p in mounts.items() if c in CONTROLLERS}
        self.subtree = subtree
        self.controllers = tuple(c for c in CONTROLLERS if c in self.mounts)
        missing = [c for c in CONTROLLERS if c not in self.mounts and c != "devices"]
        reasons = [f"no {', '.join(missing)} hierarchy mounted"] if missing else []
        if "devices" not in self.mounts:
            reasons.append(f"devices: unavailable ({devices_why_not or 'no devices hierarchy mounted'}): "
                           "GPUs are fenced by CUDA_VISIBLE_DEVICES only")
        self.why_not: str | None = "; ".join(reasons) or None
        self._roots = sorted({p for p in self.mounts.values()})
        self.favordynmods: str | None = None
        """What the daemon found or did about the favordynmods mount option (mcpresd.enforce.dynmods)."""
        self.files = HeldFiles()
        self._last: dict[str, tuple[tuple[bytes, ...], CgroupUsage]] = {}
        """Per allocation, the raw files of its last read and what they gave."""

    @property
    def enforces(self) -> bool:
        return True

    def _base(self, controller: str) -> Path:
        return self.mounts[controller] / self.subtree

    def _dirs(self, allocation_id: str) -> list[Path]:
        """One directory per distinct mount (cpu and cpuacct may share one)."""
        return [root / self.subtree / f"{PREFIX}{allocation_id}" for root in self._roots]

    def _dir(self, controller: str, allocation_id: str) -> Path:
        return self._base(controller) / f"{PREFIX}{allocation_id}"

    def _prepare(self) -> None:
        for root in self._roots:
            (root / self.subtree).mkdir(exist_ok=True)
        if "cpuset" in self.mounts:
            _inherit_cpuset(self._base("cpuset"))

    def create(self, allocation_id: str, limits: Limits) -> None:
        self._prepare()
        devices = self._dir("devices", allocation_id) if "devices" in self.mounts else None
        for directory in self._dirs(allocation_id):
            if directory != devices or limits.gpu_devices_denied:
                directory.mkdir(exist_ok=True)
        if devices is not None:
            for minor in limits.gpu_devices_denied:
                _write(devices / "devices.deny", f"c {NVIDIA_MAJOR}:{minor} rwm")
        if "cpuset" in self.mounts:
            directory = self._dir("cpuset", allocation_id)
            _inherit_cpuset(directory)
            if limits.cpus:
                _write(directory / "cpuset.cpus", ",".join(str(c) for c in limits.cpus))
        if "cpu" in self.mounts:
            directory = self._dir("cpu", allocation_id)
            if limits.cpu_shares is not None:
                _write(directory / "cpu.shares", limits.cpu_shares)
            _write(directory / "cpu.cfs_period_us", limits.cpu_period_us)
            _write(directory / "cpu.cfs_quota_us", -1 if limits.cpu_quota_us is None else limits.cpu_quota_us)
        directory = self._dir("memory", allocation_id)
        _write(directory / "memory.soft_limit_in_bytes", -1 if limits.memory_soft is None else limits.memory_soft)
        memsw = directory / "memory.memsw.limit_in_bytes"
        if limits.memory_max is None:
            if memsw.exists():
                _write(memsw, -1)
            _write(directory / "memory.limit_in_bytes", -1)
        else:
            _write(directory / "memory.limit_in_bytes", limits.memory_max)
            if memsw.exists():  # swap accounting on: memory + swap at the grant (+ any swap allowed)
                _write(memsw, limits.memory_max + (limits.swap_max or 0))
        if "pids" in self.mounts:
            _write(self._dir("pids", allocation_id) / "pids.max",
                   "max" if limits.tasks_max is None else limits.tasks_max)

    def exists(self, allocation_id: str) -> bool:
        return self._dir("memory", allocation_id).is_dir()

    def move(self, allocation_id: str, pid: int) -> None:
        # Each v1 move costs the kernel an RCU grace period (~3 ms): skip the hierarchies that limit nothing here.
        for directory in self._dirs_in_use(allocation_id):
            _write(directory / "cgroup.procs", pid)

    def _dirs_in_use(self, allocation_id: str) -> list[Path]:
        idle: set[Path] = set()
        if "devices" in self.mounts and self.mounts["devices"] not in (self.mounts.get("memory"),
                                                                       self.mounts.get("cpu")):
            directory = self._dir("devices", allocation_id)
            if not directory.is_dir():
                idle.add(directory)  # made only for an allocation denied some GPUs
        if "pids" in self.mounts and self.mounts["pids"] not in (self.mounts.get("memory"), self.mounts.get("cpu")):
            directory = self._dir("pids", allocation_id)
            if _read(str(directory / "pids.max")).strip() == b"max":
                idle.add(directory)
        if "cpuset" in self.mounts and self.mounts["cpuset"] not in (self.mounts.get("memory"), self.mounts.get("cpu")):
            directory = self._dir("cpuset", allocation_id)
            if _read(str(directory / "cpuset.cpus")) == _read(str(directory.parent / "cpuset.cpus")):
                idle.add(directory)
        return [d for d in self._dirs(allocation_id) if d not in idle]

    def usage(self, allocation_id: str) -> CgroupUsage | None:
        memory = f"{self.mounts['memory']}/{self.subtree}/{PREFIX}{allocation_id}/"
        cpu = f"{self.mounts['cpuacct']}/{self.subtree}/{PREFIX}{allocation_id}/cpuacct.usage" \
            if "cpuacct" in self.mounts else None
        last = self._last.get(allocation_id)
        try:
            if cpu is not None and last is not None:
                # No task of the cgroup ran since the last read (its CPU time, in ns, did not move): nothing in it
                # charged memory or was OOM-killed (a victim runs its exit), so its peak and OOM kills are as read
                # then. Its memory now may still fall (reclaimed from outside): always read.
                quick = self.files.read_all(allocation_id, (cpu, memory + "memory.usage_in_bytes"))
                raw = last[0]
                if quick[0] == raw[0]:
                    if quick[1] == raw[1]:
                        return last[1]
                    if int(quick[1]) <= last[1].memory_peak:
                        return self._keep(allocation_id, (*quick, *raw[2:]),
                                          replace(last[1], memory_current=int(quick[1])))
            # The CPU time first: whatever runs after it was read moves it, so the next read reads all four again.
            paths = (memory + "memory.usage_in_bytes", memory + "memory.max_usage_in_bytes",
                     memory + "memory.oom_control")
            raw = self.files.read_all(allocation_id, (cpu, *paths)) if cpu is not None \
                else (b"0", *self.files.read_all(allocation_id, paths))
        except (OSError, ValueError):
            self._last.pop(allocation_id, None)  # gone (one made again counts afresh) or unreadable
            return None
        if last is not None and last[0] == raw:
            return last[1]
        try:
            oom_control = raw[3]
            at = oom_control.find(b"oom_kill ")
            usage = CgroupUsage(cpu_seconds=int(raw[0]) / 1e9, memory_current=int(raw[1]), memory_peak=int(raw[2]),
                                oom_kills=int(oom_control[at + 9:].split(b"\n", 1)[0]) if at >= 0 else 0)
        except ValueError:
            return None
        return self._keep(allocation_id, raw, usage)

    def _keep(self, allocation_id: str, raw: tuple[bytes, ...], usage: CgroupUsage) -> CgroupUsage:
        """Remember what these files gave (the next read that finds them unchanged gives back the same usage)."""
        self._last[allocation_id] = (raw, usage)
        return usage

    def pids(self, allocation_id: str) -> set[int]:
        return {pid for directory in self._dirs(allocation_id) for pid in procs_in(directory)}

    def remove(self, allocation_id: str) -> bool:
        self.files.forget(allocation_id)
        self._last.pop(allocation_id, None)
        gone = True
        for directory in self._dirs(allocation_id):
            try:
                directory.rmdir()
            except FileNotFoundError:
                pass
            except OSError as error:
                if error.errno != errno.EBUSY:
                    raise
                gone = False
        return gone

    def evict(self, allocation_id: str) -> int:
        moved = 0
        for root, directory in zip(self._roots, self._dirs(allocation_id)):
            for pid in procs_in(directory):
                try:
                    _write(root / "cgroup.procs", pid)
                    moved += 1
                except OSError:
                    continue
        return moved

    def existing(self) -> set[str]:
        found: set[str] = set()
        for root in self._roots:
            try:  # only cgroups are named alloc-* in a cgroup directory (its files are named cgroup.*, memory.*, ...)
                found.update(name[len(PREFIX):] for name in os.listdir(f"{root}/{self.subtree}")
                             if name.startswith(PREFIX))
            except OSError:
                continue
        self._keep_only(found)
        return found

    def measurable(self) -> set[str]:
        try:  # usage() reads the memory hierarchy (and cpuacct, made with it): one listing, not one per hierarchy
            found = {name[len(PREFIX):] for name in os.listdir(self._base("memory")) if name.startswith(PREFIX)}
        except OSError:
            found = set()
        self._keep_only(found)
        return found

    def _keep_only(self, found: set[str]) -> None:
        self.files.keep_only(found)
        for gone in self._last.keys() - found:
            self._last.pop(gone, None)

    def describe(self) -> dict[str, object]:
        return {"backend": self.name, "controllers": list(self.controllers), "why_not": self.why_not,
                "cgroup": {c: str(self._base(c)) for c in self.controllers}, "favordynmods": self.favordynmods}


def _inherit_cpuset(directory: Path) -> None:
    """A new v1 cpuset is empty: it takes its parent's cpus and mems, or no task may join it."""
    for name in ("cpuset.cpus", "cpuset.mems"):
        if not (directory / name).read_text().strip():
            _write(directory / name, (directory.parent / name).read_text().strip())


def _write(path: Path, value: object) -> None:
    with open(path, "w") as file:
        file.write(str(value))
