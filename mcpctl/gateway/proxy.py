"""The gateway: an MCP stdio proxy that admits each gated `tools/call` through mcpresd.

Rules of this module:
- Byte for byte. Every line is forwarded with its original bytes, in both
  directions, except: a gated `tools/call` is held until its allocation is
  granted and then forwarded unchanged; a server's `notifications/progress`
  on a token the gateway injected progress on is renumbered (see `_grant`);
  and the gateway writes messages of its own (injected progress, tool results
  saying why a call did not run, JSON-RPC errors with GatewayErrorCode).
- Only `tools/call` requests from the client are ever delayed, and only when a
  `[[tool]]` entry gates the tool; `initialize`, `server/discover`, `ping`,
  list calls, notifications and every response pass at once.
- Two id spaces. The client's request ids are tracked only for gated calls (and
  for task queries); a server→client message is matched against them only if
  it is a response (no `method`), so the server's own requests (sampling,
  elicitation, roots) and the client's answers to them are never confused with
  the client's calls.
- An allocation is released on the call's response (result, error, `isError`,
  `resultType: "input_required"`), when a task it
  started ends or its TTL runs out, when the server exits and when the gateway
  exits. A running call the client cancels keeps its allocation until the
  server answers it (servers usually do, or finish the work first) or
  `cancel_grace` passes without a sign of life from it (a response, progress
  on its token; progress that reaches its total counts as the answer, since
  the TypeScript SDK never sends the response of a cancelled request): the
  cancellation is forwarded, but the server may go on working, and the next
  call must not be granted what it still uses.
- The process doing the work holds the allocations: each is sent with the
  server's keeper as `holder_pid` (spawn.py, keeper.py), which exits only once
  every process of the server has. So mcpresd frees a call's resources when
  the gateway releases them, or when the server is gone, never while it may
  still use them: not when the gateway is SIGKILLed, not when the broker
  connection drops (releases that could not be sent then go out once it is
  back). If mcpresd refuses the keeper as a holder, or runs in a pid
  namespace the gateway cannot see (SO_PEERCRED says pid 0: the gateway's pids
  would mean other processes there), the connection holds them.
- The server never outlives the gateway: closing stdin gives it `stop_grace`
  to exit, then its process group gets SIGTERM and, a second later, SIGKILL;
  a signal to the gateway does that at once; a SIGKILLed gateway's keeper does
  it by itself.
- Logs go to stderr only, each line prefixed `mcpctl gateway: `.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from typing import Any

from mcpctl.actions import format_duration
from mcpctl.client import DaemonUnreachable, RpcError
from mcpctl.gateway import log, wire
from mcpctl.gateway.broker import Broker
from mcpctl.gateway.spawn import keeper_command, locate, server_environment
from mcpctl.gateway.tools import GatewayConfig, Rule
from mcpctl.gateway.wire import GatewayErrorCode
from mcpresd.protocol import ErrorCode, Method, format_size

LINE_LIMIT = 32 * 1024 * 1024
"""Lines up to this size are read whole and examined; a longer one is passed on in pieces, unexamined."""
TERM_GRACE_S = 2.0
"""How long the gateway waits for the server's output to end once the server has exited."""
KEEPER_WAIT_S = 3.0
"""How long the keeper gets to stop the server (SIGTERM, SIGKILL a second later) before it is SIGKILLed itself."""
RELEASE_GRACE_S = 1.0
"""How long the gateway waits, when it exits, for the daemon to have applied its releases."""
EARLY_EVENTS = 1024
ENDED = frozenset({"released", "holder_exited", "connection_closed", "expired", "revoked"})
"""Event kinds that end an active allocation."""

ALLOCATING, QUEUED, RUNNING, TASK, CANCELLED = "allocating", "queued", "running", "task", "cancelled"


class Call:
    """A gated `tools/call`, from the moment it arrives until its allocation is released."""

    __slots__ = ("request_id", "key", "line", "tool_id", "rule", "token", "state", "allocation_id", "ticker",
                 "injected", "arrived", "task_id", "task_timer", "watched", "grace_timer")

    def __init__(self, request_id: Any, key: str, line: bytes, tool_id: str, rule: Rule, token: Any) -> None:
        self.request_id = request_id
        self.key = key
        self.line = line
        self.tool_id = tool_id
        self.rule = rule
        self.token = token
        self.state = ALLOCATING
        self.allocation_id: str | None = None
        self.ticker: asyncio.Task[None] | None = None
        self.injected = 0
        """The last progress value the gateway sent on the call's token (0: none)."""
        self.arrived = time.monotonic()
        self.task_id: str | None = None
        self.task_timer: asyncio.TimerHandle | None = None
        self.watched = False
        """Whether the broker was subscribed to events when the call's allocate went out."""
        self.grace_timer: asyncio.TimerHandle | None = None
        """Once cancelled while running: when it is released if the server has not answered it."""

    @property
    def token_key(self) -> str | None:
        return None if self.token is None else wire.id_key(self.token)


