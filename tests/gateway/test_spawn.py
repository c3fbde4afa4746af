"""How the gateway starts its server: the environment it was given, and the command looked up as execvp would."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mcpctl.gateway.spawn import locate, server_environment


@pytest.mark.parametrize(("started", "now", "expected"), [
    (b"PATH=/bin\0", "C.UTF-8", None),  # added by PEP 538's coercion: taken out
    (b"PATH=/bin\0LC_CTYPE=C\0", "C.UTF-8", "C"),  # replaced by it: put back
    (b"PATH=/bin\0LC_CTYPE=C.UTF-8\0", "C.UTF-8", "C.UTF-8"),  # the host's own: kept
    (b"LC_CTYPE=de_DE.UTF-8\0", "de_DE.UTF-8", "de_DE.UTF-8"),
])
def test_lc_ctype_is_what_the_gateway_was_started_with(monkeypatch: pytest.MonkeyPatch, started: bytes, now: str,
                                                      expected: str | None) -> None:
    monkeypatch.setenv("LC_CTYPE", now)
    monkeypatch.setenv("MCPRES_SPAWN_MARK", "kept")
    env = server_environment(started)
    assert env.get("LC_CTYPE") == expected
    assert env["MCPRES_SPAWN_MARK"] == "kept"  # everything else is os.environ's


def test_a_command_is_found_on_the_servers_path_or_refused_with_the_right_error(tmp_path: Path) -> None:
    runnable = tmp_path / "server"
    runnable.write_text("#!/bin/sh\n")
    runnable.chmod(0o755)
    plain = tmp_path / "notes"
    plain.write_text("")
    env = {"PATH": f"/nonexistent:{tmp_path}"}
    assert locate("server", env) == str(runnable)
    assert locate(str(runnable), {}) == str(runnable)
    with pytest.raises(PermissionError):
        locate("notes", env)
    with pytest.raises(FileNotFoundError):
        locate("no-such-server", env)
    with pytest.raises(FileNotFoundError):
        locate(str(tmp_path / "absent"), env)
    assert os.path.isabs(locate("sh", {"PATH": "/bin:/usr/bin"}))
