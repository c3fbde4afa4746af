"""One small synchronous JSON-RPC client over the daemon's Unix socket.

`call` sends one request and waits for its reply. A waiting request (an
`allocate` that may queue) can be split into `send` and `reply`, with `ready`
to ask whether the reply is in. `notifications` turns a subscribed connection
into a stream of event notifications; notifications that arrive while a reply
is awaited are kept for it, never lost. `batch` sends several requests as one
JSON-RPC batch and returns their results in order.

Whatever listens at the socket is trusted only if a trusted uid serves it:
this user, root, or one named in $MCPRES_TRUSTED_UID. Before connecting, the
socket's directory is checked as the daemon checks it (another user must not
be able to put a socket there); after, the server's uid (SO_PEERCRED).
Otherwise `UntrustedDaemon`, before a single request is sent.

A daemon that restarts is ridden through: with `retry_for` > 0, once a
connection was made, `call` sends its request again on a fresh connection while
the socket is refused or missing, or the connection broke before the reply,
backing off from 50 ms to 1 s, until `retry_for` seconds after the first
failure, and says on stderr that it waits. No daemon at the first contact (no
socket, or a refused one) is waited for only when `wait_if_absent` (the user
asked for a retry time): otherwise the call fails at once. A request that
may have reached the daemon before the connection broke is sent again only by
`call`; callers make that safe (an idempotency key) or read the outcome
(`resent`).
"""

from __future__ import annotations

import _socket as socket  # not `socket`: its enums and selectors cost more than a whole `mcpctl allocate`
import errno
import os
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from typing import Any, NoReturn

from mcpctl.escape import printable
from mcpresd.protocol import (
    EVENT_NOTIFICATION,
    JSONRPC,
    MAX_MESSAGE_BYTES,
    decode_line,
    encode_line,
    socket_directory_problem,
)

FIRST_BACKOFF_S = 0.05
MAX_BACKOFF_S = 1.0
_RESTARTING = (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN)
"""connect() errors of a daemon between its death and its next listen()."""


class DaemonUnreachable(Exception):
    """No daemon answers on the socket."""

    def __init__(self, path: str, reason: str, *, lost: bool = False, transient: bool = False,
                 absent: bool = False) -> None:
        super().__init__(f"cannot reach mcpresd at {path}: {reason}")
        self.path = path
        self.reason = reason
        self.lost = lost  # the connection was up and then went away, e.g. the daemon restarted
        self.transient = transient  # what a restarting daemon looks like: worth trying again shortly
        self.absent = absent  # no socket at all: no daemon was started there, or it stopped cleanly


TRUSTED_UID_ENV = "MCPRES_TRUSTED_UID"
"""Uids or user names, comma-separated, whose daemon is trusted besides this user's and root's."""


class UntrustedDaemon(DaemonUnreachable):
    """The socket's directory, or the process serving it, belongs to a user mcpctl does not trust."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.args = (f"not connecting to {path}: {reason}; another user could pose as mcpresd there. Use a"
                     " socket in your own or root's directory (--socket, $MCPRES_SOCKET), or, to trust a daemon"
                     f" run by another user, set {TRUSTED_UID_ENV}=UID",)


def trusted_uids(path: str) -> frozenset[int]:
    """This user, root, and the uids or user names in $MCPRES_TRUSTED_UID."""
    uids = {os.geteuid(), 0}
    for entry in os.environ.get(TRUSTED_UID_ENV, "").split(","):
        name = entry.strip()
        if name.isdigit():
            uids.add(int(name))
        elif name:
            import pwd

            try:
                uids.add(pwd.getpwnam(name).pw_uid)
            except KeyError:
                raise DaemonUnreachable(path, f"${TRUSTED_UID_ENV} names {name!r}, which is neither a uid nor"
                                              " a user on this host") from None
    return frozenset(uids)


def check_directory(path: str) -> frozenset[int]:
    """Refuse a socket in a directory an untrusted user controls; the trusted uids, for `check_server`."""
    trusted = trusted_uids(path)
    if not path.startswith("\0"):  # an abstract socket has no directory
        problem = socket_directory_problem(os.path.dirname(path) or ".", trusted)
        if problem is not None:
            raise UntrustedDaemon(path, problem + ("" if "writable" in problem else ", not to you or root"))
    return trusted


def check_server(path: str, sock: Any, trusted: frozenset[int]) -> None:
    """Refuse a connected socket whose server runs as an untrusted uid (SO_PEERCRED: pid, uid, gid)."""
    uid = int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)[4:8], sys.byteorder)
    if uid not in trusted:
        raise UntrustedDaemon(path, f"the process serving it runs as uid {uid}, not as you or root")


def backoff_delays(first: float = FIRST_BACKOFF_S, most: float = MAX_BACKOFF_S) -> Iterator[float]:
    """50 ms, 100 ms, 200 ms, ... capped at 1 s."""
    delay = first
    while True:
        yield delay
        delay = min(delay * 2, most)


class RpcError(Exception):
    """The daemon answered with a JSON-RPC error."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