class Output:
    """Whole lines to a pipe; once the far end has gone, writes are dropped and `closed` is true."""

    def __init__(self, writer: asyncio.StreamWriter | None, fd: int | None = None,
                 on_closed: Callable[[], None] | None = None) -> None:
        self._writer = writer
        self._fd = fd
        self._on_closed = on_closed
        self.closed = False

    def write(self, line: bytes) -> bool:
        if self.closed:
            return False
        writer = self._writer
        if writer is None:
            assert self._fd is not None
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(self._fd, view):]
            except OSError:
                self._lost()
                return False
            return True
        if writer.is_closing():
            self._lost()
            return False
        writer.write(line)
        return True

    async def drain(self) -> None:
        if self.closed or self._writer is None:
            return
        try:
            await self._writer.drain()
        except (ConnectionError, OSError):
            self._lost()

    def close(self) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.close()
        self.closed = True

    def _lost(self) -> None:
        if not self.closed:
            self.closed = True
            if self._on_closed is not None:
                self._on_closed()


async def lines(reader: asyncio.StreamReader) -> AsyncIterator[tuple[bytes, bool]]:
    """Each line with its newline, and whether it may be examined (False: a piece of an over-long line)."""
    long = False
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as end:
            if end.partial:
                yield end.partial, not long
            return
        except asyncio.LimitOverrunError as over:
            chunk = await reader.read(max(over.consumed, 1))
            if not chunk:
                return
            long = True
            yield chunk, False
            continue
        except (ConnectionError, OSError):
            return
        yield line, not long
        long = False


