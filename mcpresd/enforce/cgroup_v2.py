"""cgroup v2: one directory per allocation under a delegated subtree (`<mount>/<subtree>/alloc-<id>`).

The subtree enables the cpu, cpuset, memory and pids controllers for its children (cgroup.subtree_control).
Files written: cpu.weight, cpu.max, cpuset.cpus (hard, granted cores), memory.high (soft), memory.max and
memory.swap.max (hard), pids.max. Files read each sampling round: cpu.stat (usage_usec), memory.current,
memory.peak (Linux 5.19; memory.current before), memory.events (high, max, oom, oom_kill) and the pressure (PSI)
files cpu.pressure and memory.pressure (`some`/`full` avg10 and total; absent without CONFIG_PSI or with psi=0,
then reported as none). They are kept open between rounds and read with one pread each (`HeldFiles`); a cgroup
whose files read as the round before gives back the same CgroupUsage.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

from mcpresd.core.enforcement import Limits
from mcpresd.enforce import PREFIX, CgroupUsage, HeldFiles, Pressure, procs_in

WANTED = ("cpu", "cpuset", "memory", "pids")


class CgroupV2:
    name = "cgroup-v2"

    def __init__(self, mount: Path, subtree: str) -> None:
        self.root = Path(mount) / subtree
        try:
            available = (Path(mount) / "cgroup.controllers").read_text().split()
        except OSError:
            available = []
        self.controllers = tuple(c for c in WANTED if c in available)
        missing = [c for c in WANTED if c not in self.controllers]
        self.why_not: str | None = f"no {', '.join(missing)} controller" if missing else None
        self.enabled = set(self.controllers)
        """The controllers the subtree's children have (set when the subtree is prepared)."""
        self.favordynmods: str | None = None
        """What the daemon found or did about the favordynmods mount option (mcpresd.enforce.dynmods)."""
        self.files = HeldFiles()
        self._last: dict[str, tuple[tuple[bytes | None, ...], CgroupUsage]] = {}
        """Per allocation, the raw files of its last read and what they gave."""

    @property
    def enforces(self) -> bool:
        return True

    def _dir(self, allocation_id: str) -> Path:
        return self.root / f"{PREFIX}{allocation_id}"

    def _prepare(self) -> None:
        if not self.root.is_dir():
            self.root.mkdir()
        control = self.root / "cgroup.subtree_control"
        enabled = set(control.read_text().split()) if control.exists() else set()
        offered = self.root / "cgroup.controllers"  # what the parent passes down: enabling more is refused
        available = set(offered.read_text().split()) if offered.exists() else set(self.controllers)
        wanted = [c for c in self.controllers if c not in enabled and c in available]
        if wanted:
            _write(control, " ".join(f"+{c}" for c in wanted))
        self.enabled = {c for c in self.controllers if c in enabled or c in wanted}

    def create(self, allocation_id: str, limits: Limits) -> None:
        self._prepare()
        directory = self._dir(allocation_id)
        directory.mkdir(exist_ok=True)
        if "cpu" in self.enabled:
            _write(directory / "cpu.weight", 100 if limits.cpu_weight is None else limits.cpu_weight)
            quota = "max" if limits.cpu_quota_us is None else str(limits.cpu_quota_us)
            _write(directory / "cpu.max", f"{quota} {limits.cpu_period_us}")
        if "cpuset" in self.enabled and limits.cpus:
            _write(directory / "cpuset.cpus", ",".join(str(c) for c in limits.cpus))
        _write(directory / "memory.high", _bytes(limits.memory_soft))
        _write(directory / "memory.max", _bytes(limits.memory_max))
        if limits.memory_max is not None:
            _write(directory / "memory.swap.max", _bytes(limits.swap_max))
        if "pids" in self.enabled:
            _write(directory / "pids.max", _bytes(limits.tasks_max))

    def exists(self, allocation_id: str) -> bool:
        return self._dir(allocation_id).is_dir()

    def move(self, allocation_id: str, pid: int) -> None:
        _write(self._dir(allocation_id) / "cgroup.procs", pid)

    def usage(self, allocation_id: str) -> CgroupUsage | None:
        directory = f"{self.root}/{PREFIX}{allocation_id}/"
        read = self.files.read
        try:
            stat, current, events = (read(allocation_id, directory + "cpu.stat"),
                                     read(allocation_id, directory + "memory.current"),
                                     read(allocation_id, directory + "memory.events"))
        except OSError:
            return None
        raw = (stat, current, events, _optional(read, allocation_id, directory + "memory.peak"),  # since Linux 5.19
               _optional(read, allocation_id, directory + "cpu.pressure"),
               _optional(read, allocation_id, directory + "memory.pressure"))
        last = self._last.get(allocation_id)
        if last is not None and last[0] == raw:
            return last[1]
        try:
            keyed = _keyed(events)
            usage = CgroupUsage(cpu_seconds=_keyed(stat).get(b"usage_usec", 0) / 1e6, memory_current=int(current),
                                memory_peak=int(current if raw[3] is None else raw[3]),
                                oom_kills=keyed.get(b"oom_kill", 0), oom_events=keyed.get(b"oom", 0),
                                memory_high_events=keyed.get(b"high", 0), memory_max_events=keyed.get(b"max", 0),
                                cpu_pressure=_pressure(raw[4]), memory_pressure=_pressure(raw[5]))
        except ValueError:
            return None
        self._last[allocation_id] = (raw, usage)
        return usage

    def pids(self, allocation_id: str) -> set[int]:
        return set(procs_in(self._dir(allocation_id)))

    def remove(self, allocation_id: str) -> bool:
        self.files.forget(allocation_id)
        self._last.pop(allocation_id, None)
        try:
            self._dir(allocation_id).rmdir()
        except FileNotFoundError:
            pass
        except OSError as error:
            if error.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                raise
            return False
        return True

    def evict(self, allocation_id: str) -> int:
        moved = 0
        for pid in self.pids(allocation_id):
            try:
                _write(self.root.parent / "cgroup.procs", pid)
                moved += 1
            except OSError:
                continue
        return moved

    def existing(self) -> set[str]:
        try:
            found = {entry.name[len(PREFIX):] for entry in os.scandir(self.root)
                     if entry.is_dir() and entry.name.startswith(PREFIX)}
        except OSError:
            found = set()
        self.files.keep_only(found)
        for gone in self._last.keys() - found:
            self._last.pop(gone, None)
        return found

    def measurable(self) -> set[str]:
        return self.existing()  # one directory to list

    def describe(self) -> dict[str, object]:
        return {"backend": self.name, "controllers": list(self.controllers), "why_not": self.why_not,
                "cgroup": str(self.root), "favordynmods": self.favordynmods}


