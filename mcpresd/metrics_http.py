"""`[metrics] listen`: GET /metrics over HTTP on loopback, for Prometheus to scrape, on the daemon's event loop.

Rules:
- Served on the daemon's asyncio loop, so no client may hold it: a request's head must arrive whole within
  `read_timeout` and fit in `max_request` bytes; a reply not taken by the client within `write_timeout`
  is dropped; at most `max_connections` at once: past that, the connection that has waited longest for its
  request is dropped to make room (so a local user holding every slot with silent connections cannot keep
  Prometheus out), and where every one has sent its request, the new one is closed at once. One request
  per connection.
- GET /metrics (any query string) answers 200 with the exposition; another path 404; another method 405;
  a request that is not HTTP/1.x 400; too large 431; too slow 408. No new dependency: a request line and
  headers are all it reads, and it ignores the headers.
- Loopback only (`config.parse_listen` refuses other addresses): there is no authentication.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from mcpresd.exposition import CONTENT_TYPE

log = logging.getLogger(__name__)

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}


class MetricsEndpoint:
    def __init__(self, produce: Callable[[], Awaitable[str]], *, read_timeout: float = 10.0,
                 write_timeout: float = 10.0, max_request: int = 8192, max_connections: int = 16) -> None:
        self._produce = produce
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.max_request = max_request
        self.max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiting: dict[asyncio.Task[None], None] = {}  # those still reading their request, oldest first

    @property
    def connections(self) -> int:
        """Connections being served now."""
        return len(self._tasks)

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port, limit=self.max_request,
                                                  reuse_address=True)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._tasks) >= self.max_connections and self._waiting:
            oldest = next(iter(self._waiting))
            del self._waiting[oldest]
            self._tasks.discard(oldest)
            oldest.cancel()
        if len(self._tasks) >= self.max_connections or task is None:
            writer.transport.abort()
            return
        self._tasks.add(task)
        self._waiting[task] = None
        try:
            status, body = await self._answer(reader, task)
            head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                    f"Content-Type: {CONTENT_TYPE if status == 200 else 'text/plain; charset=utf-8'}\r\n"
                    f"Content-Length: {len(body)}\r\n"
                    + ("Allow: GET\r\n" if status == 405 else "")
                    + "Connection: close\r\n\r\n")
            writer.write(head.encode("ascii") + body)
            await asyncio.wait_for(writer.drain(), self.write_timeout)
            writer.close()
        except (TimeoutError, ConnectionError):
            writer.transport.abort()  # a client that does not read its reply: drop it, and what it left unread
        except asyncio.CancelledError:
            writer.transport.abort()
            raise
        finally:
            self._tasks.discard(task)
            self._waiting.pop(task, None)

    async def _answer(self, reader: asyncio.StreamReader, task: asyncio.Task[None]) -> tuple[int, bytes]:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.read_timeout)
            self._waiting.pop(task, None)
        except TimeoutError:
            return 408, b"the request did not arrive in time\n"
        except asyncio.LimitOverrunError:
            return 431, f"a request may take at most {self.max_request} bytes\n".encode()
        except asyncio.IncompleteReadError:
            return 400, b"the request ended before its headers did\n"
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return 400, b"not an HTTP/1.x request\n"
        method, target = parts[0], parts[1]
        if target.split("?", 1)[0] != "/metrics":
            return 404, b"not found: the metrics are at /metrics\n"
        if method != "GET":
            return 405, b"only GET is served\n"
        try:
            return 200, (await self._produce()).encode("utf-8")
        except Exception as error:  # noqa: BLE001 - a failed store job (or text) is a 503 for this scrape, never a crash
            log.warning("metrics endpoint: the exposition failed: %s", error)
            return 503, b"the daemon could not build the exposition; see its log\n"
