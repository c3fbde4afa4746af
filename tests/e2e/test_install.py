"""`mcpresd install` / `uninstall` into a temporary root: units whose ExecStart runs this interpreter's mcpresd,
the sample config when there is none, and units that `systemd-analyze verify` and `security --offline` accept."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.test_systemd_units import MAX_EXPOSURE, analyze, directives, exec_paths, needs_analyze, stub

pytestmark = pytest.mark.e2e

MCPRESD = str(Path(sys.executable).parent / "mcpresd")
BOUND_S = 60.0


def mcpresd(*args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("XDG_CONFIG_HOME", None)
    if home is not None:
        env["HOME"] = str(home)
    return subprocess.run([MCPRESD, *args], capture_output=True, text=True, timeout=BOUND_S, env=env)


def installed(root: Path, *args: str, home: Path | None = None) -> dict[str, object]:
    done = mcpresd("install", *args, "--root", str(root), "--json", home=home)
    assert done.returncode == 0, done.stderr
    report: dict[str, object] = json.loads(done.stdout)
    return report


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_a_system_install_writes_units_running_this_mcpresd_and_the_sample_config(tmp_path: Path) -> None:
    report = installed(tmp_path, "--system")

    assert files(tmp_path) == {"etc/systemd/system/mcpresd.service", "etc/systemd/system/mcpresd.socket",
                               "etc/mcpres/mcpresd.toml"}
    service = directives(tmp_path / "etc/systemd/system/mcpresd.service")
    assert service["ExecStart"] == [f"{MCPRESD} --config /etc/mcpres/mcpresd.toml --socket /run/mcpres/mcpresd.sock"]
    assert report["exec"] == MCPRESD and report["systemctl"] == []
    assert (tmp_path / "etc/mcpres/mcpresd.toml").read_text() == (Path(__file__).parents[2] / "config/mcpresd.toml"
                                                                  ).read_text()
    assert mcpresd("--check-config", str(tmp_path / "etc/mcpres/mcpresd.toml")).returncode == 0


def test_a_user_install_goes_under_the_users_config_home(tmp_path: Path) -> None:
    home = Path("/home/ann")
    root = tmp_path / "root"
    root.mkdir()

    installed(root, "--user", home=home)

    assert files(root) == {"home/ann/.config/systemd/user/mcpresd.service", "home/ann/.config/mcpres/mcpresd.toml"}
    service = directives(root / "home/ann/.config/systemd/user/mcpresd.service")
    assert service["ExecStart"] == [f"{MCPRESD} --config %E/mcpres/mcpresd.toml --socket %t/mcpres/mcpresd.sock"]


def test_installing_again_keeps_an_edited_config_and_uninstall_keeps_it_too(tmp_path: Path) -> None:
    installed(tmp_path, "--system")
    config = tmp_path / "etc/mcpres/mcpresd.toml"
    config.write_text('log_level = "debug"\n')

    again = installed(tmp_path, "--system")
    removed = mcpresd("uninstall", "--system", "--root", str(tmp_path))

    assert again["config_written"] is False
    assert removed.returncode == 0, removed.stderr
    assert files(tmp_path) == {"etc/mcpres/mcpresd.toml"}
    assert config.read_text() == 'log_level = "debug"\n'
    assert f"kept the config {config}" in removed.stdout


@pytest.mark.parametrize("args, error", [
    (["--user", "--system"], "not allowed with argument"),
    (["--root", "/nonexistent/dir"], "--root /nonexistent/dir is not a directory"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_input_is_refused_and_writes_nothing(tmp_path: Path, args: list[str], error: str) -> None:
    done = mcpresd("install", *args, *(["--root", str(tmp_path)] if "--root" not in args else []))

    assert done.returncode == 2
    assert error in done.stderr
    assert files(tmp_path) == set()


@pytest.mark.skipif(os.geteuid() != 0, reason="sudo's case: root with SUDO_USER set")
@pytest.mark.parametrize("command, how", [("install", {"SUDO_USER": "ann", "SUDO_UID": "1000"}),
                                          ("uninstall", {"SUDO_USER": "ann", "SUDO_UID": "1000"}),
                                          ("install", {"DOAS_USER": "ann"})], ids=["sudo", "sudo-uninstall", "doas"])
def test_user_mode_under_sudo_is_refused_and_writes_nothing(tmp_path: Path, command: str, how: dict[str, str]) -> None:
    env = {**os.environ, "HOME": str(tmp_path), **how}
    env.pop("XDG_CONFIG_HOME", None)

    done = subprocess.run([MCPRESD, command, "--user"], capture_output=True, text=True, timeout=BOUND_S, env=env)

    assert done.returncode == 2
    assert "as ann, run `mcpresd " + command + " --user` without sudo" in done.stderr
    assert files(tmp_path) == set()


@pytest.mark.skipif(os.geteuid() != 0, reason="pkexec's case: root with PKEXEC_UID set")
def test_user_mode_under_pkexec_is_refused_and_names_the_caller(tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path), "PKEXEC_UID": "65534"}
    env.pop("XDG_CONFIG_HOME", None)
    env.pop("SUDO_USER", None)

    done = subprocess.run([MCPRESD, "install", "--user"], capture_output=True, text=True, timeout=BOUND_S, env=env)

    assert done.returncode == 2
    assert f"as {pwd.getpwuid(65534).pw_name}, run `mcpresd install --user`" in done.stderr
    assert files(tmp_path) == set()


def test_install_help_has_examples() -> None:
    for command in ("install", "uninstall"):
        done = mcpresd(command, "--help")
        assert done.returncode == 0 and "mcpresd install --user" in done.stdout and "--root DIR" in done.stdout


@needs_analyze
def test_the_installed_system_units_verify_and_stay_exposed_at_most_2_0(tmp_path: Path) -> None:
    root = tmp_path / "root"
    host_units = next(p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir())
    shutil.copytree(host_units, root / "usr/lib/systemd/system", symlinks=True)
    installed(root, "--system")
    units = root / "etc/systemd/system"
    for program in exec_paths(units / "mcpresd.service", units / "mcpresd.socket"):
        stub(root / program.lstrip("/"))  # verify checks ExecStart= against the image, not the host

    verified = analyze("verify", f"--root={root}", "mcpresd.service", "mcpresd.socket")
    security = analyze("security", "--offline=true", str(root / "etc/systemd/system/mcpresd.service"))

    assert verified.returncode == 0 and not (verified.stdout + verified.stderr).strip(), \
        verified.stdout + verified.stderr
    match = re.search(r"Overall exposure level for mcpresd\.service: (\d+\.\d)", security.stdout)
    assert match and float(match.group(1)) <= MAX_EXPOSURE, security.stdout + security.stderr


@needs_analyze
def test_the_installed_user_unit_verifies(tmp_path: Path) -> None:
    home = tmp_path / "home"
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    (tmp_path / "img").mkdir()
    installed(tmp_path / "img", "--user", home=home)
    unit = tmp_path / "img" / str(home).lstrip("/") / ".config/systemd/user/mcpresd.service"

    done = analyze("--user", "verify", str(unit), env={"HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)})

    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr


def venv_at(place: Path) -> Path:
    """This venv's interpreter seen from `place` (a path a careless operator chose), with an mcpresd beside it."""
    real = Path(sys.executable).parent.parent
    (place / "bin").mkdir(parents=True)
    (place / "bin/python").symlink_to(Path(sys.executable))
    (place / "lib").symlink_to(real / "lib")
    shutil.copy(real / "pyvenv.cfg", place / "pyvenv.cfg")
    stub(place / "bin/mcpresd")
    return place / "bin/python"


