"""The systemd-scope backend against real things short of a user manager (this machine has none):

- the command line mcpctl execs is parsed by the real `systemd-run`, talking to a private D-Bus bus that has no
  systemd on it: every property is checked by systemd-run itself before it asks for the unit, so a refused one
  says `Unknown assignment` or `invalid`, an accepted set gets as far as `Failed to start transient scope unit`;
- the daemon's reading of a scope's cgroup: found through /proc/PID/cgroup of the step in a fake /proc, read
  from a fake cgroup v2 tree (the v2 file names).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mcpctl.launch import systemd_run_argv
from mcpresd.core.enforcement import Grant, limits_for
from mcpresd.enforce import StepScopes
from mcpresd.enforce.systemd_scope import SystemdScope, probe
from mcpresd.protocol import EnforceMode

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""
MIB = 1 << 20


@pytest.fixture
def private_bus() -> Iterator[str]:
    """A session bus of its own (no service files: nothing is activated on it); its address."""
    if shutil.which("dbus-daemon") is None or shutil.which("systemd-run") is None:
        pytest.skip("needs dbus-daemon and systemd-run (Debian: apt-get install dbus systemd)")
    directory = Path(tempfile.mkdtemp(prefix="scope-bus-"))
    config = directory / "bus.conf"
    config.write_text(BUS_CONFIG.format(socket=directory / "bus"))
    started = subprocess.run(["dbus-daemon", f"--config-file={config}", "--fork", "--print-pid=1"],
                             capture_output=True, text=True, timeout=30, check=True)
    pid = int(started.stdout.split()[0])
    try:
        yield f"unix:path={directory / 'bus'}"
    finally:
        os.kill(pid, signal.SIGTERM)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize(("mode", "grant"), [
    (EnforceMode.SOFT, Grant(cpu=0.5, memory=64 * MIB)),
    (EnforceMode.SOFT, Grant(cpu=96, memory=1 << 40)),
    (EnforceMode.HARD, Grant(cpu=1.5, memory=128 * MIB)),
    (EnforceMode.HARD, Grant(cpu=0.33333, memory=3 * MIB + 1)),
    (EnforceMode.HARD, Grant(cpu=2, cores=(0, 3))),
], ids=["soft", "soft-large", "hard", "hard-fractions", "hard-cores"])
def test_the_real_systemd_run_accepts_every_property_of_a_step(private_bus: str, mode, grant):
    backend = SystemdScope("mcpres", Path("/sys/fs/cgroup"), slice_dir=None, controllers=(), why="test")
    scope = backend.step("0a1b2c3d4e5f6a7b", 4242, limits_for(mode, grant), kill_grace=2.5)

    done = subprocess.run(systemd_run_argv(dict(scope), ["true"]), capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DBUS_SESSION_BUS_ADDRESS": private_bus})

    # Past argument and property parsing, systemd-run asks the bus for systemd, which is not there.
    assert "Failed to start transient scope unit" in done.stderr, done.stderr
    assert done.returncode != 0


def test_the_real_systemd_run_refuses_what_systemd_would_not_take(private_bus: str):
    # The check above can fail: a property systemd does not take is refused before the bus is asked.
    scope = {"unit": "alloc-1-2.scope", "slice": "mcpres.slice", "properties": ["CPUQuota=33.333%"]}

    done = subprocess.run(systemd_run_argv(scope, ["true"]), capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DBUS_SESSION_BUS_ADDRESS": private_bus})

    assert "invalid" in done.stderr and "Failed to start transient scope unit" not in done.stderr, done.stderr


def _scope_tree(root: Path, unit: str, cpu_usec: int, current: int, peak: int, oom: int = 0) -> Path:
    directory = root / "cgroup/user.slice/user-1000.slice/user@1000.service/mcpres.slice" / unit
    directory.mkdir(parents=True)
    (directory / "cpu.stat").write_text(f"usage_usec {cpu_usec}\nuser_usec 1\nsystem_usec 1\n")
    (directory / "memory.current").write_text(f"{current}\n")
    (directory / "memory.peak").write_text(f"{peak}\n")
    (directory / "memory.events").write_text(f"low 0\nhigh 0\nmax 0\noom 0\noom_kill {oom}\n")
    (directory / "cgroup.procs").write_text("")
    return directory


def _step(proc: Path, pid: int, path: str) -> None:
    (proc / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "cgroup").write_text(f"0::{path}\n")


def test_a_steps_use_is_read_from_the_scope_its_proc_entry_names_and_kept_when_the_scope_ends(tmp_path: Path):
    proc, mount = tmp_path / "proc", tmp_path / "cgroup"
    backend = SystemdScope("mcpres", mount, slice_dir=None, controllers=("cpu", "memory", "pids"), why="test",
                           proc=str(proc))
    assert isinstance(backend, StepScopes)
    first = _scope_tree(tmp_path, "alloc-a1-100.scope", cpu_usec=2_500_000, current=10 * MIB, peak=30 * MIB, oom=1)
    second = _scope_tree(tmp_path, "alloc-a1-200.scope", cpu_usec=500_000, current=5 * MIB, peak=6 * MIB)
    (first / "cgroup.procs").write_text("100\n101\n")
    prefix = "/user.slice/user-1000.slice/user@1000.service/mcpres.slice/"
    _step(proc, 100, prefix + "alloc-a1-100.scope")
    _step(proc, 200, prefix + "alloc-a1-200.scope")
    _step(proc, 300, "/user.slice/user-1000.slice/session-2.scope")  # its systemd-run has not started the scope
    backend.create("a1", limits_for(EnforceMode.HARD, Grant(cpu=1, memory=64 * MIB)))
    for pid in (100, 200, 300):
        backend.move("a1", pid)

    used = backend.usage("a1")
    assert used is not None
    assert (used.cpu_seconds, used.memory_current, used.memory_peak, used.oom_kills) == \
        (3.0, 15 * MIB, 36 * MIB, 1)
    assert backend.pids("a1") == {100, 101}
    assert backend.existing() == {"a1"} and backend.exists("a1")

    shutil.rmtree(first)  # the step ended: systemd removed its scope
    used = backend.usage("a1")
    assert used is not None
    assert (used.cpu_seconds, used.memory_current, used.memory_peak) == (3.0, 5 * MIB, 36 * MIB)
    assert backend.remove("a1") and not backend.exists("a1")
    assert backend.usage("a1") is None


def test_scopes_left_from_before_a_restart_are_found_in_the_slice(tmp_path: Path):
    _scope_tree(tmp_path, "alloc-b2-4242.scope", cpu_usec=1_000_000, current=MIB, peak=2 * MIB)
    slice_dir = tmp_path / "cgroup/user.slice/user-1000.slice/user@1000.service/mcpres.slice"
    (slice_dir / "run-r0123.scope").mkdir()  # not an allocation's
    backend = SystemdScope("mcpres", tmp_path / "cgroup", slice_dir=slice_dir, controllers=("cpu", "memory"),
                           why="test", proc=str(tmp_path / "proc"))

    assert backend.existing() == {"b2"}
    used = backend.usage("b2")
    assert used is not None and used.cpu_seconds == 1.0 and used.memory_peak == 2 * MIB
    assert backend.why_not == "the user manager delegates no cpuset, pids controller: AllowedCPUs is not applied"


def _fake_systemd_run(bin_dir: Path, body: str) -> None:
    bin_dir.mkdir()
    (bin_dir / "systemd-run").write_text("#!/bin/sh\n" + body)
    (bin_dir / "systemd-run").chmod(0o755)


def test_the_start_up_probe_finds_the_slice_and_the_controllers_the_user_manager_has(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # What `cat /proc/self/cgroup` prints in a scope of a user manager (systemd 252, Debian 12), replayed.
    manager = tmp_path / "cgroup/user.slice/user-1000.slice/user@1000.service"
    manager.mkdir(parents=True)
    (manager / "cgroup.controllers").write_text("cpu memory pids\n")  # the slice itself is gone with the probe
    _fake_systemd_run(tmp_path / "bin", 'echo "0::/user.slice/user-1000.slice/user@1000.service/mcpres.slice/'
                                        'run-r5e1.scope"\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")

    found = probe("mcpres", tmp_path / "cgroup")

    assert isinstance(found, SystemdScope)
    assert found.slice_dir == manager / "mcpres.slice"
    assert found.controllers == ("cpu", "memory", "pids")
    assert found.why_not == "the user manager delegates no cpuset controller: AllowedCPUs is not applied"


def test_the_start_up_probe_says_why_systemd_run_cannot_be_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _fake_systemd_run(tmp_path / "bin", 'echo "Failed to connect to bus: No medium found" >&2\nexit 1\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")

    assert probe("mcpres", tmp_path) == \
        "systemd-run --user cannot start a scope (Failed to connect to bus: No medium found)"
    assert probe("mcpres", None) == \
        "no cgroup v2 hierarchy is mounted, so a user manager's scopes cannot be limited"
