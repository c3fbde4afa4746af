"""The systemd units in systemd/: they verify without a warning, the system unit's exposure stays at 1.5 or
below (its score before Delegate=yes), and they keep what the daemon needs (NVML devices, /proc, real uids, a socket that outlives it)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

UNITS = ROOT / "systemd"
SYSTEM_SERVICE = UNITS / "mcpresd.service"
SOCKET = UNITS / "mcpresd.socket"
USER_SERVICE = UNITS / "user" / "mcpresd.service"
MAX_EXPOSURE = 1.5
"""`systemd-analyze security --offline=true` rated the system unit 1.5 before Delegate=yes; it must not rise."""

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None,
    reason="systemd-analyze is not installed (Debian/Ubuntu: apt-get install --no-install-recommends systemd)")


def directives(path: Path) -> dict[str, list[str]]:
    """Every `Key=value` of a unit file, in order; keys may repeat (DeviceAllow=, SystemCallFilter=)."""
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def exec_paths(*units: Path) -> list[str]:
    """The programs the units run (the first word of each Exec*= line)."""
    return [value.lstrip("-@:+!").split()[0] for unit in units for key, values in directives(unit).items()
            if key.startswith("Exec") for value in values]


def analyze(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def stub(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)


@needs_analyze
def test_the_system_service_is_exposed_at_most_1_5() -> None:
    done = analyze("security", "--offline=yes", str(SYSTEM_SERVICE))

    match = re.search(r"Overall exposure level for mcpresd\.service: (\d+\.\d)", done.stdout)
    assert match, done.stdout + done.stderr
    print(f"systemd-analyze security: exposure {match.group(1)}")
    assert float(match.group(1)) <= MAX_EXPOSURE, done.stdout


@needs_analyze
def test_the_system_service_and_socket_verify_without_a_warning(tmp_path: Path) -> None:
    # An image of the host's unit directory, so that verify checks ExecStart= against a stub, not the host.
    root = tmp_path / "root"
    host_units = next(p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir())
    shutil.copytree(host_units, root / "usr/lib/systemd/system", symlinks=True)
    for unit in (SYSTEM_SERVICE, SOCKET):
        (root / "etc/systemd/system").mkdir(parents=True, exist_ok=True)
        shutil.copy(unit, root / "etc/systemd/system" / unit.name)
    for program in exec_paths(SYSTEM_SERVICE, SOCKET):
        stub(root / program.lstrip("/"))

    done = analyze("verify", f"--root={root}", "mcpresd.service", "mcpresd.socket")

    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr


@needs_analyze
def test_the_user_service_verifies_without_a_warning(tmp_path: Path) -> None:
    home = tmp_path / "home"
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    stub(home / ".local/bin/mcpresd")  # %h/.local/bin/mcpresd
    missing = [p for p in exec_paths(USER_SERVICE) if not p.startswith("%h") and not os.access(p, os.X_OK)]
    assert not missing, f"not on this host: {missing}"

    done = analyze("--user", "verify", str(USER_SERVICE), env={"HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)})

    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr


def test_the_system_service_keeps_what_the_daemon_needs() -> None:
    service = directives(SYSTEM_SERVICE)

    assert service["Type"] == ["notify"] and service["NotifyAccess"] == ["main"]
    assert service["WatchdogSec"] == ["30"] and service["Restart"] == ["on-failure"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert "--socket /run/mcpres/mcpresd.sock" in service["ExecStart"][0]
    # NVML opens /dev/nvidiactl and /dev/nvidiaN: a device allow-list, never PrivateDevices=.
    assert "PrivateDevices" not in service and service["DevicePolicy"] == ["closed"]
    assert {"char-nvidiactl rw", "char-nvidia rw", "char-nvidia-uvm rw"} <= set(service["DeviceAllow"])
    # Holders are other users' processes, seen through /proc and SO_PEERCRED with their real uids.
    assert "PrivateUsers" not in service
    assert service["ProtectProc"] == ["default"] and service["ProcSubset"] == ["all"]
    assert service["CapabilityBoundingSet"] == [""]
    assert "RuntimeDirectory" not in service  # it would take the socket's directory away on every stop
    # Every connection is a descriptor: the daemon cannot raise its own limit under ~@resources.
    assert service["LimitNOFILE"] == ["65536"] and "~@privileged @resources" in service["SystemCallFilter"]


def test_the_socket_outlives_the_service_and_admits_the_mcpres_group() -> None:
    socket = directives(SOCKET)

    assert socket["ListenStream"] == ["/run/mcpres/mcpresd.sock"]
    assert socket["SocketMode"] == ["0660"] and socket["SocketGroup"] == ["mcpres"]
    assert "RuntimeDirectory" not in socket


def test_the_user_service_serves_where_mcpctl_looks_by_default() -> None:
    service = directives(USER_SERVICE)

    assert "--socket %t/mcpres/mcpresd.sock" in service["ExecStart"][0]  # %t is $XDG_RUNTIME_DIR
    assert service["Type"] == ["notify"] and service["StateDirectory"] == ["mcpresd"]


@pytest.mark.parametrize("unit", [SYSTEM_SERVICE, USER_SERVICE], ids=["system", "user"])
def test_a_start_that_a_restart_cannot_mend_is_not_restarted(unit: Path) -> None:
    # mcpresd exits 3 when the database or socket is another daemon's and 4 for a path it cannot use
    # (README, "The daemon"; tests/e2e/test_startup.py): restarting every RestartSec would only loop.
    service = directives(unit)

    assert service["Restart"] == ["on-failure"]
    assert service["RestartPreventExitStatus"] == ["3 4"]


def test_the_system_service_owns_a_delegated_cgroup_and_the_user_service_does_not() -> None:
    # The system daemon's subtree is its unit's cgroup; a per-user daemon's steps run in the user manager's
    # transient scopes (systemd-scope backend), which are not below the service.
    assert directives(SYSTEM_SERVICE)["Delegate"] == ["yes"]
    assert "Delegate" not in directives(USER_SERVICE)