@needs_analyze
def test_execstart_runs_a_program_whose_path_has_spaces_percent_and_dollar(tmp_path: Path) -> None:
    python = venv_at(tmp_path / "my tools 100%$HOME")
    root = tmp_path / "root"
    host_units = next(p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir())
    shutil.copytree(host_units, root / "usr/lib/systemd/system", symlinks=True)

    done = subprocess.run([str(python), "-m", "mcpresd", "install", "--system", "--root", str(root), "--json"],
                          capture_output=True, text=True, timeout=BOUND_S)
    assert done.returncode == 0, done.stderr
    program = tmp_path / "my tools 100%$HOME/bin/mcpresd"
    assert json.loads(done.stdout)["exec"] == str(program)
    for path in [str(program), "/bin/kill", "/usr/bin/kill"]:
        stub(root / path.lstrip("/"))  # verify checks ExecStart= against the image, not the host
    verified = analyze("verify", f"--root={root}", "mcpresd.service")

    assert verified.returncode == 0 and not (verified.stdout + verified.stderr).strip(), \
        verified.stdout + verified.stderr


def test_install_replaces_a_symlink_planted_at_a_unit_and_writes_nothing_through_it(tmp_path: Path) -> None:
    units = tmp_path / "etc/systemd/system"
    units.mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_text("someone else's file\n")
    (units / "mcpresd.service").symlink_to(victim)
    (tmp_path / "etc/mcpres").mkdir()
    (tmp_path / "etc/mcpres/mcpresd.toml").symlink_to(tmp_path / "nowhere")  # dangling: a config to keep

    report = installed(tmp_path, "--system")

    assert victim.read_text() == "someone else's file\n"
    assert not (units / "mcpresd.service").is_symlink()
    assert directives(units / "mcpresd.service")["ExecStart"][0].startswith(MCPRESD)
    assert report["config_written"] is False and not (tmp_path / "nowhere").exists()


def test_a_relative_xdg_config_home_is_ignored_as_the_spec_says(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    env = dict(os.environ, XDG_CONFIG_HOME="relative/cfg", HOME="/home/ann")

    done = subprocess.run([MCPRESD, "install", "--user", "--root", str(root), "--json"], capture_output=True,
                          text=True, timeout=BOUND_S, env=env, cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert files(root) == {"home/ann/.config/systemd/user/mcpresd.service", "home/ann/.config/mcpres/mcpresd.toml"}
    assert not (tmp_path / "relative").exists()
