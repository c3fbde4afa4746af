"""favordynmods (mcpresd.enforce.dynmods): which cgroup2 mounts there are, and what a user is told."""

from __future__ import annotations

import os
from pathlib import Path

from mcpresd.enforce.dynmods import Cgroup2Mount, cgroup2_mounts, ensure, state

HYBRID = """\
25 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
35 31 0:30 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,memory
"""
UNIFIED = ("29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 "
           "rw,nsdelegate,favordynmods,memory_recursiveprot\n")
ESCAPED = "40 31 0:38 / /run/my\\040cgroups rw,relatime - cgroup2 none rw\n"


def test_the_cgroup2_mounts_are_read_with_their_superblock_options_without_rw():
    assert cgroup2_mounts(HYBRID) == [Cgroup2Mount("/sys/fs/cgroup/unified", ("nsdelegate",))]
    [unified] = cgroup2_mounts(UNIFIED)
    assert unified.options == ("nsdelegate", "favordynmods", "memory_recursiveprot") and unified.favoured


def test_a_mount_point_with_an_escaped_space_is_read_as_its_path():
    assert cgroup2_mounts(ESCAPED) == [Cgroup2Mount("/run/my cgroups", ())]


def test_state_says_on_off_or_why_it_cannot_be_set(tmp_path: Path):
    info = tmp_path / "mountinfo"
    info.write_text(UNIFIED)
    assert state(str(info)) == (True, "on (/sys/fs/cgroup)")
    info.write_text(HYBRID)
    assert state(str(info)) == (False, "off (/sys/fs/cgroup/unified)")
    info.write_text(HYBRID.replace("cgroup2 cgroup2", "tmpfs tmpfs"))
    on, said = state(str(info))
    assert not on and "cgroup_favordynmods=true" in said
    assert state(str(tmp_path / "missing"))[1].startswith("cannot read")


def test_ensure_changes_nothing_where_it_is_on_or_cannot_be_set(tmp_path: Path):
    info = tmp_path / "mountinfo"
    info.write_text(UNIFIED)
    assert ensure(str(info)) == "on (/sys/fs/cgroup)"
    info.write_text(HYBRID.replace("cgroup2 cgroup2", "tmpfs tmpfs"))
    assert "boot with cgroup_favordynmods=true" in ensure(str(info))


def test_a_mount_point_with_non_ascii_characters_and_an_escape_is_read_as_its_path():
    # mountinfo escapes a space, tab, newline and backslash in octal and leaves UTF-8 as it is: undoing the
    # escapes must not read the UTF-8 bytes as Latin-1 (fspick would be given a path that does not exist).
    line = "40 31 0:38 / /run/cgröups\\040de\\134l'équipe rw,relatime - cgroup2 none rw,nsdelegate\n"
    assert cgroup2_mounts(line) == [Cgroup2Mount("/run/cgröups de\\l'équipe", ("nsdelegate",))]


def test_a_mount_point_that_is_not_utf8_neither_stops_the_reading_nor_is_misread(tmp_path: Path):
    # Any mount's path is bytes (a disk labelled in Latin-1, say): one line that is not UTF-8 must not make the
    # file unreadable (the daemon reads it at start), and a cgroup2 mount there keeps its exact bytes.
    info = tmp_path / "mountinfo"
    info.write_bytes(b"50 25 8:1 / /media/caf\xe9 rw,relatime - vfat /dev/sdb1 rw\n" + HYBRID.encode()
                     + b"41 31 0:38 / /run/cg\xe9\\040x rw - cgroup2 cgroup2 rw\n")
    assert state(str(info)) == (False, "off (/sys/fs/cgroup/unified)")
    assert [os.fsencode(m.path) for m in cgroup2_mounts(info.read_bytes().decode(errors="surrogateescape"))] == \
        [b"/sys/fs/cgroup/unified", b"/run/cg\xe9 x"]


def test_ensure_says_why_and_raises_nothing_where_the_mount_is_gone(tmp_path: Path):
    # A cgroup2 mount that mountinfo lists but that is gone by the time it is set (or never was): the daemon
    # starts and says why, with nothing changed.
    info = tmp_path / "mountinfo"
    gone = tmp_path / "no-such-cgroup2"
    info.write_text(f"40 31 0:38 / {gone} rw,relatime - cgroup2 cgroup2 rw,nsdelegate\n")
    said = ensure(str(info))
    assert said.startswith(f"off ({gone}: ") and "RCU grace period" in said