class Gateway:
    """One wrapped server, one client, one broker connection."""

    def __init__(self, config: GatewayConfig, command: list[str], server: str, socket_path: str) -> None:
        self.config = config
        self.command = command
        self.server = server
        self.session = os.urandom(8).hex()
        self.broker = Broker(socket_path, self._on_event, self._on_broker_lost)
        self.calls: dict[str, Call] = {}
        """Gated calls by the client's request id (JSON text), until they are answered."""
        self.by_allocation: dict[str, Call] = {}
        self.tasks: dict[str, Call] = {}
        """Calls whose result started a task, by task id: they keep their allocation until it ends."""
        self.cancelled: dict[str, Call] = {}
        """Running calls the client cancelled, by request id, until the server answers them or cancel_grace passes."""
        self.cancelled_tokens: dict[str, Call] = {}
        self.task_queries: dict[str, tuple[str, str]] = {}
        """The client's tasks/get|result|cancel requests on held tasks: request id -> (task id, method)."""
        self.shifts: dict[str, float] = {}
        """Progress tokens on which the gateway injected progress -> what the server's values are moved up by."""
        self.early: dict[str, dict[str, Any]] = {}
        self.allocating = 0
        self.released = False
        """Whether a release went out since the last request that confirms it."""
        self.outage = False
        self.reconnecting: asyncio.Task[None] | None = None
        self.stopping = asyncio.Event()
        self.stop_reason = ""
        self.proc: asyncio.subprocess.Process | None = None
        """The server's keeper, which holds the allocations (`holder_pid`) while mcpresd accepts it."""
        self.holder_pid: int | None = None
        self.keeper_held: set[str] = set()
        """Allocations held by the keeper (the rest are held by the broker connection)."""
        self.unreleased: set[str] = set()
        """Releases of keeper-held allocations that could not be sent while the broker was away: sent once back."""
        self.hurry = asyncio.Event()
        """Set by a signal: stop the server at once."""
        self.to_server = Output(None)
        self.to_client = Output(None)
        self._duplicate_warned = False

    # -- lifecycle -------------------------------------------------------------

    async def run(self) -> int:
        """Serve until the server exits, the client closes stdin, or a signal; the server's exit status."""
        from mcpctl import exitcodes

        loop = asyncio.get_running_loop()
        log(f"session {self.session}: wrapping {' '.join(self.command)!s} as server {self.server!r} "
            f"({len(self.config.rules)} tool entries); broker {self.broker.path}")
        try:
            await self.broker.connect()
        except DaemonUnreachable as error:
            self._begin_outage(error.reason)
        env = server_environment()
        try:
            path = locate(self.command[0], env)
            self.proc = await asyncio.create_subprocess_exec(
                *keeper_command(path, self.command), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                limit=LINE_LIMIT, env=env, process_group=0)
        except FileNotFoundError:
            log(f"cannot start {self.command[0]!r}: command not found")
            self.broker.close()
            return exitcodes.NOT_FOUND
        except OSError as error:
            log(f"cannot start {self.command[0]!r}: {error.strerror or error}")
            self.broker.close()
            return exitcodes.CANNOT_EXECUTE
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.holder_pid = self.proc.pid
        self.to_server = Output(self.proc.stdin)
        stdin = await _open_stdin(loop)
        self.to_client = await _open_stdout(loop, lambda: self._stop("the client stopped reading"))
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self._signalled, signal.Signals(sig).name)
        from_client = asyncio.create_task(self._from_client(stdin))
        from_server = asyncio.create_task(self._from_server(self.proc.stdout))
        stopped = asyncio.create_task(self.stopping.wait())
        await asyncio.wait({from_client, from_server, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if from_server.done():
            self._answer_held(GatewayErrorCode.SERVER_EXITED, "the wrapped server exited before the call could run")
        else:
            why = self.stop_reason or "the client closed stdin"
            log(f"{why}: stopping the server")
            self._answer_held(GatewayErrorCode.SHUTTING_DOWN, f"the gateway is stopping ({why})")
        self.to_server.close()
        status = await self._reap()
        try:
            await asyncio.wait_for(from_server, TERM_GRACE_S)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            pass
        from_client.cancel()
        stopped.cancel()
        await self._release_all()
        await self.to_client.drain()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        code = status if status >= 0 else 128 - status
        log(f"the server exited with status {code}")
        return code

    def _stop(self, why: str) -> None:
        if not self.stop_reason:
            self.stop_reason = why
        self.stopping.set()

    def _signalled(self, name: str) -> None:
        """SIGTERM, SIGINT, SIGHUP: stop, and stop the server at once (hosts SIGKILL a gateway that takes long)."""
        if self.stopping.is_set() and not self.hurry.is_set():
            log(f"{name} while stopping: stopping the server at once")
        self.hurry.set()
        self._stop(name)

    async def _reap(self) -> int:
        """Wait for the server (its keeper) to exit: stop_grace after its stdin closed, less on a signal."""
        proc = self.proc
        assert proc is not None
        exited = asyncio.ensure_future(proc.wait())
        if not self.hurry.is_set():
            hurry = asyncio.ensure_future(self.hurry.wait())
            await asyncio.wait({exited, hurry}, timeout=self.config.stop_grace, return_when=asyncio.FIRST_COMPLETED)
            hurry.cancel()
            if exited.done():
                return exited.result()
            if not self.hurry.is_set():
                log(f"the server did not exit within {self.config.stop_grace:g}s of its stdin closing")
        log("SIGTERM to the server's processes (SIGKILL to what is left a second later)")
        proc.terminate()  # the keeper stops the server's process group and reaps it all
        try:
            return await asyncio.wait_for(asyncio.shield(exited), KEEPER_WAIT_S)
        except asyncio.TimeoutError:
            log("the server's keeper did not exit: SIGKILL (the server gets its parent-death signal)")
            proc.kill()
            return await exited

    async def _release_all(self) -> None:
        for call in [*self.calls.values(), *self.tasks.values(), *self.cancelled.values()]:
            self._finish(call)
        if self.reconnecting is not None:
            self.reconnecting.cancel()
        if self.released:  # the reply to a later request means the releases have been applied
            try:
                await asyncio.wait_for(self.broker.request(Method.DAEMON_STATUS), RELEASE_GRACE_S)
            except (asyncio.TimeoutError, RpcError, DaemonUnreachable):
                pass
        self.broker.close()

    # -- client -> server ------------------------------------------------------

    async def _from_client(self, reader: asyncio.StreamReader) -> None:
        passing: bool | None = None  # within an over-long line: whether its pieces go on to the server
        head = tail = b""
        async for line, whole in lines(reader):
            if whole:
                if self._client_line(line):
                    continue
            else:
                # Over LINE_LIMIT: too long to examine. A response (the client answering the server's sampling or
                # elicitation request) is passed on in pieces; a request, which may be a gated tools/call, is not.
                if passing is None:
                    head, tail = line[:wire.EDGE_BYTES], b""
                    passing = wire.is_response_head(head)
                ended = line.endswith(b"\n")
                if not passing:
                    tail = (tail + line[-wire.EDGE_BYTES:])[-wire.EDGE_BYTES:]
                    if ended:
                        self._refuse_long(head, tail)
                        passing = None
                    continue
                if ended:
                    passing = None
            self.to_server.write(line)
            await self.to_server.drain()

    def _refuse_long(self, head: bytes, tail: bytes) -> None:
        """An over-long client request was dropped: answer it (by its id, where either end shows it)."""
        request_id = wire.long_request_id(head, tail)
        log(f"a client message over {format_size(LINE_LIMIT)} was not passed on (request id "
            f"{wire.id_key(request_id) if request_id is not None else 'unknown'}): too long to examine for gating")
        self.to_client.write(wire.error_response(
            request_id, GatewayErrorCode.NOT_EXAMINABLE,
            f"a message over {format_size(LINE_LIMIT)} was not passed on to the server: the gateway cannot "
            "examine a message that long for gating"))

    def _client_line(self, line: bytes) -> bool:
        """Examine a client line; True when the gateway has taken it (held, answered or swallowed)."""
        message = wire.parse(line)
        if isinstance(message, list):
            return self._batch(message)
        if not isinstance(message, dict):
            return False
        method = message.get("method")
        if method == "tools/call" and "id" in message:
            return self._admit(message, line)
        if method == "notifications/cancelled":
            return self._cancel(message, line)
        if method in wire.TASK_QUERIES and "id" in message and self.tasks:
            params = message.get("params")
            task_id = params.get("taskId") if isinstance(params, dict) else None
            if isinstance(task_id, str) and task_id in self.tasks:
                self.task_queries[wire.id_key(message["id"])] = (task_id, method)
        return False

    def _batch(self, batch: list[Any]) -> bool:
        """A JSON-RPC batch (MCP dropped them in 2025-06-18): passed on, unless it holds a gated tools/call.

        The gateway cannot hold one member of a batch while the others run, so such a batch is refused whole:
        each request in it is answered with NOT_EXAMINABLE, and the server sees none of it.
        """
        def gated(member: Any) -> bool:
            if not isinstance(member, dict) or member.get("method") != "tools/call" or "id" not in member:
                return False
            params = member.get("params")
            name = params.get("name") if isinstance(params, dict) else None
            return isinstance(name, str) and self.config.rule_for(name) is not None

        if not any(gated(member) for member in batch):
            return False
        answers = [json.loads(wire.error_response(
            member["id"], GatewayErrorCode.NOT_EXAMINABLE,
            "a JSON-RPC batch holding a gated tools/call was not passed on to the server: send the call alone"))
            for member in batch if isinstance(member, dict) and "id" in member and "method" in member]
        if answers:
            self.to_client.write(json.dumps(answers, ensure_ascii=False, separators=(",", ":")).encode() + b"\n")
        log("a JSON-RPC batch holding a gated tools/call was refused: send gated calls alone")
        return True

    def _admit(self, message: dict[str, Any], line: bytes) -> bool:
        params = message.get("params")
        name = params.get("name") if isinstance(params, dict) else None
        if not isinstance(name, str):
            return False
        rule = self.config.rule_for(name)
        if rule is None:
            return False
        key = wire.id_key(message["id"])
        if key in self.calls:
            if not self._duplicate_warned:
                log(f"request id {key} is already in use by a call in flight; passing the second one on ungated")
                self._duplicate_warned = True
            return False
        if not self.broker.up:
            if self.config.on_broker_down == "open":
                return False
            self.to_client.write(wire.error_response(
                message["id"], GatewayErrorCode.BROKER_UNREACHABLE,
                f"mcpresd is unreachable at {self.broker.path}, and this gateway refuses gated tool calls "
                f"without it (on_broker_down = \"closed\")"))
            return True
        call = Call(message["id"], key, line, _tool_id(self.server, name), rule, wire.progress_token(params))
        self.calls[key] = call
        self._allocate(call)
        return True

    def _cancel(self, message: dict[str, Any], line: bytes) -> bool:
        params = message.get("params")
        if not isinstance(params, dict) or "requestId" not in params:
            return False
        call = self.calls.get(wire.id_key(params["requestId"]))
        if call is None:
            return False
        if call.state in (ALLOCATING, QUEUED):
            log(f"{call.tool_id} call {call.key} cancelled while it waited: withdrawn, never sent to the server")
            self._finish(call)
            return True
        self.to_server.write(line)
        self._keep_until_answered(call)
        return True

    def _keep_until_answered(self, call: Call) -> None:
        """A running call was cancelled: its allocation stays until the server answers it or cancel_grace passes."""
        if self.calls.get(call.key) is call:
            del self.calls[call.key]
        call.state = CANCELLED
        if call.allocation_id is None:
            self._finish(call)
            return
        earlier = self.cancelled.get(call.key)
        if earlier is not None:  # the client reused the id of a call it had cancelled
            self._finish(earlier)
        self.cancelled[call.key] = call
        token_key = call.token_key
        if token_key is not None:
            self.cancelled_tokens[token_key] = call
        log(f"{call.tool_id} call {call.key} cancelled while it ran: its allocation {call.allocation_id} is kept "
            f"until the server answers it, or for {format_duration(self.config.cancel_grace)}")
        self._restart_grace(call)

    def _restart_grace(self, call: Call) -> None:
        if call.grace_timer is not None:
            call.grace_timer.cancel()
        call.grace_timer = asyncio.get_running_loop().call_later(self.config.cancel_grace, self._grace_over, call)

    def _grace_over(self, call: Call) -> None:
        call.grace_timer = None
        if self.cancelled.get(call.key) is call:
            log(f"{call.tool_id} call {call.key}: no answer from the server "
                f"{format_duration(self.config.cancel_grace)} after its cancellation: releasing its allocation")
            self._finish(call)

    # -- allocating --------------------------------------------------------------

    def _allocate(self, call: Call) -> None:
        """Ask mcpresd for the call's resources: detached, so the reply (active or queued) comes at once."""
        execution_id = f"{self.session}/{call.key}"[:200]
        self.allocating += 1
        call.watched = self.broker.subscribed
        params = call.rule.allocate_params(call.tool_id, execution_id)
        holder_pid = self.holder_pid if self.broker.peer_pid > 0 else None  # pids mean the same to the daemon
        if holder_pid is not None:
            params["holder_pid"] = holder_pid
        self.broker.request(Method.ALLOCATE, params, then=lambda done: self._allocated(call, done, holder_pid))

    def _allocated(self, call: Call, done: asyncio.Future[Any], holder_pid: int | None = None) -> None:
        self.allocating -= 1
        early = self.early
        if not self.allocating:
            self.early = {}
        error = done.exception()
        if error is not None:
            refused_holder = isinstance(error, RpcError) and (
                error.code == ErrorCode.INVALID_HOLDER
                or (isinstance(error.data, dict) and error.data.get("field") == "holder_pid"))
            if refused_holder and holder_pid is not None and self.calls.get(call.key) is call:
                if self.holder_pid is not None:
                    self.holder_pid = None
                    log(f"mcpresd refuses the server's keeper (pid {holder_pid}) as a holder ({error}): "
                        f"allocations are held by the gateway's connection instead")
                self._allocate(call)
                return
            if self.calls.get(call.key) is call:
                if isinstance(error, RpcError):
                    self._refused(call, error)
                else:
                    self._without_broker(call)
            return
        reply = done.result()
        allocation_id = reply["id"]
        if self.calls.get(call.key) is not call:  # cancelled, or the gateway is stopping
            self._send_release(allocation_id)
            return
        call.allocation_id = allocation_id
        self.by_allocation[allocation_id] = call
        if holder_pid is not None:
            self.keeper_held.add(allocation_id)
        if reply["state"] == "active":
            self._grant(call)
            return
        call.state = QUEUED
        if not call.watched:  # events about it may have gone unsent: subscribe, then read where it stands
            self.broker.subscribe()
            self.broker.request(Method.ALLOCATIONS_GET, {"id": allocation_id},
                                then=lambda done: self._checked(call, allocation_id, done))
        else:
            event = early.pop(allocation_id, None)
            if event is not None:
                self._on_event(event)
                if call.state != QUEUED:
                    return
        log(f"{call.tool_id} call {call.key} queued for {call.rule.summary} (allocation {allocation_id})")
        if call.token is not None:
            call.ticker = asyncio.create_task(self._tick(call))

    def _checked(self, call: Call, allocation_id: str, done: asyncio.Future[Any]) -> None:
        """What a queued call's allocation became before the subscription took effect, if anything."""
        if done.exception() is not None:
            return
        if call.state != QUEUED or call.allocation_id != allocation_id:
            return
        allocation = done.result()
        if allocation["state"] == "active":
            self._grant(call)
        elif allocation["state"] != "queued":
            self._withdrawn(call, {"reason": allocation.get("release_reason")})

    def _refused(self, call: Call, error: RpcError) -> None:
        self._finish(call)
        if error.code == ErrorCode.INSUFFICIENT_CAPACITY:
            text = f"{call.tool_id} did not run: {call.rule.summary} is not free now ({error.message})"
        elif error.code in (ErrorCode.INVALID_PARAMS, ErrorCode.UNKNOWN_RESOURCE, ErrorCode.UNKNOWN_POOL):
            text = f"{call.tool_id} did not run: the gateway's tools file asks for something mcpresd refuses " \
                   f"({error.message})"
            log(f"{call.tool_id}: mcpresd refused the request: {error.message} (error {error.code})")
        else:
            text = f"{call.tool_id} did not run: {error.message}"
        self.to_client.write(wire.tool_error(call.request_id, text))

    def _grant(self, call: Call) -> None:
        """Send the held call on. Progress the gateway injected (1..N) is followed by the server's, moved up by N+1."""
        call.state = RUNNING
        if call.ticker is not None:
            call.ticker.cancel()
            call.ticker = None
        token_key = call.token_key
        if call.injected and token_key is not None:
            self.shifts[token_key] = call.injected + 1
        self.to_server.write(call.line)

    async def _tick(self, call: Call) -> None:
        """Progress on the call's token while it waits: at once, then every progress_interval."""
        while True:
            message = await self._explain(call)
            if call.state != QUEUED:
                return
            call.injected += 1
            self.to_client.write(wire.progress(call.token, call.injected, message))
            await asyncio.sleep(self.config.progress_interval)

    async def _explain(self, call: Call) -> str:
        waited = format_duration(time.monotonic() - call.arrived)
        text = f"{wire.PREFIX}{call.tool_id} waits for {call.rule.summary} ({waited} so far)"
        if call.allocation_id is None:
            return text
        try:
            info = await self.broker.request(Method.ALLOCATIONS_EXPLAIN, {"id": call.allocation_id})
        except (RpcError, DaemonUnreachable):
            return text
        return text + _why(info)

    # -- broker events -------------------------------------------------------------

    def _on_event(self, event: dict[str, Any]) -> None:
        allocation_id = event.get("allocation_id")
        if not isinstance(allocation_id, str):
            return
        kind = event.get("kind")
        call = self.by_allocation.get(allocation_id)
        if call is None:
            if self.allocating and kind != "queued":  # it may be ours, its allocate's reply not yet read
                self.early[allocation_id] = event
                if len(self.early) > EARLY_EVENTS:
                    del self.early[next(iter(self.early))]
            return
        detail = event.get("detail") if isinstance(event.get("detail"), dict) else {}
        assert isinstance(detail, dict)
        if call.state == QUEUED:
            if kind == "allocated":
                self._grant(call)
            elif kind == "withdrawn":
                self._withdrawn(call, detail)
            return
        if kind in ENDED:
            self.by_allocation.pop(allocation_id, None)
            call.allocation_id = None
            log(f"allocation {allocation_id} of {call.tool_id} call {call.key} ended while the call ran: {kind}")
        elif kind == "preempted":
            log(f"allocation {allocation_id} of {call.tool_id} call {call.key} is preempted: it will be revoked "
                f"in {detail.get('grace_s', '?')}s")

    def _withdrawn(self, call: Call, detail: dict[str, Any]) -> None:
        call.allocation_id = None  # a withdrawn request holds nothing: no release to send
        self._finish(call)
        reason = detail.get("reason")
        if reason == "timeout":
            waited = format_duration(call.rule.wait)
            text = (f"{call.tool_id} did not run: it waited {waited} for {call.rule.summary}, which was not free "
                    f"in time. Nothing is held; try again later.")
        elif reason == "rejected":
            text = f"{call.tool_id} did not run: mcpresd can no longer serve {call.rule.summary} " \
                   f"({detail.get('why', 'rejected')})"
        else:
            text = f"{call.tool_id} did not run: its request for {call.rule.summary} was withdrawn ({reason})"
        log(text)
        self.to_client.write(wire.tool_error(call.request_id, text))

    def _on_broker_lost(self, reason: str) -> None:
        self._begin_outage(reason)
        for call in [*self.calls.values(), *self.tasks.values(), *self.cancelled.values()]:
            if call.state == QUEUED:
                self._without_broker(call)
            elif call.allocation_id is not None and call.allocation_id not in self.keeper_held:
                self.by_allocation.pop(call.allocation_id, None)
                call.allocation_id = None  # the daemon released it with the connection

    def _without_broker(self, call: Call) -> None:
        """A call that waited when the broker went away: on ungated, or refused, as the tools file says."""
        allocation_id, call.allocation_id = call.allocation_id, None
        if allocation_id is not None:
            self.by_allocation.pop(allocation_id, None)
            self._send_release(allocation_id)  # a request held by the keeper stays queued: withdraw it once back
        if self.config.on_broker_down == "open":
            self._grant(call)
            return
        self._finish(call)
        self.to_client.write(wire.error_response(
            call.request_id, GatewayErrorCode.BROKER_UNREACHABLE,
            f"lost mcpresd at {self.broker.path} while the call waited (on_broker_down = \"closed\")"))

    def _begin_outage(self, reason: str) -> None:
        if not self.outage:
            self.outage = True
            how = "passing tool calls on ungated" if self.config.on_broker_down == "open" else \
                "refusing gated tool calls"
            log(f"cannot reach mcpresd at {self.broker.path} ({reason}): {how} until it is back "
                f"(on_broker_down = \"{self.config.on_broker_down}\")")
        if self.reconnecting is None or self.reconnecting.done():
            self.reconnecting = asyncio.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        while True:
            await asyncio.sleep(self.config.reconnect_interval)
            try:
                await self.broker.connect()
            except DaemonUnreachable:
                continue
            self.outage = False
            log(f"mcpresd at {self.broker.path} is reachable again: gated tool calls are admitted through it")
            unreleased, self.unreleased = self.unreleased, set()
            for allocation_id in unreleased:
                self.keeper_held.add(allocation_id)
                self._send_release(allocation_id)
            return

    # -- server -> client --------------------------------------------------------------

    async def _from_server(self, reader: asyncio.StreamReader) -> None:
        head: bytes | None = None  # the start of an over-long line being passed on in pieces; tail: its end so far
        tail = b""
        async for line, whole in lines(reader):
            after: Callable[[], None] | None = None
            if whole:
                if self.calls or self.tasks or self.task_queries or self.cancelled:
                    line, after = self._server_line(line)
            else:
                if head is None:
                    head = line[:wire.EDGE_BYTES]
                tail = line[-wire.EDGE_BYTES:] if len(line) >= wire.EDGE_BYTES else \
                    (tail + line)[-wire.EDGE_BYTES:]
                if line.endswith(b"\n"):  # the last piece: what it answered is released like any response
                    after = self._long_line_ended(head, tail)
                    head, tail = None, b""
            self.to_client.write(line)
            if after is not None:
                after()
            await self.to_client.drain()

    def _long_line_ended(self, head: bytes, tail: bytes) -> Callable[[], None] | None:
        """What to do once an over-long line has passed: release the call (or task) it answered, if any."""
        key = wire.long_response_id(head, tail)
        if key is None:
            return None
        call = self.calls.get(key)
        if call is not None and call.state == RUNNING:
            return lambda: self._responded(call, {})
        cancelled = self.cancelled.get(key)
        if cancelled is not None:
            return lambda: self._finish(cancelled)
        query = self.task_queries.pop(key, None)
        if query is not None:
            return lambda: self._task_answered(query[0], query[1], {})
        return None

    def _server_line(self, line: bytes) -> tuple[bytes, Callable[[], None] | None]:
        """The line to send the client, and what to do once it is sent (release an allocation)."""
        message = wire.parse(line)
        if not isinstance(message, dict):
            return line, None
        method = message.get("method")
        if method is None:
            if "id" not in message:
                return line, None
            key = wire.id_key(message["id"])
            call = self.calls.get(key)
            if call is not None and call.state == RUNNING:
                return line, lambda: self._responded(call, message)
            cancelled = self.cancelled.get(key)
            if cancelled is not None:
                return line, lambda: self._finish(cancelled)
            query = self.task_queries.pop(key, None)
            if query is not None:
                return line, lambda: self._task_answered(query[0], query[1], message)
            return line, None
        if method == "notifications/progress" and (self.shifts or self.cancelled_tokens):
            params = message.get("params")
            token = params.get("progressToken") if isinstance(params, dict) else None
            token_key = wire.id_key(token) if token is not None else None
            still_working = self.cancelled_tokens.get(token_key) if token_key is not None else None
            after: Callable[[], None] | None = None
            if still_working is not None:  # the server goes on with a cancelled call: so does its grace
                if wire.progress_complete(params):  # until its own progress says the work is done
                    after = functools.partial(self._finish, still_working)
                else:
                    self._restart_grace(still_working)
            shift = self.shifts.get(token_key) if token_key is not None else None
            if shift is not None:
                return wire.shift_progress(message, shift) or line, after
            return line, after
        elif method == "notifications/tasks/status" and self.tasks:
            params = message.get("params")
            if isinstance(params, dict) and params.get("status") in wire.TERMINAL_TASK_STATES:
                task_id = params.get("taskId")
                if isinstance(task_id, str) and task_id in self.tasks:
                    return line, lambda: self._task_ended(task_id)
        return line, None

    def _responded(self, call: Call, message: dict[str, Any]) -> None:
        if self.calls.get(call.key) is call:
            del self.calls[call.key]
        token_key = call.token_key
        if token_key is not None:
            self.shifts.pop(token_key, None)
        task = wire.task_of(message.get("result")) if "result" in message else None
        if task is not None and task[2] not in wire.TERMINAL_TASK_STATES and call.allocation_id is not None:
            task_id, ttl_ms, _ = task
            call.state = TASK
            call.task_id = task_id
            self.tasks[task_id] = call
            if ttl_ms is not None:
                call.task_timer = asyncio.get_running_loop().call_later(
                    ttl_ms / 1000, self._task_ended, task_id)
            return
        self._finish(call)

    def _task_answered(self, task_id: str, method: str, message: dict[str, Any]) -> None:
        result = message.get("result")
        if method == "tasks/result" or "error" in message:  # tasks/result answers only once the task has ended
            self._task_ended(task_id)
        elif isinstance(result, dict) and result.get("status") in wire.TERMINAL_TASK_STATES:
            self._task_ended(task_id)

    def _task_ended(self, task_id: str) -> None:
        call = self.tasks.get(task_id)
        if call is not None:
            self._finish(call)

    # -- releasing ----------------------------------------------------------------------

    def _finish(self, call: Call) -> None:
        """Forget a call and release what it holds (withdraw it, if it is still queued)."""
        if self.calls.get(call.key) is call:
            del self.calls[call.key]
        if call.task_id is not None and self.tasks.get(call.task_id) is call:
            del self.tasks[call.task_id]
        if self.cancelled.get(call.key) is call:
            del self.cancelled[call.key]
        if call.grace_timer is not None:
            call.grace_timer.cancel()
            call.grace_timer = None
        if call.ticker is not None:
            call.ticker.cancel()
            call.ticker = None
        if call.task_timer is not None:
            call.task_timer.cancel()
            call.task_timer = None
        token_key = call.token_key
        if token_key is not None and call.state != TASK:
            self.shifts.pop(token_key, None)
        if token_key is not None and self.cancelled_tokens.get(token_key) is call:
            del self.cancelled_tokens[token_key]
        allocation_id, call.allocation_id = call.allocation_id, None
        if allocation_id is not None:
            self.by_allocation.pop(allocation_id, None)
            self._send_release(allocation_id)

    def _send_release(self, allocation_id: str) -> None:
        """Release (or withdraw) an allocation: a notification, so no reply to wait for or read.

        The only refusals are "already released" and "not found", which need no action.
        """
        held_by_keeper = allocation_id in self.keeper_held
        self.keeper_held.discard(allocation_id)
        if self.broker.notify(Method.RELEASE, {"id": allocation_id}):
            self.released = True
        elif held_by_keeper:  # it outlives the connection: release it once the daemon is back
            self.unreleased.add(allocation_id)

    def _answer_held(self, code: GatewayErrorCode, message: str) -> None:
        """Answer every call that never reached the server; used when the gateway stops."""
        for call in list(self.calls.values()):
            if call.state in (ALLOCATING, QUEUED):
                self._finish(call)
                self.to_client.write(wire.error_response(call.request_id, code, message))


def _tool_id(server: str, tool: str) -> str:
    text = f"{server}/{tool}"
    return "".join(ch if ord(ch) >= 0x20 else "?" for ch in text)[:200]


def _why(info: Any) -> str:
    """What allocations.explain says, in one clause: place in the queue, what is short, who holds it."""
    if not isinstance(info, dict) or not info.get("queued"):
        return ""
    parts = [f"{info.get('position')} of {info.get('queue_length')} in the queue"]
    shortfalls = info.get("shortfalls") or []
    if shortfalls:
        parts.append("short of " + ", ".join(
            f"{s.get('resource')} (asks {_amount(s.get('resource'), s.get('requested'))}, "
            f"free {_amount(s.get('resource'), s.get('free'))})" for s in shortfalls if isinstance(s, dict)))
    elif info.get("fits_now") and info.get("ahead"):
        parts.append(f"request {info['ahead']} goes first")
    blockers = info.get("blockers") or []
    holders = sorted({str(b.get("tool_id") or b.get("id")) for b in blockers if isinstance(b, dict)})
    if holders:
        more = f" and {len(holders) - 3} more" if len(holders) > 3 else ""
        parts.append("held by " + ", ".join(holders[:3]) + more)
    return ": " + "; ".join(parts)


def _amount(resource: Any, value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "?"
    if isinstance(resource, str) and (resource == "memory" or resource.startswith("disk")):
        return format_size(value)
    return f"{value:g}"


async def _open_stdin(loop: asyncio.AbstractEventLoop) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=LINE_LIMIT, loop=loop)
    pipe = os.fdopen(0, "rb", buffering=0, closefd=False)
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader, loop=loop), pipe)
    except ValueError:  # a regular file: read it in a thread
        async def feed() -> None:
            while chunk := await loop.run_in_executor(None, os.read, 0, 1 << 16):
                reader.feed_data(chunk)
            reader.feed_eof()

        asyncio.create_task(feed())
    return reader


async def _open_stdout(loop: asyncio.AbstractEventLoop, on_closed: Callable[[], None]) -> Output:
    pipe = os.fdopen(1, "wb", buffering=0, closefd=False)
    try:
        transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, pipe)
    except ValueError:  # a regular file: plain blocking writes
        return Output(None, fd=1, on_closed=on_closed)
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    return Output(writer, on_closed=on_closed)
