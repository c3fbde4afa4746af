"""A cgroup v1 subtree of its own for each enforcement test, removed with everything in it afterwards.

Tests skip, saying why, where there is no writable cgroup v1 memory and cpu hierarchy (not root, or a host
without them). Each test's subtree is `mcpres-test-<random>` under every controller, so tests running at the
same time never see each other's cgroups; a test that died before its clean-up leaves one the next run removes.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mcpresd.enforce import choose
from mcpresd.enforce.cgroup_v1 import CgroupV1

TEST_PREFIX = "mcpres-test-"


def v1_mounts() -> dict[str, Path]:
    mounts: dict[str, Path] = {}
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "cgroup":
            for controller in ("cpu", "cpuacct", "cpuset", "memory", "pids", "devices"):
                if controller in fields[3].split(","):
                    mounts[controller] = Path(fields[1])
    return mounts


def skip_unless_v1() -> dict[str, Path]:
    mounts = v1_mounts()
    if os.geteuid() != 0:
        pytest.skip("enforcement tests need root: the cgroup v1 hierarchies are writable only by root")
    if "memory" not in mounts or "cpu" not in mounts:
        pytest.skip("no cgroup v1 memory and cpu hierarchies on this host")
    return mounts


def remove_subtree(mounts: dict[str, Path], subtree: str) -> None:
    """Kill whatever is left in the subtree, then remove its directories, deepest first."""
    roots = sorted(set(mounts.values()))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = False
        for root in roots:
            base = root / subtree
            if not base.exists():
                continue
            try:
                found = [d for d in base.rglob("*") if d.is_dir()]
            except FileNotFoundError:  # a directory went while the walk was in it (the daemon removes its own)
                left = True
                continue
            for directory in sorted(found, key=lambda d: -len(d.parts)) + [base]:
                try:
                    pids = [int(p) for p in (directory / "cgroup.procs").read_text().split()]
                except OSError:
                    pids = []
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                try:
                    directory.rmdir()
                except FileNotFoundError:
                    pass
                except OSError:
                    left = True
        if not left:
            return
        time.sleep(0.05)
    raise AssertionError(f"cgroup subtree {subtree} could not be removed")


def remove_stale_test_subtrees(mounts: dict[str, Path]) -> None:
    """Subtrees of earlier test runs that died before cleaning up (no process left in them)."""
    for root in set(mounts.values()):
        for entry in root.glob(f"{TEST_PREFIX}*"):
            try:
                if time.time() - entry.stat().st_mtime > 3600:
                    remove_subtree(mounts, entry.name)
            except (OSError, AssertionError):
                continue


@pytest.fixture
def cgroup_subtree() -> Iterator[str]:
    """The name of a fresh cgroup subtree for one test; removed, with its processes, after it."""
    mounts = skip_unless_v1()
    remove_stale_test_subtrees(mounts)
    subtree = TEST_PREFIX + os.urandom(4).hex()
    try:
        yield subtree
    finally:
        remove_subtree(mounts, subtree)


@pytest.fixture
def v1(cgroup_subtree: str) -> CgroupV1:
    chosen = choose(cgroup_subtree)
    if not isinstance(chosen, CgroupV1):
        pytest.skip(f"this host's enforcement backend is {chosen.name}, not cgroup v1 ({chosen.why_not})")
    return chosen


def wait_for(predicate, timeout: float = 10.0, what: str = "the condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
