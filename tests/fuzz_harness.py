"""An in-process daemon for fuzzing: the real Dispatcher, GroupCommitter batch logic and Broker, no socket, no thread.

`submit` runs each store job at once through `GroupCommitter._run_batch` (the daemon's own transaction handling:
a domain error still commits, anything else rolls back and rebuilds the ledger) and returns a done future.
Shared by tests/unit/test_fuzz_protocol.py and bench/bench_fuzz.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from pathlib import Path
from typing import Any

from mcpresd.core.model import Resource
from mcpresd.protocol import JSONRPC, MAX_QUANTITY, MIN_QUANTITY, ErrorCode, ResourceType
from mcpresd.rpc import Dispatcher, StoreJob
from mcpresd.server import GroupCommitter, Limits
from mcpresd.service import Broker, Caller
from mcpresd.store import Store

AROUND_THE_BOUNDS = [MAX_QUANTITY, math.nextafter(MAX_QUANTITY, math.inf), 2**63 + 1, 2**63 - 1, 1e308,
                     1.7976931348623157e308, MIN_QUANTITY, math.nextafter(MIN_QUANTITY, 0), 5e-324,
                     2.2250738585072014e-308]
"""The bounds on every number (protocol.MAX_QUANTITY, MIN_QUANTITY) and the floats on either side of them."""

UID = 4242
"""Neither root nor the daemon's user: db.backup is refused, so a fuzzed path never writes a file."""

GPUS = [Resource(f"gpu{i}", ResourceType.GPU, 1.0, "devices", uuid=f"GPU-{i:04d}", source="discovered")
        for i in range(2)]
DECLARED = [Resource("licence", ResourceType.CUSTOM, 2.0, "seats", source="config"),
            Resource("slot", ResourceType.CUSTOM, 10.0, "slots", source="config")]
TABLES = ("resources", "allocations", "allocation_items")


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakePeer:
    def __init__(self, connection: int) -> None:
        self.caller = Caller(uid=UID, gid=UID, pid=os.getpid(), connection=connection)
        self.notified: list[bytes] = []
        self.subscribed = False
        self.batch_reply_bytes = Limits.batch_reply

    def notify(self, data: bytes) -> None:
        self.notified.append(data)

    def subscribe(self) -> None:
        self.subscribed = True


class InProcessDaemon:
    def __init__(self, path: Path) -> None:
        self.store = Store(path)
        self.store.conn.execute("PRAGMA synchronous=OFF")  # speed only: nothing here survives a crash test
        self.clock = FakeClock()
        self.broker = Broker(self.store, clock=self.clock)
        with self.store.transaction():
            self.broker.reconcile_resources(GPUS, DECLARED)
        self.broker.take_outbox()
        self.loop = asyncio.new_event_loop()
        self.thread = GroupCommitter(lambda: self.broker, on_commit=lambda outbox: None)
        self.thread.broker = self.broker
        self.thread._loop = self.loop
        self.dispatcher = Dispatcher(self.submit, discover=lambda: list(GPUS))
        self._connections = 0

    def close(self) -> None:
        self.loop.close()
        self.store.close()

    def submit(self, job: StoreJob, submitter: object = None) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self.loop.create_future()
        outcomes = self.thread._run_batch([(job, future)])
        self.thread._committed(outcomes, self.broker.take_outbox())
        return future

    def peer(self) -> FakePeer:
        self._connections += 1
        return FakePeer(self._connections)

    def snapshot(self) -> dict[str, list[tuple[Any, ...]]]:
        return {t: self.store.conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in TABLES}

    def changes(self) -> int:
        return self.store.conn.total_changes

    def known_ids(self) -> list[str]:
        return sorted(self.broker.live)[:20]

    def send(self, line: bytes, peer: FakePeer) -> tuple[list[bytes | None], bool]:
        """Hand `line` to the dispatcher; return every reply and whether the harness had to settle a wait."""
        return self.loop.run_until_complete(self._send(line, peer))

    async def _send(self, line: bytes, peer: FakePeer) -> tuple[list[bytes | None], bool]:
        replies: list[bytes | None] = []
        self.dispatcher.handle_line(line, peer, replies.append)
        await self._settle(replies)
        intervened = False
        if not replies:
            # A request that waits for a queued allocation: end the wait the ways the daemon does.
            intervened = True
            self.submit(lambda broker: broker.connection_closed(peer.caller.connection))
            await self._settle(replies)
            if not replies:
                admin = Caller(uid=0, gid=0, pid=None, admin=True)
                for allocation_id in [a.id for a in self.broker.queued]:
                    self.submit(lambda broker, i=allocation_id: broker._end(broker.live[i], "cancelled", admin))
                await self._settle(replies)
        for _ in range(3):
            await asyncio.sleep(0)  # a second reply, if there were one, would come now
        return replies, intervened

    async def _settle(self, replies: list[bytes | None]) -> None:
        for _ in range(30):
            if replies:
                return
            await asyncio.sleep(0)
        if self.dispatcher._tasks:
            await asyncio.wait(set(self.dispatcher._tasks), timeout=5)
            for _ in range(30):
                if replies:
                    return
                await asyncio.sleep(0)

    def tidy(self, peer: FakePeer) -> None:
        """End what this example's connection held; keep the store small."""
        self.submit(lambda broker: broker.connection_closed(peer.caller.connection))
        if len(self.broker.live) > 20:
            admin = Caller(uid=0, gid=0, pid=None, admin=True)
            for allocation_id in list(self.broker.live):
                self.submit(lambda broker, i=allocation_id: broker._end(broker.live[i], "released", admin))
        self.loop.run_until_complete(asyncio.sleep(0))


