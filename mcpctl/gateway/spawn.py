"""How the gateway starts its server: under a keeper, with the environment the gateway itself was given.

Rules of this module:
- The server runs under keeper.py (see its rules): the gateway's child is the
  keeper, in a process group of its own, and the server is the keeper's child,
  in another. The keeper's pid is what holds the gateway's allocations.
- The command is looked up on the server's PATH here, so that a missing or
  unrunnable command is reported by the gateway itself, as before (127, 126).
- The server's environment is the one the host gave the gateway, unchanged.
  Python's C-locale coercion (PEP 538) sets `LC_CTYPE` in the gateway's own
  `os.environ` when it starts under the C or POSIX locale (a host's minimal
  environment, cron, systemd); the server, which would not have had it started
  directly, must not get it either. `/proc/self/environ` still holds the
  environment the process was started with, so the variable is put back as it
  was there.
"""

from __future__ import annotations

import os
import sys

KEEPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "keeper.py")
COERCED = frozenset({"C.UTF-8", "C.utf8", "UTF-8"})
"""The values PEP 538's coercion gives LC_CTYPE."""


def server_environment(initial: bytes | None = None) -> dict[str, str]:
    """The gateway's environment as it was started: os.environ without what the interpreter's start-up added.

    `initial` is the NUL-separated block of /proc/self/environ (read here if None).
    """
    env = dict(os.environ)
    if initial is None:
        try:
            with open("/proc/self/environ", "rb") as file:
                initial = file.read()
        except OSError:
            initial = None
    if initial is not None:
        started = _initial_value(initial, b"LC_CTYPE")
        if started is None:
            env.pop("LC_CTYPE", None)
        else:
            env["LC_CTYPE"] = started
    elif env.get("LC_CTYPE") in COERCED and not env.get("LC_ALL") and env.get("LANG", "C") in ("C", "POSIX"):
        del env["LC_CTYPE"]  # no /proc: the coercion's one signature, assumed to be its work
    return env


def _initial_value(block: bytes, name: bytes) -> str | None:
    prefix = name + b"="
    for entry in block.split(b"\0"):
        if entry.startswith(prefix):
            return os.fsdecode(entry[len(prefix):])
    return None


def keeper_command(path: str, command: list[str]) -> list[str]:
    """The command line that runs the executable `path` as `command` under the keeper."""
    return [sys.executable, "-I", "-S", KEEPER, str(os.getpid()), path, "--", *command]


def locate(name: str, env: dict[str, str]) -> str:
    """The executable `name` names, looked up on env's PATH as execvp would.

    FileNotFoundError if there is none, PermissionError if there is one that cannot be run.
    """
    if "/" in name:
        candidates = [name]
    else:
        candidates = [os.path.join(directory or ".", name)
                      for directory in env.get("PATH", os.defpath).split(os.pathsep)]
    found = None
    for candidate in candidates:
        if os.path.isfile(candidate):
            if os.access(candidate, os.X_OK):
                return os.path.abspath(candidate) if "/" in name else candidate
            found = candidate
    if found is not None:
        raise PermissionError(13, "Permission denied", found)
    if "/" in name and os.path.exists(name):
        raise PermissionError(13, "Permission denied", name)
    raise FileNotFoundError(2, "No such file or directory", name)
