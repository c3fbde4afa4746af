"""How the gateway starts its server: with the environment the gateway itself was given.

Rules of this module:
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