# -- what a reply must look like -----------------------------------------------

_NO_ID = object()


def _valid_id(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _expected_id(message: Any) -> Any:
    """The id a reply to one message must carry (None for null); _NO_ID for a valid notification."""
    if not isinstance(message, dict) or "id" not in message or not _valid_id(message["id"]):
        if (isinstance(message, dict) and "id" not in message and message.get("jsonrpc") == JSONRPC
                and isinstance(message.get("method"), str)
                and ("params" not in message or isinstance(message["params"], (dict, list)))):
            return _NO_ID
        return None
    return message["id"]


def _no_constant(name: str) -> Any:
    raise ValueError(name)


def _strict_json(line: bytes) -> Any:
    """The message as the daemon reads it: strict UTF-8 (no lone surrogates), no NaN or Infinity."""
    return json.loads(line.decode("utf-8"), parse_constant=_no_constant)


class BadReply(AssertionError):
    pass


def check_response(response: Any) -> dict[str, Any]:
    if not isinstance(response, dict) or response.get("jsonrpc") != JSONRPC or "id" not in response:
        raise BadReply(f"not a JSON-RPC 2.0 response: {response!r:.300}")
    if set(response) not in ({"jsonrpc", "id", "result"}, {"jsonrpc", "id", "error"}):
        raise BadReply(f"a response has result or error, not both or neither: {sorted(response)}")
    if "error" in response:
        error = response["error"]
        if not isinstance(error, dict) or not set(error) <= {"code", "message", "data"}:
            raise BadReply(f"bad error object: {error!r:.300}")
        if not isinstance(error.get("code"), int) or isinstance(error["code"], bool):
            raise BadReply(f"error code is not an int: {error!r:.300}")
        if not isinstance(error.get("message"), str) or not error["message"]:
            raise BadReply(f"error message is not a non-empty string: {error!r:.300}")
        if error["code"] == ErrorCode.INTERNAL_ERROR:
            raise BadReply(f"internal error (a crash in a handler): {error!r:.300}")
    return response


def check_reply(line: bytes, replies: list[bytes | None]) -> list[dict[str, Any]]:
    """Assert the one reply to `line` is well formed; return its responses."""
    if len(replies) != 1:
        raise BadReply(f"reply called {len(replies)} times")
    data = replies[0]
    try:
        message: Any = _strict_json(line)
        parsed = True
    except (ValueError, RecursionError):
        message, parsed = None, False
    if data is None:
        if parsed and isinstance(message, list) and message and all(_expected_id(m) is _NO_ID for m in message):
            return []
        if parsed and _expected_id(message) is _NO_ID:
            return []
        raise BadReply(f"no reply to {line!r:.300}")
    if not isinstance(data, bytes) or not data.endswith(b"\n") or data.count(b"\n") != 1:
        raise BadReply(f"reply is not one line: {data!r:.300}")
    decoded = json.loads(data)
    if not parsed or not isinstance(message, list) or not message:
        response = check_response(decoded)
        expected = None if not parsed else _expected_id(message)
        if expected is _NO_ID:
            raise BadReply(f"a notification was answered: {data!r:.300}")
        if response["id"] != expected or type(response["id"]) is not type(expected):
            raise BadReply(f"reply id {response['id']!r} to a message with id {expected!r}")
        return [response]
    if not isinstance(decoded, list) or not decoded or len(decoded) > len(message):
        raise BadReply(f"batch reply is not a non-empty array of at most {len(message)}: {decoded!r:.300}")
    ids = [_expected_id(m) for m in message]
    for response in decoded:
        check_response(response)
        if response["id"] is not None and not any(i is not _NO_ID and i == response["id"] for i in ids):
            raise BadReply(f"batch reply id {response['id']!r} matches no request")
    return decoded


def all_failed(line: bytes, responses: list[dict[str, Any]]) -> bool:
    """Every message in `line` was answered with an error (so nothing may have been written)."""
    if not responses or any("error" not in r for r in responses):
        return False
    try:
        message = _strict_json(line)
    except (ValueError, RecursionError):
        return True
    return len(responses) == (len(message) if isinstance(message, list) and message else 1)


def encode_line(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")

