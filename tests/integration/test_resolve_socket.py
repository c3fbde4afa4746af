"""protocol.resolve_socket, the one rule every client uses: the system socket when this user has none."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from mcpresd import protocol


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Path]]:
    runtime = tmp_path / "run"
    (runtime / "mcpres").mkdir(parents=True)
    system = tmp_path / "system" / "mcpresd.sock"
    system.parent.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.delenv("MCPRES_SOCKET", raising=False)
    monkeypatch.setattr(protocol, "SYSTEM_SOCKET", str(system))
    yield runtime / "mcpres" / "mcpresd.sock", system


def listen(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    return sock


def test_the_system_socket_is_taken_when_the_user_has_none(places: tuple[Path, Path]) -> None:
    user, system = places
    with listen(system):
        choice = protocol.resolve_socket()
    assert (choice.path, choice.source) == (str(system), "system")
    assert choice.tried == (str(user), str(system))


def test_the_user_socket_comes_before_the_system_socket(places: tuple[Path, Path]) -> None:
    user, system = places
    with listen(system), listen(user):
        choice = protocol.resolve_socket()
    assert (choice.path, choice.source) == (str(user), "user")


def test_with_neither_the_user_socket_is_named(places: tuple[Path, Path]) -> None:
    user, system = places
    choice = protocol.resolve_socket()
    assert (choice.path, choice.source) == (str(user), "user")
    assert "nor at" in choice.why


def test_a_plain_file_is_not_a_socket(places: tuple[Path, Path]) -> None:
    user, system = places
    user.write_text("")
    with listen(system):
        assert protocol.resolve_socket().source == "system"


@pytest.mark.parametrize("given, env, source", [("/x.sock", "/y.sock", "--socket"), (None, "/y.sock", "$MCPRES_SOCKET")])
def test_an_explicit_socket_wins(places: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, given: str | None,
                                 env: str, source: str) -> None:
    monkeypatch.setenv("MCPRES_SOCKET", env)
    assert protocol.resolve_socket(given).source == source
