"""The gateway's one connection to mcpresd: requests out, replies and event notifications in.

Rules of this module:
- One connection, opened at start and kept. The allocations the gateway makes
  are held by its server's keeper (`holder_pid`, see proxy.py), so they outlive
  a dropped connection; only if the daemon refuses that holder does the
  connection hold them.
- It subscribes to events the first time the caller asks (when a call first has
  to queue) and stays subscribed: the event stream costs the daemon work on
  every allocation, which a gateway whose calls never wait need not pay. A
  caller that subscribes late reads the state of what it waits for after
  subscribing, so it misses nothing.
- The daemon answers a connection's requests in the order they came, so a
  request that blocks would hold back every later reply: only non-blocking
  calls are sent (`allocate` always with `detach`).
- Notifications (the gateway's releases) are deferred: one goes out with the
  next request, as one JSON-RPC batch, or on its own DEFER_S later. The daemon
  commits a batch in one transaction, so a release followed at once by the
  next call's allocate costs one commit, not two, and no reply.
- Replies and events are handled as they are read, in `data_received`: a
  reply's `then` callback runs there and then, with no extra turn of the loop.
- A lost connection fails every pending request with DaemonUnreachable and is
  reported once to `on_lost`; the caller decides whether and when to reconnect.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

from mcpctl.client import DaemonUnreachable, RpcError
from mcpctl.gateway import log
from mcpresd.protocol import EVENT_NOTIFICATION, JSONRPC, MAX_BATCH, Method

MAX_LINE = 64 * 1024 * 1024
"""A reply longer than this means something is wrong: the connection is dropped."""
DEFER_S = 0.005
"""The longest a deferred notification waits for company."""


class Broker(asyncio.Protocol):
    """A connection to mcpresd, which may be subscribed to its events."""

    def __init__(self, path: str, on_event: Callable[[dict[str, Any]], None],
                 on_lost: Callable[[str], None]) -> None:
        self.path = path
        self._on_event = on_event
        self._on_lost = on_lost
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._pending: dict[int, tuple[asyncio.Future[Any], Callable[[asyncio.Future[Any]], None] | None]] = {}
        self._next_id = 0
        self._deferred: list[bytes] = []
        self._flush_timer: asyncio.TimerHandle | None = None
        self.up = False
        self.subscribed = False
        self.peer_pid = 0
        """The daemon's pid as this process sees it (SO_PEERCRED); 0 when the daemon is in a pid namespace it
        cannot see, whose daemon would not see this process's pids as this process does either."""

    async def connect(self, timeout: float = 5.0) -> None:
        """Connect; DaemonUnreachable if no daemon answers in `timeout` seconds, UntrustedDaemon (before any
        request) if another user could have put it there or serves it (mcpctl.client's rule)."""
        from mcpctl.client import check_directory, check_server

        loop = asyncio.get_running_loop()
        trusted = check_directory(self.path)
        try:
            transport, _ = await asyncio.wait_for(loop.create_unix_connection(lambda: self, self.path), timeout)
        except FileNotFoundError:
            raise DaemonUnreachable(self.path, "no socket there (is mcpresd running?)") from None
        except ConnectionRefusedError:
            raise DaemonUnreachable(self.path, "connection refused (is mcpresd running?)") from None
        except (OSError, asyncio.TimeoutError) as error:
            raise DaemonUnreachable(self.path, getattr(error, "strerror", None) or "no answer in time") from None
        try:
            check_server(self.path, transport.get_extra_info("socket"), trusted)
        except DaemonUnreachable:
            self.close()
            raise
        try:
            await asyncio.wait_for(self.request(Method.DAEMON_STATUS), timeout)
        except (asyncio.TimeoutError, RpcError) as error:
            self.close()
            raise DaemonUnreachable(self.path, f"daemon.status failed: {error or 'no answer in time'}") from None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self.peer_pid = _peer_pid(transport.get_extra_info("socket"))
        self._buffer = b""
        self.up = True

    def request(self, method: str, params: dict[str, Any] | None = None, *,
                then: Callable[[asyncio.Future[Any]], None] | None = None) -> asyncio.Future[Any]:
        """Send a request now; its future gets the result, RpcError or DaemonUnreachable.

        `then(future)` runs as soon as the future is done, in the same turn of the loop.
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if not self.up:
            future.set_exception(DaemonUnreachable(self.path, "not connected"))
            if then is not None:
                then(future)
            return future
        self._next_id += 1
        self._pending[self._next_id] = (future, then)
        self._queue({"jsonrpc": JSONRPC, "id": self._next_id, "method": method, "params": params}, defer=False)
        return future

    def notify(self, method: str, params: dict[str, Any]) -> bool:
        """Send a notification (no reply, not even an error) with the next request, or DEFER_S from now.

        The daemon applies a connection's messages in order: the reply to any later request
        means this one has been applied. False if not connected.
        """
        if not self.up:
            return False
        self._queue({"jsonrpc": JSONRPC, "method": method, "params": params}, defer=True)
        return True

    def subscribe(self) -> None:
        """Subscribe to events, once per connection; requests sent after this are answered after it took effect."""
        if self.subscribed or not self.up:
            return
        self.subscribed = True
        self.request(Method.EVENTS_SUBSCRIBE, then=self._subscribed)

    def flush(self) -> None:
        """Send what is deferred now: one message as it is, several as batches."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        lines, self._deferred = self._deferred, []
        transport = self._transport
        if not lines or transport is None or transport.is_closing():
            return
        for start in range(0, len(lines), MAX_BATCH):
            part = lines[start:start + MAX_BATCH]
            transport.write((part[0] if len(part) == 1 else b"[" + b",".join(part) + b"]") + b"\n")

    def close(self) -> None:
        self._lose("closed by the gateway", report=False)

    # -- protocol callbacks ----------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                break
            line, self._buffer = self._buffer[:end], self._buffer[end + 1:]
            try:
                message = json.loads(line)
            except ValueError:
                continue
            for reply in message if isinstance(message, list) else [message]:
                if isinstance(reply, dict):
                    try:
                        self._dispatch(reply)
                    except Exception as error:  # a bug in a handler must not take the connection down with it
                        log(f"internal error handling {str(reply)[:200]}: {error!r}")
        if len(self._buffer) > MAX_LINE:
            self._lose("a reply longer than 64 MiB", report=True)

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(f"connection lost ({exc})" if exc else "the daemon closed the connection", report=True)

    # -- internals ----------------------------------------------------------------

    def _queue(self, message: dict[str, Any], *, defer: bool) -> None:
        if message["params"] is None:
            del message["params"]
        self._deferred.append(json.dumps(message, separators=(",", ":")).encode())
        if not defer:
            self.flush()
        elif self._flush_timer is None:
            self._flush_timer = asyncio.get_running_loop().call_later(DEFER_S, self.flush)

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "id" not in message:
            if message.get("method") == EVENT_NOTIFICATION and isinstance(message.get("params"), dict):
                self._on_event(message["params"])
            return
        entry = self._pending.pop(message["id"], None) if isinstance(message["id"], int) else None
        if entry is None:
            return
        future, then = entry
        if future.done():
            return
        if "error" in message:
            error = message["error"] if isinstance(message["error"], dict) else {}
            future.set_exception(RpcError(int(error.get("code", 0)), str(error.get("message", "")),
                                          error.get("data")))
        else:
            future.set_result(message.get("result"))
        if then is not None:
            then(future)

    def _subscribed(self, done: asyncio.Future[Any]) -> None:
        if isinstance(done.exception(), RpcError):
            self.subscribed = False

    def _lose(self, reason: str, *, report: bool) -> None:
        if not self.up:
            return
        self.up = False
        self.subscribed = False
        self._deferred = []
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._transport is not None:
            self._transport.close()
        pending, self._pending = self._pending, {}
        for future, then in pending.values():
            if not future.done():
                future.set_exception(DaemonUnreachable(self.path, reason, lost=True))
                future.exception()  # retrieved here: no "never retrieved" warning when no one awaits it
                if then is not None:
                    then(future)
        if report:
            self._on_lost(reason)


def _peer_pid(sock: socket.socket | None) -> int:
    if sock is None:
        return 0
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return 0
    pid: int = struct.unpack("3i", creds)[0]
    return pid
