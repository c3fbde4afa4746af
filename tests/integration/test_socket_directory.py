"""protocol.socket_directory_problem: the daemon's rule for its socket's directory, as clients apply it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from mcpresd.protocol import socket_directory_problem

NOBODY = 65534
ME = frozenset({os.geteuid(), 0})

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")


def made(mode: int, owner: int | None = None) -> Callable[[Path], Path]:
    def make(base: Path) -> Path:
        path = base / "dir"
        path.mkdir()
        path.chmod(mode)
        if owner is not None:
            os.chown(path, owner, owner)
        return path
    return make


def linked(owner: int) -> Callable[[Path], Path]:
    def make(base: Path) -> Path:
        target = made(0o755)(base)
        link = base / "link"
        link.symlink_to(target)
        os.lchown(link, owner, owner)
        return link
    return make


def missing(base: Path) -> Path:
    return base / "absent"


def a_file(base: Path) -> Path:
    path = base / "file"
    path.write_text("")
    return path


@pytest.mark.parametrize(("make", "problem"), [
    pytest.param(made(0o700), None, id="mine, private"),
    pytest.param(made(0o755), None, id="mine, readable"),
    pytest.param(made(0o1777), None, id="sticky and shared, like /tmp"),
    pytest.param(made(0o755, NOBODY), f"belongs to uid {NOBODY}", id="another user's"),
    pytest.param(made(0o777), "is writable by other users (mode 0777)", id="shared, not sticky"),
    pytest.param(made(0o775), "is writable by other users (mode 0775)", id="group-writable"),
    pytest.param(linked(0), None, id="a link made by root"),
    pytest.param(linked(NOBODY), f"is a symbolic link made by uid {NOBODY}", id="a link another user made"),
    pytest.param(missing, None, id="missing: connecting will say no socket"),
    pytest.param(a_file, "is not a directory", id="a file"),
])
def test_a_socket_directory_is_trusted_only_if_no_other_user_controls_it(
        tmp_path: Path, make: Callable[[Path], Path], problem: str | None) -> None:
    directory = str(make(tmp_path))

    found = socket_directory_problem(directory, ME)

    if problem is None:
        assert found is None
    else:
        assert found == f"{directory} {problem}"


def test_a_directory_of_a_trusted_user_is_trusted(tmp_path: Path) -> None:
    directory = str(made(0o755, NOBODY)(tmp_path))

    assert socket_directory_problem(directory, ME | {NOBODY}) is None
