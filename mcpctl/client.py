"""One small synchronous JSON-RPC client over the daemon's Unix socket."""

from __future__ import annotations

import json
import socket

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

from mcpresd.protocol import JSONRPC, MAX_MESSAGE_BYTES


class DaemonUnreachable(Exception):
    """No daemon answers on the socket."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot reach mcpresd at {path}: {reason}")
        self.path = path


class RpcError(Exception):
    """The daemon answered with a JSON-RPC error."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


class Client:
    """A connection to mcpresd; `call` sends one request and waits for its answer."""

    def __init__(self, path: str, timeout: float | None = 30.0) -> None:
        self.path = path
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._next_id = 0

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self._timeout)
        try:
            sock.connect(self.path)
        except FileNotFoundError:
            sock.close()
            raise DaemonUnreachable(self.path, "no socket there (is mcpresd running?)") from None
        except ConnectionRefusedError:
            sock.close()
            raise DaemonUnreachable(self.path, "connection refused (a stale socket: is mcpresd running?)") from None
        except OSError as error:
            sock.close()
            raise DaemonUnreachable(self.path, error.strerror or str(error)) from None
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        if self._sock is None:
            self.connect()
        self._next_id += 1
        message: dict[str, Any] = {"jsonrpc": JSONRPC, "id": self._next_id, "method": method}
        if params is not None:
            message["params"] = params
        reply = self._roundtrip(json.dumps(message, separators=(",", ":")).encode() + b"\n")
        if "error" in reply:
            error = reply["error"]
            raise RpcError(int(error.get("code", 0)), str(error.get("message", "")), error.get("data"))
        return reply.get("result")

    def _roundtrip(self, data: bytes) -> dict[str, Any]:
        sock = self._sock
        assert sock is not None
        try:
            sock.sendall(data)
            while b"\n" not in self._buffer:
                chunk = sock.recv(65536)
                if not chunk:
                    raise DaemonUnreachable(self.path, "the daemon closed the connection")
                self._buffer += chunk
                if len(self._buffer) > 64 * MAX_MESSAGE_BYTES:
                    raise DaemonUnreachable(self.path, "reply too large")
        except (BrokenPipeError, ConnectionResetError) as error:
            self.close()
            raise DaemonUnreachable(self.path, f"connection lost ({error.strerror})") from None
        except TimeoutError:
            self.close()
            raise DaemonUnreachable(self.path, "no answer in time") from None
        line, _, self._buffer = self._buffer.partition(b"\n")
        reply: dict[str, Any] = json.loads(line)
        return reply
