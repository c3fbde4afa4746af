"""The e2e tests run the installed commands, so the packaging (console scripts, entry points) is what they prove."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import DaemonProcess, mcpresd_command

pytestmark = pytest.mark.e2e


def test_the_daemon_under_test_is_the_installed_mcpresd_command(daemon: DaemonProcess) -> None:
    installed = str(Path(sys.executable).parent / "mcpresd")
    assert daemon.proc is not None

    command_line = Path(f"/proc/{daemon.proc.pid}/cmdline").read_bytes().split(b"\0")

    assert mcpresd_command() == [installed]
    assert installed.encode() in command_line  # run through its console script, not `python -m mcpresd`
    assert b"-m" not in command_line
    assert daemon.call("daemon.status")["pid"] == daemon.proc.pid
