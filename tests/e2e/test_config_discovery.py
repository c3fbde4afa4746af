"""mcpresd without --config reads the user's or the system's config file if it exists, and says which in its first
log line and in `mcpctl status`; `--check-config` validates and exits; `config show` prints the effective
configuration as TOML that loads back to the same configuration."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mcpresd import config
from mcpctl.client import Client, DaemonUnreachable
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.e2e

MCPRESD = str(Path(sys.executable).parent / "mcpresd")
NOBODY = 65534
BOUND_S = 60.0

FULL = """
socket_mode = "0660"
memory_reserve = "512M"
log_level = "debug"

[[resources]]
name = "licence:matlab"
capacity = 4
unit = "seats"
cost_per_unit_hour = 2.5
labels = { site = "lab", floating = true, tier = 2 }

[[pools]]
name = "builds"
factory = "slots"
parent = "licence:matlab"
slot_size = 1
min = 1
max = 3
cooldown = "2m"

[scheduler]
aging_interval = "90s"
preemption = true
default_strategy = "best-fit"

[monitor]
interval = "2s"
prometheus_file = "/var/lib/node_exporter/mcpres.prom"

[[alerts]]
name = "hot-gpu"
metric = "gpu.temperature_c"
selector = "*"
warning = 80
critical = 90
clear = 75
for = "30s"

[[alerts]]
name = "gpu-low-memory-free"
metric = "gpu.memory_used"
selector = "*"
warning = 1e9
below = true

[limits]
max_connections = 100
reply_buffer = "2M"
max_queued_per_uid = 10

[retention]
events_days = 7
key_expiry = "1h"

[enforce]
mode = "hard"
kill_grace = "2s"
"""


def mcpresd(*args: str, env: dict[str, str] | None = None, user: int | None = None,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [MCPRESD, *args]
    if user is not None:
        command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=BOUND_S, env=env, input=input)


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A short directory another user may enter (socket paths are limited to ~107 bytes)."""
    base = Path(tempfile.mkdtemp(prefix="svc-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


SITES = """
[metrics]
listen = "[::1]:9464"

[cluster]
partition = "de\\"bug"
account = "a'b\\\\c"
time_limit = "2h"
timeout = "30s"
command = ["ssh", "-o", "ProxyCommand=nc %h 22", "lo\\"gin\\nnode"]
"""


@pytest.mark.parametrize("text", ["", FULL, SITES], ids=["defaults", "full", "metrics-and-cluster"])
def test_config_show_round_trips(tmp_path: Path, text: str) -> None:
    given = tmp_path / "given.toml"
    given.write_text(text)

    shown = mcpresd("config", "show", "--config", str(given))
    written = tmp_path / "shown.toml"
    written.write_text(shown.stdout)
    again = mcpresd("config", "show", "--config", str(written))

    assert shown.returncode == 0, shown.stderr
    assert config.load(written) == config.load(given)
    assert again.stdout.split("\n", 1)[1] == shown.stdout.split("\n", 1)[1]  # all but the line naming the file
    assert "[limits]" in shown.stdout and "max_connections" in shown.stdout  # defaults included
    assert mcpresd("--check-config", str(written)).returncode == 0


def test_config_show_names_the_discovered_file(shared_tmp: Path) -> None:
    home = shared_tmp / "xdg"
    (home / "mcpres").mkdir(parents=True)
    (home / "mcpres" / "mcpresd.toml").write_text('log_level = "warning"\n')
    for path in (home, home / "mcpres", home / "mcpres" / "mcpresd.toml"):
        os.chown(path, NOBODY, NOBODY)

    shown = mcpresd("config", "show", user=NOBODY, env={"XDG_CONFIG_HOME": str(home), "HOME": str(shared_tmp)})

    assert shown.returncode == 0, shown.stderr
    assert f"{home}/mcpres/mcpresd.toml (user)" in shown.stdout.splitlines()[0]
    assert 'log_level = "warning"' in shown.stdout


@pytest.mark.parametrize("text, error", [
    ("sockett = 1\n", "unknown key(s) sockett"),
    ("[monitor]\ninterval = \"0.1s\"\n", "interval must be between 0.5s and 1h"),
    ("[[resources]\n", "is not valid TOML"),
])
def test_check_config_refuses_a_bad_file_with_exit_2(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)

    done = mcpresd("--check-config", str(path))

    assert done.returncode == 2
    assert error in done.stderr and str(path) in done.stderr
    assert done.stdout == ""


def test_check_config_accepts_the_shipped_sample() -> None:
    done = mcpresd("--check-config", str(ROOT / "config" / "mcpresd.toml"))

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{ROOT / 'config' / 'mcpresd.toml'}: valid"


def test_check_config_of_a_missing_file_exits_2(tmp_path: Path) -> None:
    done = mcpresd("--check-config", str(tmp_path / "none.toml"))

    assert done.returncode == 2 and "does not exist" in done.stderr


def test_check_config_without_a_file_checks_the_users_file(shared_tmp: Path) -> None:
    """nobody, no --config: ~/.config/mcpres/mcpresd.toml ($XDG_CONFIG_HOME unset), and its error if it has one."""
    home = shared_tmp / "home"
    config_file = home / ".config" / "mcpres" / "mcpresd.toml"
    config_file.parent.mkdir(parents=True)
    config_file.write_text('log_level = "loud"\n')
    for path in (home, home / ".config", config_file.parent, config_file):
        os.chown(path, NOBODY, NOBODY)

    bad = mcpresd("--check-config", user=NOBODY, env={"HOME": str(home)})
    config_file.write_text('log_level = "debug"\n')
    good = mcpresd("--check-config", user=NOBODY, env={"HOME": str(home)})

    assert bad.returncode == 2 and f"{config_file}: log_level: expected one of" in bad.stderr, bad.stderr
    assert good.returncode == 0 and good.stdout.strip() == f"{config_file}: valid", good.stderr


def test_a_relative_xdg_config_home_is_ignored_not_read_from_the_working_directory(shared_tmp: Path) -> None:
    """The XDG spec: a relative path is invalid and ignored; read from the cwd, it is whoever owns the cwd's file."""
    home = shared_tmp / "home"
    config_file = home / ".config" / "mcpres" / "mcpresd.toml"
    config_file.parent.mkdir(parents=True)
    config_file.write_text('log_level = "debug"\n')
    planted = shared_tmp / "cfg" / "mcpres" / "mcpresd.toml"
    planted.parent.mkdir(parents=True)
    planted.write_text('[metrics]\nlisten = "127.0.0.1:1"\n')
    for path in (home, home / ".config", config_file.parent, config_file):
        os.chown(path, NOBODY, NOBODY)

    done = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", MCPRESD,
                           "--check-config"], capture_output=True, text=True, timeout=BOUND_S, cwd=shared_tmp,
                          env={"HOME": str(home), "XDG_CONFIG_HOME": "cfg"})

    assert done.returncode == 0 and done.stdout.strip() == f"{config_file}: valid", done.stdout + done.stderr


