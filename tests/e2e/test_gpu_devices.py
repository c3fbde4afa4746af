"""Hard mode's GPU fence end to end, as root on this host's real cgroup v1 devices controller.

The daemon replays the recorded H100 (gpu:0, /dev/nvidia0: char 195:0). A `hard` command not granted gpu:0 is
refused its device node by the kernel (EPERM); one granted it, or a `soft` one, is not (this host has no NVIDIA
driver: its open() fails with ENXIO instead, after the cgroup let it through). The node is made in the test's
temporary directory: the devices controller checks the node's numbers, not where it lives.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cgroups import cgroup_subtree, v1_mounts  # noqa: F401 - fixtures
from tests.conftest import CONFIG, DaemonProcess, cli

OPEN = "import errno, os, sys\ntry:\n    os.close(os.open(sys.argv[1], os.O_RDWR)); print('opened')\n" \
       "except OSError as error:\n    print(errno.errorcode[error.errno])"


@pytest.fixture
def fenced(tmp_path: Path, cgroup_subtree: str) -> Iterator[DaemonProcess]:  # noqa: F811 - fixture
    if "devices" not in v1_mounts():
        pytest.skip("no cgroup v1 devices hierarchy on this host")
    process = DaemonProcess(tmp_path, config=CONFIG + f'\n[enforce]\ncgroup = "{cgroup_subtree}"\n')
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def nvidia0(tmp_path: Path) -> str:
    path = tmp_path / "nvidia0"
    try:
        os.mknod(path, 0o600 | 0o020000, os.makedev(195, 0))
    except PermissionError as error:
        pytest.skip(f"cannot make device nodes here: {error}")
    return str(path)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (("--enforce", "hard", "--cpu", "0.5"), "EPERM"),
        (("--enforce", "hard", "--cpu", "0.5", "--gpu", "1"), "allowed"),
        (("--enforce", "soft", "--cpu", "0.5"), "allowed"),
    ],
)
def test_a_hard_command_may_not_open_the_gpus_it_was_not_granted(fenced: DaemonProcess, nvidia0: str,
                                                                  options: tuple[str, ...], expected: str) -> None:
    result = cli(fenced, "run", *options, "--", sys.executable, "-c", OPEN, nvidia0)

    assert result.returncode == 0, result.stderr
    seen = result.stdout.strip()
    assert (seen if seen == "EPERM" else "allowed") == expected, seen


def test_status_names_the_devices_controller(fenced: DaemonProcess) -> None:
    status = cli(fenced, "status", "--json")

    assert status.returncode == 0, status.stderr
    assert "devices" in json.loads(status.stdout)["enforcement"]["controllers"]
