"""The daemon's log: the `<N>` journald priority only where stderr is the journal ($JOURNAL_STREAM names its
device and inode), a timestamp otherwise; a warning repeated every sampling round is logged once."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from tests.conftest import CONFIG, DaemonProcess

pytestmark = pytest.mark.e2e

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d{4} (INFO|WARNING|ERROR|CRITICAL|DEBUG) ")


def started(tmp_path: Path, journal_stream: str | None, config: str = CONFIG) -> DaemonProcess:
    daemon = DaemonProcess(tmp_path, config=config)
    daemon.log_path.touch()
    env = {"JOURNAL_STREAM": journal_stream.format(**_identity(daemon.log_path))} if journal_stream else {}
    daemon.start(env=env)
    return daemon


def _identity(path: Path) -> dict[str, int]:
    info = os.stat(path)
    return {"dev": info.st_dev, "ino": info.st_ino}


@pytest.mark.parametrize("journal_stream, journal", [
    ("{dev}:{ino}", True),           # systemd connected stderr to the journal
    ("{dev}:1", False),              # inherited, but stderr was redirected elsewhere
    ("nonsense", False),
    (None, False),
], ids=["journal", "redirected", "malformed", "unset"])
def test_the_priority_prefix_only_where_stderr_is_the_journal(tmp_path: Path, journal_stream: str | None,
                                                             journal: bool) -> None:
    daemon = started(tmp_path, journal_stream)
    daemon.stop()

    lines = daemon.log().splitlines()
    assert lines
    if journal:
        assert all(re.match(r"<[2-7]>[A-Z]+ mcpresd", line) for line in lines), lines
    else:
        assert all(TIMESTAMP.match(line) for line in lines), lines


def test_a_failing_metrics_file_is_warned_about_once(tmp_path: Path) -> None:
    target = tmp_path / "no-such-dir" / "mcpres.prom"
    daemon = started(tmp_path, None, CONFIG + f'\n[monitor]\ninterval = "0.5s"\nprometheus_file = "{target}"\n')
    try:
        deadline = time.monotonic() + 60
        while daemon.call("daemon.status")["uptime_s"] < 5.0:  # ten sampling rounds, each failing to write
            assert time.monotonic() < deadline, "the daemon's uptime did not reach 5 s in 60 s"
            time.sleep(0.2)
    finally:
        daemon.stop()

    warnings = [line for line in daemon.log().splitlines() if f"cannot write {target}" in line]
    assert len(warnings) == 1, warnings
