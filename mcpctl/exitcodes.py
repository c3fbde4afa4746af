"""Exit codes of mcpctl, in one table, and the one place RPC errors become them.

| code | meaning                                                     |
|------|-------------------------------------------------------------|
| 0    | success                                                     |
| 1    | error: the daemon refused the request (see the message)     |
| 2    | usage: bad options or arguments                             |
| 3    | not available now: the request does not fit right now       |
| 4    | permission denied                                           |
| 5    | the daemon is unreachable (not running, wrong --socket)     |
"""

from __future__ import annotations

from mcpresd.protocol import ErrorCode

OK = 0
ERROR = 1
USAGE = 2
UNAVAILABLE = 3
PERMISSION_DENIED = 4
UNREACHABLE = 5

TABLE = (
    (OK, "success"),
    (ERROR, "error: the daemon refused the request (the message says why)"),
    (USAGE, "usage: bad options, arguments or parameters"),
    (UNAVAILABLE, "not available now: the request does not fit"),
    (PERMISSION_DENIED, "permission denied"),
    (UNREACHABLE, "the daemon is unreachable (not running, or a wrong --socket)"),
)


def for_error(code: int) -> int:
    if code == ErrorCode.INSUFFICIENT_CAPACITY:
        return UNAVAILABLE
    if code == ErrorCode.PERMISSION_DENIED:
        return PERMISSION_DENIED
    if code in (ErrorCode.INVALID_PARAMS, ErrorCode.INVALID_REQUEST, ErrorCode.METHOD_NOT_FOUND):
        return USAGE
    return ERROR
