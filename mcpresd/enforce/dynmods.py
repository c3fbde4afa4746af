"""favordynmods: moving a process into a cgroup without waiting for an RCU grace period.

Writing a pid to `cgroup.procs` (v1 or v2) write-locks the kernel's global `cgroup_threadgroup_rwsem`. In its
default per-CPU mode, each write lock taken after a quiet spell waits for an RCU grace period first: 5 to 20 ms
measured on this project's machines, nearly all of what `mcpctl run --enforce` adds to a command's start. The
cgroup2 mount option `favordynmods` (Linux >= 6.0) keeps the lock out of per-CPU mode, so a migration takes
about 0.2 ms; forks and exits then take the lock's ordinary read side (every kernel from 4.6 to 5.19 ran in
that mode by default; from 6.18 the option switches to a per-thread-group lock instead). The lock is shared by
every hierarchy, so the option set on a hybrid layout's cgroup2 mount speeds cgroup v1 migrations too.

`enable()` sets it with the new mount API (fspick, fsconfig, reconfigure) on the superblock only: the mount's
own flags (nosuid, nodev, noexec) are untouched, and every cgroup2 option the mount has (nsdelegate,
memory_recursiveprot, ...) is passed again, since a cgroup2 reconfigure sets exactly the options it is given.
A kernel that refuses any of them changes nothing. Linux 6.18 cannot turn the mode off again before a reboot.
With no cgroup2 mount (pure v1) the option cannot be set at run time: boot with `cgroup_favordynmods=true`.
"""

from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass
from pathlib import Path

OPTION = "favordynmods"
_OCTAL = re.compile(r"\\([0-7]{3})")
"""mountinfo's escapes (space, tab, newline, backslash); the rest of a path is as it is, UTF-8 included."""

# The new mount API's syscalls have one number on every architecture (424 and above are shared).
_SYS_FSCONFIG = 431
_SYS_FSPICK = 433
_FSPICK_CLOEXEC = 0x1
_FSCONFIG_SET_FLAG = 0
_FSCONFIG_CMD_RECONFIGURE = 7


@dataclass(frozen=True)
class Cgroup2Mount:
    """A cgroup2 mount as /proc/self/mountinfo gives it: where, and its superblock's options (rw/ro left out)."""

    path: str
    options: tuple[str, ...]

    @property
    def favoured(self) -> bool:
        return OPTION in self.options


def cgroup2_mounts(mountinfo: str) -> list[Cgroup2Mount]:
    """The cgroup2 mounts in a /proc/PID/mountinfo text (its fields: ... mount point (5th) ... ` - ` fstype
    source super-options), the mount point's octal escapes undone."""
    found = []
    for line in mountinfo.splitlines():
        head, separator, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if not separator or len(fields) < 5 or len(rest) < 3 or rest[0] != "cgroup2":
            continue
        path = _OCTAL.sub(lambda m: chr(int(m[1], 8)), fields[4]) if "\\" in fields[4] else fields[4]
        found.append(Cgroup2Mount(path, tuple(o for o in rest[2].split(",") if o and o not in ("rw", "ro"))))
    return found


def _read(mountinfo_path: str) -> str:
    """The mountinfo text; paths are bytes, not always UTF-8 (a disk's label): undecodable ones as os.fsdecode
    gives them, so that os.fsencode gives back the exact path."""
    return os.fsdecode(Path(mountinfo_path).read_bytes())


def state(mountinfo_path: str = "/proc/self/mountinfo") -> tuple[bool, str]:
    """(on, what to tell a user): whether a cgroup2 mount has favordynmods, or why it cannot be known or set."""
    return _judge(mountinfo_path)[:2]


def _judge(mountinfo_path: str) -> tuple[bool, str, Cgroup2Mount | None]:
    """`state`, and the mount to set it on where it is off (None where it is on or cannot be set)."""
    try:
        mounts = cgroup2_mounts(_read(mountinfo_path))
    except OSError as error:
        return False, f"cannot read {mountinfo_path}: {error.strerror}", None
    if not mounts:
        return False, "no cgroup2 mount to set it on (pure cgroup v1): boot with cgroup_favordynmods=true", None
    if any(mount.favoured for mount in mounts):
        return True, f"on ({next(m.path for m in mounts if m.favoured)})", None
    return False, f"off ({mounts[0].path})", mounts[0]


def enable(mount: Cgroup2Mount) -> None:
    """Reconfigure `mount`'s superblock with favordynmods and the options it has; raises OSError (and changes
    nothing) where the kernel refuses, e.g. without CAP_SYS_ADMIN or before Linux 6.0."""
    reconfigure(mount.path, [*[o for o in mount.options if o != OPTION], OPTION])


def reconfigure(path: str, options: list[str]) -> None:
    """Set a cgroup2 superblock's options to exactly `options` (flags: nsdelegate, favordynmods, ...), leaving
    the mount's own flags alone; nothing changes unless the kernel takes every one."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long

    def check(result: int, what: str) -> int:
        if result < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"{what}: {os.strerror(errno)}")
        return result

    fd = check(libc.syscall(ctypes.c_long(_SYS_FSPICK), ctypes.c_int(-100), os.fsencode(path),
                            ctypes.c_uint(_FSPICK_CLOEXEC)), f"fspick {path}")
    try:
        for option in options:
            check(libc.syscall(ctypes.c_long(_SYS_FSCONFIG), ctypes.c_int(fd), ctypes.c_uint(_FSCONFIG_SET_FLAG),
                               option.encode(), None, ctypes.c_int(0)), f"cgroup2 option {option}")
        check(libc.syscall(ctypes.c_long(_SYS_FSCONFIG), ctypes.c_int(fd), ctypes.c_uint(_FSCONFIG_CMD_RECONFIGURE),
                           None, None, ctypes.c_int(0)), f"reconfigure {path}")
    finally:
        os.close(fd)


def ensure(mountinfo_path: str = "/proc/self/mountinfo") -> str:
    """Turn favordynmods on where it is off and a cgroup2 mount allows it; returns what to log and show. Never
    raises: whatever goes wrong (a mount gone meanwhile, mountinfo unreadable) is said, and nothing else changes."""
    _, said, mount = _judge(mountinfo_path)
    if mount is None:
        return said
    try:
        enable(mount)
        after = next((m for m in cgroup2_mounts(_read(mountinfo_path)) if m.path == mount.path), None)
    except OSError as error:
        return f"off ({mount.path}: {error.strerror}); task migrations wait for an RCU grace period"
    if after is None or not after.favoured or not set(mount.options) <= set(after.options):
        return f"off ({mount.path}: the kernel did not keep it)"
    return f"on ({mount.path}, set at start)"
