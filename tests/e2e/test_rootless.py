"""A per-user daemon (uid 65534 through setpriv: it may write no cgroup here) and its user's `mcpctl`, with the
systemd-scope backend.

This machine has no systemd user manager, so a FAKE `systemd-run` and `systemctl` come first on PATH: each records
its argv (one JSON list a line) and systemd-run execs the command after `--`, as the real one does once the scope
exists. What is checked is what the daemon and mcpctl hand to systemd (units, properties, stop) and that the exit
status passes through; the properties themselves are checked against the real systemd-run in
tests/integration/test_systemd_scope.py. Without the fake, the real systemd-run (no user bus) is refused, and the
daemon says so.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CONFIG, DaemonProcess

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    os.getuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to run a per-user daemon")]

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
MCPCTL = str(Path(sys.executable).parent / "mcpctl")
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
"""The fakes' interpreter: nobody cannot exec this venv's python (it lives under root's 0700 home) from its own
processes; setpriv itself can, so the daemon and mcpctl are started by setpriv directly."""
FAKE = """#!{python}
import json, os, sys
with open({log!r}, "a") as log:
    log.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + "\\n")
if "--" in sys.argv:
    command = sys.argv[sys.argv.index("--") + 1:]
    os.execvp(command[0], command)
"""
PROBE = ["systemd-run", "--user", "--scope", "--quiet", "--collect", "--slice=mcpres.slice", "--", "cat",
         "/proc/self/cgroup"]
ALWAYS = ["--property=CPUAccounting=yes", "--property=MemoryAccounting=yes", "--property=TimeoutStopSec=5000ms"]


class UserDaemon:
    """A DaemonProcess run as nobody in a directory of nobody's, with the fake systemd first on its PATH (and on
    the PATH of the mcpctl run here as nobody)."""

    def __init__(self, base: Path, fake: bool) -> None:
        self.home = base / "u"
        self.home.mkdir(mode=0o700)
        os.chown(self.home, NOBODY, NOBODY)
        self.log = self.home / "systemd.jsonl"
        bin_dir = base / "bin"
        bin_dir.mkdir()
        for name in ("systemd-run", "systemctl"):
            (bin_dir / name).write_text(FAKE.format(python=SYSTEM_PYTHON, log=str(self.log)))
            (bin_dir / name).chmod(0o755)
        self.path = f"{bin_dir}:{os.environ['PATH']}" if fake else os.environ["PATH"]
        self.daemon = DaemonProcess(self.home, config=CONFIG, env={"PATH": self.path})
        self.daemon.args = [*AS_NOBODY, *self.daemon.args]
        # Migrated here, so that the daemon needs no child interpreter (python -m mcpresd.store) to open it.
        state = Path(self.daemon.db).parent
        state.mkdir(mode=0o700)
        subprocess.run([sys.executable, "-m", "mcpresd.store", self.daemon.db], check=True, timeout=60)
        for path in (state, *state.iterdir()):
            os.chown(path, NOBODY, NOBODY)

    def mcpctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PATH": self.path, "MCPRES_SOCKET": self.daemon.socket}
        return subprocess.run([*AS_NOBODY, MCPCTL, *args], capture_output=True, text=True, env=env,
                              timeout=timeout)

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def wait_for_call(self, wanted: list[str], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while wanted not in self.calls():
            assert time.monotonic() < deadline, f"no {wanted} in {self.calls()}\n{self.daemon.log()}"
            time.sleep(0.05)


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory nobody may enter (pytest's tmp_path is root's alone)."""
    directory = Path(tempfile.mkdtemp(prefix="rootless-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def user_daemon(base: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[UserDaemon]:
    monkeypatch.setenv("MCPRES_TRUSTED_UID", str(NOBODY))  # this test's own Client (root) talks to it too
    daemon = UserDaemon(base, fake=True)
    daemon.daemon.start(timeout=60)
    try:
        yield daemon
    finally:
        daemon.daemon.stop()


@pytest.fixture
def holder() -> Iterator[int]:
    """A process of nobody's, to hold an allocation."""
    process = subprocess.Popen([*AS_NOBODY, "sleep", "120"])
    try:
        deadline = time.monotonic() + 30
        while os.stat(f"/proc/{process.pid}").st_uid != NOBODY:  # until setpriv has become nobody
            assert time.monotonic() < deadline, "setpriv did not become nobody"
            time.sleep(0.01)
        yield process.pid
    finally:
        process.kill()
        process.wait(timeout=30)


def status(daemon: UserDaemon) -> dict[str, Any]:
    done = daemon.mcpctl("status", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["enforcement"]  # type: ignore[no-any-return]


def test_a_daemon_that_cannot_write_cgroups_chooses_scopes_when_systemd_run_works(user_daemon: UserDaemon):
    enforcement = status(user_daemon)

    assert enforcement["backend"] == "systemd-scope" and enforcement["mode"] == "soft"
    assert enforcement["slice"] == "mcpres.slice"
    assert f"uid {NOBODY}" in enforcement["why"] and "systemd-run --user starts scopes" in enforcement["why"]
    assert "`mcpctl allocate` is a reservation (advisory)" in enforcement["advisory"]
    # The fake ran `cat` in the daemon's own cgroup, not in a scope of mcpres.slice: nothing confirms the limits.
    assert enforcement["controllers"] == [] and "not visible" in enforcement["why_not"]
    assert user_daemon.calls() == [PROBE]  # one probe at start-up
    shown = user_daemon.mcpctl("status")
    assert "enforcement: soft (max hard) by systemd-scope" in shown.stdout and "advisory" in shown.stdout


def test_without_a_user_manager_the_daemon_says_why_nothing_is_enforced(base: Path, monkeypatch: pytest.MonkeyPatch):
    if shutil.which("systemd-run") is None:
        pytest.skip("systemd-run is not installed")
    monkeypatch.setenv("MCPRES_TRUSTED_UID", str(NOBODY))
    daemon = UserDaemon(base, fake=False)  # the real systemd-run: no user bus for nobody here
    daemon.daemon.start(timeout=60)
    try:
        enforcement = status(daemon)
    finally:
        daemon.daemon.stop()

    assert enforcement["backend"] == "none"
    assert "systemd-run --user cannot start a scope" in enforcement["why_not"]


@pytest.mark.parametrize(("request_args", "properties"), [
    (["--cpu", "0.5", "--mem", "64M", "--enforce", "soft"],
     ["--property=CPUWeight=50", "--property=MemoryHigh=67108864"]),
    (["--cpu", "1.5", "--mem", "128M", "--enforce", "hard"],
     ["--property=CPUWeight=150", "--property=CPUQuota=150%", "--property=MemoryMax=134217728",
      "--property=MemorySwapMax=0", "--property=TasksMax=4096"]),
], ids=["soft", "hard"])
def test_run_starts_the_command_in_a_scope_with_its_modes_properties_and_passes_its_exit_status(
        user_daemon: UserDaemon, request_args: list[str], properties: list[str]):
    command = ["sh", "-c", 'echo "$MCPRES_ALLOCATION_ID $$"; exit 7']

    done = user_daemon.mcpctl("run", *request_args, "--", *command)

    assert done.returncode == 7, done.stderr
    allocation_id, pid = done.stdout.split()
    unit = f"alloc-{allocation_id}-{pid}.scope"  # $$ is the step: systemd-run became the command, same pid
    assert user_daemon.calls()[1:2] == [["systemd-run", "--user", "--scope", "--quiet", "--collect", f"--unit={unit}",
                                         "--slice=mcpres.slice", *ALWAYS, *properties, "--", *command]]
    user_daemon.wait_for_call(["systemctl", "--user", "stop", unit])  # the allocation ended: its scope is stopped


def test_run_with_enforcement_off_starts_no_scope(user_daemon: UserDaemon):
    done = user_daemon.mcpctl("run", "--cpu", "1", "--enforce", "off", "--", "sh", "-c", "exit 3")

    assert done.returncode == 3, done.stderr
    assert user_daemon.calls() == [PROBE]


def test_a_command_that_cannot_run_exits_127_or_126_without_starting_a_scope(user_daemon: UserDaemon):
    not_executable = user_daemon.home / "data.txt"
    not_executable.write_text("not a program\n")
    not_executable.chmod(0o644)

    missing = user_daemon.mcpctl("run", "--cpu", "1", "--", "no-such-command-here")
    refused = user_daemon.mcpctl("run", "--cpu", "1", "--", str(not_executable))

    assert missing.returncode == 127 and "cannot run 'no-such-command-here'" in missing.stderr
    assert refused.returncode == 126 and "Permission denied" in refused.stderr
    assert [call for call in user_daemon.calls() if call[:1] == ["systemd-run"]] == [PROBE]


def test_each_step_of_an_allocation_gets_a_scope_and_the_release_stops_them(user_daemon: UserDaemon,
                                                                          holder: int):
    allocated = user_daemon.mcpctl("allocate", "--cpu", "1", "--mem", "64M", "--enforce", "hard",
                                   "--holder-pid", str(holder))
    assert allocated.returncode == 0, allocated.stderr
    allocation_id = allocated.stdout.strip()

    step = user_daemon.mcpctl("run", "--allocation", allocation_id, "--", "sh", "-c", "echo $$; exit 5")

    assert step.returncode == 5, step.stderr
    unit = f"alloc-{allocation_id}-{step.stdout.strip()}.scope"
    started = [call for call in user_daemon.calls() if call[:1] == ["systemd-run"]][1:]
    assert started == [["systemd-run", "--user", "--scope", "--quiet", "--collect", f"--unit={unit}",
                        "--slice=mcpres.slice", *ALWAYS, "--property=CPUWeight=100", "--property=CPUQuota=100%",
                        "--property=MemoryMax=67108864", "--property=MemorySwapMax=0", "--property=TasksMax=4096",
                        "--", "sh", "-c", "echo $$; exit 5"]]
    assert ["systemctl", "--user", "stop", unit] not in user_daemon.calls()  # a step's end is not the allocation's
    released = user_daemon.mcpctl("release", allocation_id)
    assert released.returncode == 0, released.stderr
    user_daemon.wait_for_call(["systemctl", "--user", "stop", unit])


def test_allocate_naming_a_holder_stays_advisory_and_says_so(user_daemon: UserDaemon, holder: int):
    done = user_daemon.mcpctl("allocate", "--cpu", "1", "--enforce", "hard", "--holder-pid", str(holder))

    assert done.returncode == 0, done.stderr
    allocation_id = done.stdout.strip()
    assert len(allocation_id) == 16  # stdout is the id alone
    assert f"pid {holder} was not moved into a cgroup" in done.stderr
    assert f"allocation {allocation_id} is a reservation (advisory)" in done.stderr
    assert [call for call in user_daemon.calls() if call[:1] == ["systemd-run"]] == [PROBE]


def test_a_signal_to_mcpctl_reaches_the_command_in_its_scope(user_daemon: UserDaemon):
    env = {**os.environ, "PATH": user_daemon.path, "MCPRES_SOCKET": user_daemon.daemon.socket}
    run = subprocess.Popen([*AS_NOBODY, MCPCTL, "run", "--cpu", "1", "--enforce", "hard", "--", "sh", "-c",
                            'trap "exit 42" TERM; echo ready; while :; do sleep 0.1; done'],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert run.stdout is not None
        assert run.stdout.readline() == "ready\n"  # the command runs (through the fake systemd-run)
        run.send_signal(signal.SIGTERM)  # setpriv exec'd mcpctl: this is mcpctl's pid
        assert run.wait(timeout=60) == 42
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(timeout=30)
    assert [call[:3] for call in user_daemon.calls() if call[:1] == ["systemd-run"]][1:] == \
        [["systemd-run", "--user", "--scope"]]