def _bytes(value: int | None) -> str:
    return "max" if value is None else str(value)


def _write(path: Path, value: object) -> None:
    with open(path, "w") as file:
        file.write(str(value))


def _optional(read: Callable[[str, str], bytes], allocation_id: str, path: str) -> bytes | None:
    """A file the kernel may not have (memory.peak before 5.19; the PSI files without CONFIG_PSI or with psi=0)."""
    try:
        return read(allocation_id, path)
    except OSError:
        return None


def _keyed(data: bytes) -> dict[bytes, int]:
    """A flat keyed file (cpu.stat, memory.events): `key value` lines."""
    values: dict[bytes, int] = {}
    for line in data.splitlines():
        key, _, value = line.partition(b" ")
        if value.strip().isdigit():
            values[key] = int(value)
    return values


def _pressure(data: bytes | None) -> Pressure | None:
    """A PSI file: `some avg10=0.00 avg60=0.00 avg300=0.00 total=0` and (mostly) a `full` line alike; total in
    microseconds. None where the kernel offers none (no CONFIG_PSI, psi=0) or the line is not understood."""
    if data is None:
        return None
    lines: dict[bytes, tuple[float, float]] = {}
    for line in data.splitlines():
        kind, *pairs = line.split() or [b""]
        fields = {key: value for key, _, value in (pair.partition(b"=") for pair in pairs)}
        try:
            lines[kind] = (float(fields[b"avg10"]), int(fields[b"total"]) / 1e6)
        except (KeyError, ValueError):
            return None
    if b"some" not in lines:
        return None
    full = lines.get(b"full")
    return Pressure(some_avg10=lines[b"some"][0], some_total_s=lines[b"some"][1],
                    full_avg10=None if full is None else full[0], full_total_s=None if full is None else full[1])
