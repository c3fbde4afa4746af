"""Exit codes of mcpctl, in one table, and the one place RPC errors become them.

| code | meaning                                                              |
|------|----------------------------------------------------------------------|
| 0    | success                                                              |
| 1    | error: the daemon refused the request (e.g. over budget, a draining  |
|      | pool, an unknown name), or withdrew a queued one                     |
| 2    | usage: bad options or arguments                                      |
| 3    | not available: the request does not fit now, or its wait ran out     |
| 4    | permission denied                                                    |
| 5    | the daemon is unreachable (not running, wrong --socket)              |
| 6    | the daemon is not trusted: another user owns the socket's directory  |
|      | or serves the socket (yourself, root and $MCPRES_TRUSTED_UID are     |
|      | trusted)                                                             |
| 7    | the cluster refused the request or did not answer (Slurm's message   |
|      | says why); nothing changed locally                                   |
| 130  | interrupted (Ctrl-C) while waiting                                   |

`mcpctl run` exits with its command's status instead: the command's own exit
code, 128+N if a signal N killed it, 127 if it was not found, 126 if it could not
be run (as a shell does).

JSON-RPC errors map to exit codes in `for_error`: 1002 InsufficientCapacity and
1012 WaitTimeout give 3, 1008 PermissionDenied gives 4, invalid params or
requests give 2. 1013 Withdrawn and the other application errors give 1; among
them 1015 BudgetExceeded (a spent budget is a refusal by policy: waiting or
retrying does not help until its period ends), 1016 PoolDraining (like 1011
NeverFits), 1017 UnknownPool (like 1001 UnknownResource) and 1018 PoolExists
(like 1005 ResourceExists). 1019 ClusterFailed gives 7.
"""

from __future__ import annotations

import mcpresd.protocol as protocol

OK = 0
ERROR = 1
USAGE = 2
UNAVAILABLE = 3
PERMISSION_DENIED = 4
UNREACHABLE = 5
UNTRUSTED = 6
CLUSTER_FAILED = 7
CANNOT_EXECUTE = 126
NOT_FOUND = 127
INTERRUPTED = 130

TABLE = (
    (OK, "success"),
    (ERROR, "error: the daemon refused the request (e.g. over budget, a draining pool), or withdrew a queued one "
            "(the message says why)"),
    (USAGE, "usage: bad options, arguments or parameters"),
    (UNAVAILABLE, "not available: the request does not fit now, or its wait ran out"),
    (PERMISSION_DENIED, "permission denied"),
    (UNREACHABLE, "the daemon is unreachable (not running, or a wrong --socket)"),
    (UNTRUSTED, "the daemon is not trusted: another user owns the socket's directory or serves the socket "
                "(yourself, root and $MCPRES_TRUSTED_UID are trusted)"),
    (CLUSTER_FAILED, "the cluster refused the request or did not answer (Slurm's message says why); nothing "
                     "changed locally"),
    (INTERRUPTED, "interrupted (Ctrl-C) while waiting"),
)
RUN_NOTE = ("mcpctl run exits with its command's status: its exit code, 128+N if signal N killed it, "
            "127 if the command was not found, 126 if it could not be run.")


def for_error(code: int) -> int:
    ErrorCode = protocol.ErrorCode  # loads the protocol's enums: only when a call failed
    if code in (ErrorCode.INSUFFICIENT_CAPACITY, ErrorCode.WAIT_TIMEOUT):
        return UNAVAILABLE
    if code == ErrorCode.PERMISSION_DENIED:
        return PERMISSION_DENIED
    if code == ErrorCode.CLUSTER_FAILED:
        return CLUSTER_FAILED
    if code in (ErrorCode.INVALID_PARAMS, ErrorCode.INVALID_REQUEST, ErrorCode.METHOD_NOT_FOUND):
        return USAGE
    return ERROR  # refusals no wait would change: Withdrawn, BudgetExceeded, PoolDraining, UnknownPool, ...