class Client:
    """A connection to mcpresd; `call` sends one request and waits for its answer.

    `timeout` bounds each wait for the daemon; None waits as long as it takes
    (for requests that wait on purpose, and for event streams).
    """

    wait_if_absent = False
    """Whether `call` retries when no daemon answers at the first contact (no socket, or a refused one: a stale
    socket left by a daemon that died), as it does for a connection lost after it was up (a daemon restarting
    under a request). Only when asked (--retry-for, $MCPRES_RETRY_FOR): most likely no daemon is running, and
    waiting would only delay the exit 5."""
    announce_waits = True
    """Say on stderr, once per call, that it is waiting for the daemon and for how long."""

    def __init__(self, path: str, timeout: float | None = 30.0, retry_for: float = 0.0) -> None:
        self.path = path
        self._timeout = timeout
        self.retry_for = retry_for
        self.resent = False
        """Whether the last `call` was sent again after a connection broke with the request possibly delivered."""
        self._sock: socket.socket | None = None
        self._reached = False
        """Whether a connection to the daemon was ever made: until then, no daemon may be running at all."""
        self._buffer = b""
        self._next_id = 0
        self._notifications: list[dict[str, Any]] = []

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        trusted = check_directory(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self._timeout)
        try:
            sock.connect(self.path)
        except FileNotFoundError:
            sock.close()
            raise DaemonUnreachable(self.path, "no socket there (is mcpresd running?)", transient=True,
                                    absent=True) from None
        except ConnectionRefusedError:
            sock.close()
            raise DaemonUnreachable(self.path, "connection refused (a stale socket: is mcpresd running?)",
                                    transient=True) from None
        except OSError as error:
            sock.close()
            raise DaemonUnreachable(self.path, error.strerror or str(error),
                                    transient=error.errno in _RESTARTING) from None
        try:
            check_server(self.path, sock, trusted)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._reached = True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buffer = b""

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Send one request and return its result; resent while the daemon restarts, for up to `retry_for` s."""
        self.resent = False
        delays = backoff_delays()
        deadline: float | None = None
        maybe_delivered = False
        while True:
            try:
                self.resent = maybe_delivered
                self.send(method, params)
                return self.reply()
            except DaemonUnreachable as error:
                maybe_delivered = maybe_delivered or error.lost
                if not error.transient or self.retry_for <= 0 or (not self._reached and deadline is None
                                                                    and not self.wait_if_absent):
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.retry_for
                    self.say_waiting(error)
                if now >= deadline:
                    raise DaemonUnreachable(self.path, f"{error.reason}; gave up after retrying for {self.retry_for:g}s",
                                            lost=error.lost) from None
                time.sleep(min(next(delays), deadline - now))

    def say_waiting(self, error: DaemonUnreachable) -> None:
        if self.announce_waits:
            how_long = "with no time limit" if self.retry_for == float("inf") else f"for up to {self.retry_for:g}s"
            print(f"mcpctl: cannot reach mcpresd at {printable(self.path)} ({printable(error.reason)}); "
                  f"retrying {how_long} (--retry-for, $MCPRES_RETRY_FOR; 0 fails at once)", file=sys.stderr, flush=True)

    def send(self, method: str, params: dict[str, Any] | None = None) -> None:
        """Send one request; read its answer with `reply`."""
        self._write(self._request(method, params))

    def batch(self, calls: Sequence[tuple[str, dict[str, Any] | None]]) -> list[Any]:
        """Send `calls` as one batch (one line, one reply); their results in order, or the first RpcError."""
        requests = [self._request(method, params) for method, params in calls]
        self._write(requests)
        while True:
            message: Any = self._message()
            if _is_notification(message):
                self._notifications.append(message.get("params") or {})
                continue
            if isinstance(message, dict):
                if "error" in message:  # the batch as a whole was refused
                    _raise(message["error"])
                continue
            by_id = {reply.get("id"): reply for reply in message if isinstance(reply, dict)}
            results = []
            for request in requests:
                reply = by_id.get(request["id"])
                if reply is None:
                    raise RpcError(0, f"the daemon did not answer {request['method']} in the batch")
                if "error" in reply:
                    _raise(reply["error"])
                results.append(reply.get("result"))
            return results

    def _request(self, method: str, params: dict[str, Any] | None) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"jsonrpc": JSONRPC, "id": self._next_id, "method": method}
        if params is not None:
            message["params"] = params
        return message

    def _write(self, message: Any) -> None:
        if self._sock is None:
            self.connect()
        sock = self._sock
        assert sock is not None
        try:
            sock.sendall(encode_line(message))
        except (BrokenPipeError, ConnectionResetError) as error:
            self.close()
            raise DaemonUnreachable(self.path, f"connection lost ({error.strerror})", lost=True,
                                    transient=True) from None

    def ready(self, timeout: float) -> bool:
        """Whether a whole line (a reply or a notification) can be read within `timeout` seconds."""
        if b"\n" in self._buffer:
            return True
        sock = self._sock
        assert sock is not None
        import select

        readable, _, _ = select.select([sock], [], [], timeout)
        if not readable:
            return False
        self._fill()
        return b"\n" in self._buffer

    def reply(self) -> Any:
        """The result of the request last sent, or RpcError; notifications met on the way are kept."""
        while True:
            message = self._message()
            if _is_notification(message):
                self._notifications.append(message.get("params") or {})
                continue
            if "error" in message:
                _raise(message["error"])
            return message.get("result")

    def notifications(self) -> Iterator[dict[str, Any]]:
        """Event notifications as they arrive on a subscribed connection; DaemonUnreachable when it closes."""
        while True:
            while self._notifications:
                yield self._notifications.pop(0)
            message = self._message()
            if _is_notification(message):
                yield message.get("params") or {}
            elif isinstance(message, dict) and message.get("id") is None and "error" in message:
                _raise(message["error"])  # the daemon unsubscribed this connection (it fell behind), say

    def _message(self) -> Any:
        """The next line as JSON: a reply or notification (an object), or a batch's replies (an array)."""
        line = b""
        while not line.strip():
            while b"\n" not in self._buffer:
                self._fill()
            line, _, self._buffer = self._buffer.partition(b"\n")
        return decode_line(line)

    def _fill(self) -> None:
        sock = self._sock
        if sock is None:
            raise DaemonUnreachable(self.path, "not connected")
        try:
            chunk = sock.recv(65536)
        except (BrokenPipeError, ConnectionResetError) as error:
            self.close()
            raise DaemonUnreachable(self.path, f"connection lost ({error.strerror})", lost=True,
                                    transient=True) from None
        except TimeoutError:
            self.close()
            raise DaemonUnreachable(self.path, "no answer in time", lost=True) from None
        if not chunk:
            self.close()
            raise DaemonUnreachable(self.path, "the daemon closed the connection", lost=True, transient=True)
        self._buffer += chunk
        if len(self._buffer) > 64 * MAX_MESSAGE_BYTES:
            self.close()
            raise DaemonUnreachable(self.path, "reply too large")


def _raise(error: Any) -> NoReturn:
    if not isinstance(error, dict):
        raise RpcError(0, f"malformed error from the daemon: {error!r}")
    raise RpcError(int(error.get("code", 0)), str(error.get("message", "")), error.get("data"))


def _is_notification(message: Any) -> bool:
    return isinstance(message, dict) and "id" not in message and message.get("method") == EVENT_NOTIFICATION
