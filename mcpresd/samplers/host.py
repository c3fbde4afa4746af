"""Host discovery: facts read once from psutil and NVML, turned into Resources by pure functions.

Rules of this module:
- `read_host_facts` is the only function that calls psutil or the filesystem; everything after it
  is a pure function of `HostFacts`, so it is tested with values recorded on real hosts.
- Names are stable across restarts: `cpu`, `memory`, `disk:<mount point>`, `net:<interface>`,
  `gpu:<index>`. A GPU also carries its NVML UUID, the key that survives index reordering.
- Pseudo filesystems and read-only images are not disks; loopback is not a network link. Nor
  is a bind mount of a directory of a file system mounted whole elsewhere (`mount_views`).
- Unknown stays unknown: a label is None rather than a guessed 0, and a link whose speed the
  kernel does not report gets the configured default with `speed_known: False`.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

import psutil

from mcpresd.core.model import Resource
from mcpresd.protocol import ResourceType
from mcpresd.samplers.nvml import GpuError, GpuFacts, Nvml

log = logging.getLogger(__name__)

DEFAULT_LINK_BYTES_PER_S = 125_000_000.0  # 1 Gbit/s
_PSEUDO_FILESYSTEMS = frozenset(
    "autofs binfmt_misc bpf configfs debugfs devpts devtmpfs efivarfs erofs fusectl hugetlbfs iso9660"
    " mqueue nsfs proc pstore ramfs rpc_pipefs securityfs selinuxfs squashfs sysfs tmpfs tracefs".split()
)


@dataclass(frozen=True)
class Partition:
    device: str
    mountpoint: str
    fstype: str
    total_bytes: int | None  # None: not a directory, not a disk filesystem, or statvfs failed


@dataclass(frozen=True)
class Link:
    name: str
    isup: bool
    speed_mbps: int  # 0 where the kernel does not know (virtual NICs, most cloud VMs)
    mtu: int
    flags: str


@dataclass(frozen=True)
class HostFacts:
    cpu_logical: int
    cpu_physical: int | None
    memory_total: int
    partitions: tuple[Partition, ...] = ()
    links: tuple[Link, ...] = ()
    gpus: tuple[GpuFacts, ...] = ()


def discover(
    *, memory_reserve: int, nvml: Nvml | None, default_link_bytes_per_s: float = DEFAULT_LINK_BYTES_PER_S
) -> list[Resource]:
    """The resources this host offers right now."""
    return resources_from_facts(
        read_host_facts(nvml), memory_reserve=memory_reserve, default_link_bytes_per_s=default_link_bytes_per_s
    )


def read_host_facts(nvml: Nvml | None = None) -> HostFacts:
    """Everything discovery needs from psutil and NVML. A GPU that cannot be read is logged and left out."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as mountinfo:
            views = mount_views(mountinfo.read())
    except OSError:
        views = frozenset()
    return HostFacts(
        cpu_logical=psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        cpu_physical=psutil.cpu_count(logical=False),
        memory_total=int(psutil.virtual_memory().total),
        partitions=tuple(
            Partition(p.device, p.mountpoint, p.fstype, disk_total(p.mountpoint, p.fstype))
            for p in psutil.disk_partitions(all=False)
            if p.mountpoint not in views
        ),
        links=tuple(
            Link(name, bool(s.isup), int(s.speed), int(s.mtu), str(getattr(s, "flags", "")))
            for name, s in psutil.net_if_stats().items()
        ),
        gpus=_read_gpus(nvml) if nvml is not None else (),
    )


def mount_views(mountinfo: str) -> frozenset[str]:
    """Mount points that show a directory of a file system also mounted whole: bind mounts, not disks.

    systemd's sandbox makes them (PrivateTmp=; StateDirectory= and ReadWritePaths= under ProtectSystem=;
    ProtectHome=read-only), as do containers; listed as disks they would count one disk's space twice. A
    mount whose root is the file system's root, or the btrfs subvolume it names (subvol=), is whole. From
    /proc/self/mountinfo: ID PARENT MAJOR:MINOR ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER.
    """
    whole: set[str] = set()
    views: list[tuple[str, str]] = []
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if "-" not in fields[6:]:
            continue
        tail = fields[fields.index("-", 6) + 1:]
        super_options = tail[2].split(",") if len(tail) > 2 else []
        subvolume = next((o[len("subvol="):] for o in super_options if o.startswith("subvol=")), None)
        device, root, mountpoint = fields[2], _unescape(fields[3]), _unescape(fields[4])
        if root == "/" or root == subvolume:
            whole.add(device)
        else:
            views.append((device, mountpoint))
    return frozenset(mountpoint for device, mountpoint in views if device in whole)


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040 ...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def resources_from_facts(
    facts: HostFacts, *, memory_reserve: int, default_link_bytes_per_s: float = DEFAULT_LINK_BYTES_PER_S
) -> list[Resource]:
    return [
        cpu_resource(facts),
        memory_resource(facts.memory_total, memory_reserve),
        *disk_resources(facts.partitions),
        *network_resources(facts.links, default_link_bytes_per_s),
        *gpu_resources(facts.gpus),
    ]