def test_a_daemon_names_its_config_file_first_and_in_status(tmp_path: Path) -> None:
    given = tmp_path / "given.toml"
    given.write_text('[[resources]]\nname = "seat"\ncapacity = 3\n')
    sock = str(tmp_path / "d.sock")
    log = tmp_path / "log"
    with open(log, "wb") as out:
        daemon = subprocess.Popen([MCPRESD, "--config", str(given), "--socket", sock, "--db", str(tmp_path / "d.db")],
                                  stdout=out, stderr=out)
    try:
        _wait_for(sock, daemon, log)
        status = run_cli("status", "--json", socket_path=sock)
        text = run_cli("status", socket_path=sock)
    finally:
        daemon.terminate()
        daemon.wait(BOUND_S)

    assert f"config {given} (--config)" in log.read_text().splitlines()[0]
    assert json.loads(status.stdout)["config"] == {"path": str(given), "source": "--config"}
    assert f"config: {given} (--config)" in text.stdout


def test_a_root_daemon_without_a_system_file_runs_on_the_embedded_defaults(tmp_path: Path) -> None:
    if os.geteuid() != 0 or os.path.exists(config.SYSTEM_CONFIG):
        pytest.skip("needs root and no /etc/mcpres/mcpresd.toml")
    sock = str(tmp_path / "d.sock")
    log = tmp_path / "log"
    with open(log, "wb") as out:
        daemon = subprocess.Popen([MCPRESD, "--socket", sock, "--db", str(tmp_path / "d.db")], stdout=out, stderr=out)
    try:
        _wait_for(sock, daemon, log)
        status = run_cli("status", socket_path=sock)
    finally:
        daemon.terminate()
        daemon.wait(BOUND_S)

    assert "config (embedded defaults: no /etc/mcpres/mcpresd.toml)" in log.read_text().splitlines()[0]
    assert "config: embedded defaults (embedded defaults: no /etc/mcpres/mcpresd.toml)" not in status.stdout
    assert "config: embedded defaults: no /etc/mcpres/mcpresd.toml" in status.stdout, status.stdout


def _wait_for(sock: str, daemon: subprocess.Popen[bytes], log: Path) -> None:
    import time

    deadline = time.monotonic() + BOUND_S
    while time.monotonic() < deadline:
        assert daemon.poll() is None, f"mcpresd exited with {daemon.returncode}: {log.read_text()}"
        try:
            with Client(sock, timeout=5.0) as client:
                client.call("daemon.status")
                return
        except DaemonUnreachable:
            time.sleep(0.05)
    raise AssertionError(f"mcpresd did not answer on {sock} within {BOUND_S}s")


def test_config_show_help_has_an_example() -> None:
    done = mcpresd("config", "show", "--help")

    assert done.returncode == 0 and "mcpresd config show --config /etc/mcpres/mcpresd.toml" in done.stdout
