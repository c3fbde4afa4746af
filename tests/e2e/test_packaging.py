"""The wheel carries the LICENSE, the systemd units and the sample config, declares its licence the SPDX way, and a
fresh venv given only the wheel (its dependencies from this one, offline) runs `mcpresd --help` and
`mcpctl --help`, and installs units from its own copy that run its own mcpresd."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

BOUND_S = 300.0
PACKAGE_DATA = {"mcpresd/share/mcpresd.toml", "mcpresd/share/systemd/mcpresd.service",
                "mcpresd/share/systemd/mcpresd.socket", "mcpresd/share/systemd/user/mcpresd.service"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # No build isolation: the test environment's setuptools (>= 77, a test dependency) builds it, offline.
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=BOUND_S)
    assert done.returncode == 0, done.stdout + done.stderr
    [built] = out.glob("mcpres-*.whl")
    return built


def test_the_wheel_carries_the_license_the_units_and_the_sample_config(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        [metadata] = [n for n in names if n.endswith(".dist-info/METADATA")]
        headers = archive.read(metadata).decode().split("\n\n", 1)[0].splitlines()
        license_text = archive.read(metadata.replace("METADATA", "licenses/LICENSE")).decode()
        units = {name: archive.read(name).decode() for name in PACKAGE_DATA & names}

    assert PACKAGE_DATA <= names
    assert "License-Expression: MIT" in headers and "License-File: LICENSE" in headers
    assert not [h for h in headers if h.startswith("License: ")]  # the deprecated table form
    assert license_text == (ROOT / "LICENSE").read_text() and "MIT License" in license_text
    assert units["mcpresd/share/systemd/mcpresd.service"] == (ROOT / "systemd/mcpresd.service").read_text()
    assert units["mcpresd/share/mcpresd.toml"] == (ROOT / "config/mcpresd.toml").read_text()


def test_a_fresh_venv_from_the_wheel_runs_both_commands(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=BOUND_S)
    fresh_python = venv / "bin" / "python"
    installed = subprocess.run([str(fresh_python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
                               capture_output=True, text=True, timeout=BOUND_S)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    # The dependencies (typer, rich, psutil, ...) from this environment, so that nothing is downloaded; a plain
    # path entry, which runs none of this environment's .pth files (its editable mcpres stays out).
    site = Path(subprocess.run([str(fresh_python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True, timeout=BOUND_S).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")

    # Run away from the checkout: `python -c` puts the working directory first on sys.path.
    origin = subprocess.run([str(fresh_python), "-c", "import mcpresd, mcpctl; print(mcpresd.__file__, mcpctl.__file__)"],
                            capture_output=True, text=True, timeout=BOUND_S, cwd=tmp_path)
    helps = {command: subprocess.run([str(venv / "bin" / command), "--help"], capture_output=True, text=True,
                                     timeout=BOUND_S, cwd=tmp_path) for command in ("mcpresd", "mcpctl")}
    root = tmp_path / "image"
    root.mkdir()
    install = subprocess.run([str(venv / "bin" / "mcpresd"), "install", "--system", "--root", str(root)],
                             capture_output=True, text=True, timeout=BOUND_S, cwd=tmp_path)

    assert all(str(site) in path for path in origin.stdout.split()), origin.stdout + origin.stderr
    assert helps["mcpresd"].returncode == 0 and "usage: mcpresd" in helps["mcpresd"].stdout, helps["mcpresd"].stderr
    assert helps["mcpctl"].returncode == 0 and "Usage: mcpctl" in helps["mcpctl"].stdout, helps["mcpctl"].stderr
    assert install.returncode == 0, install.stderr
    unit = (root / "etc/systemd/system/mcpresd.service").read_text()
    assert f"ExecStart={venv}/bin/mcpresd --config" in unit


def test_the_sdist_carries_the_license_the_units_and_the_sample_config(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                           "print(build_meta.build_sdist(sys.argv[1]))", str(tmp_path)],
                          capture_output=True, text=True, timeout=BOUND_S, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    import tarfile

    with tarfile.open(tmp_path / done.stdout.split()[-1]) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
        members = {m.name.split("/", 1)[1]: m for m in archive.getmembers() if "/" in m.name}

    assert {"LICENSE", *PACKAGE_DATA} <= names
    assert all(members[name].isfile() for name in PACKAGE_DATA)  # copies, not the checkout's links