def cpu_resource(facts: HostFacts) -> Resource:
    return Resource(
        name="cpu",
        type=ResourceType.CPU,
        capacity=float(facts.cpu_logical),
        unit="cores",
        labels={"physical": facts.cpu_physical},
        source="discovered",
    )


def memory_resource(total: int, reserve: int) -> Resource:
    """All memory but the reserve kept back for the host; at least one byte is always offered."""
    if reserve < 0:
        raise ValueError(f"memory reserve must not be negative, got {reserve}")
    applied = min(reserve, total - 1)
    return Resource(
        name="memory",
        type=ResourceType.MEMORY,
        capacity=float(total - applied),
        unit="bytes",
        labels={"total": total, "reserve": applied},
        source="discovered",
    )


def is_disk_filesystem(fstype: str) -> bool:
    # overlay stays: it is the root filesystem of every container.
    return not (fstype in _PSEUDO_FILESYSTEMS or fstype.startswith(("cgroup", "fuse.")))


def disk_resources(partitions: tuple[Partition, ...]) -> list[Resource]:
    by_mountpoint: dict[str, Partition] = {}
    for partition in partitions:
        if is_disk_filesystem(partition.fstype) and partition.total_bytes:
            # Of two mounts on one point the later one is the one visible, so it wins.
            by_mountpoint[partition.mountpoint] = partition
    return [
        Resource(
            name=f"disk:{p.mountpoint}",
            type=ResourceType.DISK,
            capacity=float(p.total_bytes or 0),
            unit="bytes",
            labels={"mountpoint": p.mountpoint, "device": p.device, "fstype": p.fstype},
            source="discovered",
        )
        for p in by_mountpoint.values()
    ]


def network_resources(links: tuple[Link, ...], default_link_bytes_per_s: float) -> list[Resource]:
    return [
        Resource(
            name=f"net:{link.name}",
            type=ResourceType.NETWORK,
            capacity=link.speed_mbps * 1e6 / 8 if link.speed_mbps > 0 else default_link_bytes_per_s,
            unit="bytes/s",
            labels={
                "speed_mbps": link.speed_mbps if link.speed_mbps > 0 else None,
                "speed_known": link.speed_mbps > 0,
                "isup": link.isup,
                "mtu": link.mtu,
            },
            source="discovered",
        )
        for link in links
        if link.name != "lo" and "loopback" not in link.flags.split(",")
    ]


def gpu_resources(gpus: tuple[GpuFacts, ...]) -> list[Resource]:
    return [
        Resource(
            name=f"gpu:{gpu.index}",
            type=ResourceType.GPU,
            capacity=1.0,
            unit="device",
            labels={
                "index": gpu.index,
                "name": gpu.name,
                "memory": gpu.memory_total,
                "pci_bus_id": gpu.pci_bus_id,
                "mig": gpu.mig_enabled,
                "numa_node": gpu.numa_node,
                "minor": gpu.minor_number,
            },
            uuid=gpu.uuid,
            source="discovered",
        )
        for gpu in gpus
    ]


def disk_total(mountpoint: str, fstype: str) -> int | None:
    """The size of the filesystem at a mount point, or None where it is not a disk we can measure."""
    # Pseudo filesystems are not statted: statvfs on an autofs point would trigger the mount.
    # Bind-mounted files (/etc/hosts in a container) are partitions too, but not disks.
    if not is_disk_filesystem(fstype) or not os.path.isdir(mountpoint):
        return None
    try:
        return int(psutil.disk_usage(mountpoint).total)
    except OSError:
        return None


def _read_gpus(nvml: Nvml) -> tuple[GpuFacts, ...]:
    try:
        count = nvml.device_count()
    except GpuError as error:
        log.warning("no GPUs discovered: %s", error)
        return ()
    gpus = []
    for index in range(count):
        try:
            gpus.append(nvml.facts(index))
        except GpuError as error:
            log.warning("GPU left out of discovery: %s", error)
    return tuple(gpus)
