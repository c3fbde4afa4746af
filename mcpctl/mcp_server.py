"""`mcpctl mcp-server`: this machine's resources, served to an AI agent as an MCP server over stdio.

Rules of this module:
- It is imported only by `mcpctl mcp-server` (and `python -m mcpctl.mcp_server`), never on
  another command's path: it pulls in the MCP SDK, pydantic and anyio.
- The holder rule: every allocation the agent makes is held by this server's own persistent
  connection to mcpresd (no `holder_pid`). The server lives as long as the agent's session, so
  whatever the agent forgot to release goes when the session ends: on a clean exit, on SIGKILL,
  on a crash. A daemon restart also ends them (the connection closes).
- One request at a time on the holding connection, and every one of them is quick: a request
  that may queue is sent with `"detach": true`, and the wait for its grant runs as
  `allocations.wait` on a second connection of its own, in rounds of PROGRESS_EVERY_S that
  report progress to the agent. The daemon answers a connection's requests in order, so a
  blocking wait on the holding connection would hold back every other tool call.
- The session's list of handles is what it holds now: a handle leaves it when it is released
  or withdrawn here, and before the list is shown the daemon is asked which of the others are
  still active or queued (a lease ran out, a wait ran out, an admin released it). When the
  holding connection is lost, everything on it is gone, and the list with it.
- Daemon errors become tool results with `isError: true` and the daemon's own message; only
  a malformed call (the SDK's argument validation) is worded by the SDK.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.streams.buffered import BufferedByteReceiveStream
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field
from typing_extensions import TypedDict

from mcpctl.actions import format_duration, run_environment
from mcpctl.client import DaemonUnreachable, RpcError
from mcpctl.commands.explain import explanation_lines
from mcpctl.escape import printable
from mcpresd.protocol import (
    JSONRPC,
    MAX_BATCH,
    MAX_MESSAGE_BYTES,
    VERSION,
    ErrorCode,
    Method,
    UnitError,
    format_amount,
    format_size,
    parse_amount,
    parse_size,
    resolve_socket,
)

CALL_TIMEOUT_S = 30.0
"""The longest a quick request may take before the daemon counts as unreachable."""
PROGRESS_EVERY_S = 5.0
"""While a request waits in the queue: how often the agent hears about it (progress keeps hosts from timing out)."""
RELEASE_ON_CANCEL_S = 5.0
"""How long a cancelled wait may spend withdrawing its request."""
ENDED_KEPT = 1024
"""How many ended handles a session remembers, so that releasing one again says it has ended."""
NETWORK_LINES = 3
"""host_status lists at most this many network interfaces one per line; more are summed up in one line."""

INSTRUCTIONS = """\
mcpres brokers this machine's CPU, memory, GPUs and licences between jobs and agents.
Call host_status before heavy work to see what is allocated, free and measurably busy.
allocate reserves resources all or nothing and returns a handle; run the work with the env it
returns (CUDA_VISIBLE_DEVICES names the granted GPUs), then release the handle. Without a wait,
a request that does not fit fails at once; with a wait (seconds) it queues. explain says why a
queued request waits. Everything you hold is released when this MCP session ends."""


# -- the daemon ---------------------------------------------------------------


class DaemonConnection:
    """One connection to mcpresd: one request at a time, its reply matched by id.

    A reply left over from a call that was cancelled mid-way has another id and is skipped, so
    a cancelled call never hands its reply to the next one. The connection opens on first use
    and again after it was lost.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._stream: anyio.abc.ByteStream | None = None
        self._reader: BufferedByteReceiveStream | None = None
        self._lock = anyio.Lock()
        self._next_id = 0

    async def call(self, method: str, params: dict[str, Any] | None = None, *,
                   timeout: float | None = CALL_TIMEOUT_S) -> Any:
        """Send one request and return its result; RpcError for the daemon's error, DaemonUnreachable if none."""
        async with self._lock:
            request = self._request(method, params)
            reply = await self._exchange(request, request["id"], timeout)
        return _result_of(reply)

    async def batch(self, calls: Sequence[tuple[str, dict[str, Any] | None]]) -> list[Any]:
        """Several requests as one JSON-RPC batch: one round trip; their results in order, or the first error."""
        async with self._lock:
            requests = [self._request(method, params) for method, params in calls]
            replies = await self._exchange(requests, [r["id"] for r in requests], CALL_TIMEOUT_S)
        if isinstance(replies, dict):  # the batch as a whole was refused
            return [_result_of(replies)]
        by_id = {reply.get("id"): reply for reply in replies if isinstance(reply, dict)}
        return [_result_of(by_id.get(request["id"], {})) for request in requests]

    async def outcomes(self, calls: Sequence[tuple[str, dict[str, Any] | None]]) -> list[Any]:
        """Like `batch`, but each request's RpcError is returned in its place instead of raised."""
        async with self._lock:
            requests = [self._request(method, params) for method, params in calls]
            replies = await self._exchange(requests, [r["id"] for r in requests], CALL_TIMEOUT_S)
        if isinstance(replies, dict):  # the batch as a whole was refused: so was each request
            by_id = {request["id"]: replies for request in requests}
        else:
            by_id = {reply.get("id"): reply for reply in replies if isinstance(reply, dict)}
        answers: list[Any] = []
        for request in requests:
            try:
                answers.append(_result_of(by_id.get(request["id"], {})))
            except RpcError as error:
                answers.append(error)
        return answers

    async def aclose(self) -> None:
        if self._stream is not None:
            stream, self._stream, self._reader = self._stream, None, None
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    def _request(self, method: str, params: dict[str, Any] | None) -> dict[str, Any]:
        self._next_id += 1
        request: dict[str, Any] = {"jsonrpc": JSONRPC, "id": self._next_id, "method": method}
        if params is not None:
            request["params"] = params
        return request

    async def _exchange(self, message: Any, ident: Any, timeout: float | None) -> Any:
        if self._stream is None:
            from anyio.abc import SocketAttribute

            from mcpctl.client import check_directory, check_server

            trusted = check_directory(self.path)  # as mcpctl.client: nothing is sent to an untrusted server
            try:
                connected = await anyio.connect_unix(self.path)
            except FileNotFoundError:
                raise DaemonUnreachable(self.path, "no socket there (is mcpresd running?)") from None
            except OSError as error:
                raise DaemonUnreachable(self.path, error.strerror or str(error)) from None
            try:
                check_server(self.path, connected.extra(SocketAttribute.raw_socket), trusted)
            except DaemonUnreachable:
                await connected.aclose()
                raise
            self._stream = connected
            self._reader = BufferedByteReceiveStream(self._stream)
        stream, reader = self._stream, self._reader
        assert reader is not None
        try:
            with anyio.fail_after(timeout):
                await stream.send(json.dumps(message, separators=(",", ":")).encode() + b"\n")
                while True:
                    line = await reader.receive_until(b"\n", 64 * MAX_MESSAGE_BYTES)
                    if not line.strip():
                        continue
                    reply = json.loads(line)
                    if isinstance(ident, list):
                        if isinstance(reply, list) or (isinstance(reply, dict) and "error" in reply
                                                       and reply.get("id") is None):
                            return reply
                    elif isinstance(reply, dict) and "method" not in reply and reply.get("id") == ident:
                        return reply
        except TimeoutError:
            await self.aclose()
            raise DaemonUnreachable(self.path, "no answer in time", lost=True) from None
        except (OSError, anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError,
                anyio.ClosedResourceError, anyio.DelimiterNotFound, ValueError) as error:
            await self.aclose()
            closed = isinstance(error, (anyio.EndOfStream, anyio.IncompleteRead))
            reason = "the daemon closed the connection" if closed else f"connection lost ({error})"
            raise DaemonUnreachable(self.path, reason, lost=True) from None


def _result_of(reply: dict[str, Any]) -> Any:
    error = reply.get("error")
    if error is not None:
        if not isinstance(error, dict):
            raise RpcError(0, f"malformed error from the daemon: {error!r}")
        raise RpcError(int(error.get("code", 0)), str(error.get("message", "")), error.get("data"))
    if "result" not in reply:
        raise RpcError(0, "the daemon did not answer the request")
    return reply["result"]


class Holder:
    """The server's hold on mcpresd: the persistent connection that holds the agent's allocations.

    `handles` are the allocations made in this session that it still holds (active or queued);
    `ended` the last ENDED_KEPT of them that ended. `release` acts only on those, so an agent
    cannot take resources away from another job of the same user.
    """

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.connection = DaemonConnection(socket_path)
        self.handles: dict[str, None] = {}
        self.ended: dict[str, None] = {}

    def made(self, handle: str) -> bool:
        """Whether `handle` came from allocate in this session (and is remembered)."""
        return handle in self.handles or handle in self.ended

    def forget(self, handle: str) -> None:
        """`handle` has ended: off the session's list."""
        self.handles.pop(handle, None)
        self.ended.pop(handle, None)
        self.ended[handle] = None
        while len(self.ended) > ENDED_KEPT:
            del self.ended[next(iter(self.ended))]

    async def held(self) -> list[str]:
        """The handles this session still holds, as the daemon says now; the ended ones are forgotten."""
        handles = list(self.handles)
        for start in range(0, len(handles), MAX_BATCH):
            part = handles[start:start + MAX_BATCH]
            try:
                answers = await self.connection.outcomes([(Method.ALLOCATIONS_GET, {"id": h}) for h in part])
            except DaemonUnreachable as error:
                raise await self._lost(error) from None
            for handle, answer in zip(part, answers):
                if isinstance(answer, RpcError):
                    if answer.code == ErrorCode.ALLOCATION_NOT_FOUND:
                        self.forget(handle)
                elif answer.get("state") not in ("active", "queued"):
                    self.forget(handle)
        return list(self.handles)

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        try:
            return await self.connection.call(method, params)
        except DaemonUnreachable as error:
            raise await self._lost(error) from None

    async def batch(self, calls: Sequence[tuple[str, dict[str, Any] | None]]) -> list[Any]:
        try:
            return await self.connection.batch(calls)
        except DaemonUnreachable as error:
            raise await self._lost(error) from None

    async def _lost(self, error: DaemonUnreachable) -> DaemonUnreachable:
        """The holding connection is gone, and every allocation on it: say which were released with it."""
        if not error.lost or not self.handles:
            return error
        handles = list(self.handles)
        for handle in handles:
            self.forget(handle)
        released = await self._released_with_connection(handles)
        if not released:
            return error
        note = (f"{error.reason}; the daemon released what this session held on that connection "
                f"({', '.join(released)})")
        return DaemonUnreachable(error.path, note, lost=True)

    async def _released_with_connection(self, handles: list[str]) -> list[str]:
        """Of `handles`, those the lost connection ended (not those a lease or a release ended before).

        Asked on a connection of its own (a restarted daemon answers); if none answers, all of them.
        """
        asker = DaemonConnection(self.socket_path)
        try:
            with anyio.CancelScope(shield=True), anyio.move_on_after(RELEASE_ON_CANCEL_S):
                answers = await asker.outcomes([(Method.ALLOCATIONS_GET, {"id": h}) for h in handles[:MAX_BATCH]])
                return [handle for handle, answer in zip(handles, answers)
                        if not isinstance(answer, dict) or answer.get("release_reason") in (None, "connection_closed")]
            return handles
        except DaemonUnreachable:
            return handles
        finally:
            await asker.aclose()

    async def aclose(self) -> None:
        """Close the holding connection: the daemon releases every allocation of this session."""
        await self.connection.aclose()

    async def wait_for_grant(self, handle: str, total: float | None, ctx: Context[Any, Any] | None) -> dict[str, Any]:
        """Wait on a second connection until the queued `handle` is granted; progress to the agent meanwhile.

        The daemon withdraws the request when its own wait runs out, and the wait then fails with
        its message (1012).
        """
        waiter = DaemonConnection(self.socket_path)
        started = time.monotonic()
        try:
            while True:
                await self._report(handle, time.monotonic() - started, total, ctx)
                try:
                    granted: dict[str, Any] = await waiter.call(
                        Method.ALLOCATIONS_WAIT, {"id": handle, "timeout": PROGRESS_EVERY_S},
                        timeout=PROGRESS_EVERY_S + CALL_TIMEOUT_S)
                    return granted
                except RpcError as error:
                    still_queued = error.code == ErrorCode.WAIT_TIMEOUT and not (error.data or {}).get("reason")
                    if not still_queued:
                        raise
        finally:
            await waiter.aclose()

    async def drop(self, handle: str) -> None:
        """Release or withdraw `handle` whatever happens around it (a cancelled call); quiet if it is gone."""
        self.forget(handle)
        with anyio.CancelScope(shield=True), anyio.move_on_after(RELEASE_ON_CANCEL_S):
            try:
                await self.connection.call(Method.RELEASE, {"id": handle})
            except (RpcError, DaemonUnreachable):
                pass

    async def _report(self, handle: str, waited: float, total: float | None, ctx: Context[Any, Any] | None) -> None:
        if ctx is None:
            return
        try:
            why = await self.connection.call(Method.ALLOCATIONS_EXPLAIN, {"id": handle})
            message = queued_line(why)
        except (RpcError, DaemonUnreachable):
            message = f"{handle} is queued"
        await ctx.report_progress(round(waited, 3), total, message)


# -- the shapes the tools return ----------------------------------------------


class DaemonSummary(TypedDict):
    version: str
    pid: int
    uptime_s: float
    socket: str
    gpu_source: str
    allocations: dict[str, int]


class ResourceSummary(TypedDict):
    name: str
    type: str
    unit: str
    capacity: float
    allocated: float
    free: float
    health_score: int | None
    granted: bool
    """False while its health keeps it out of new grants."""
    metrics: dict[str, float | str | None]
    """metrics.current for it: a number, "unsupported", or null (the read failed)."""


class HostStatus(TypedDict):
    daemon: DaemonSummary
    sampled_at: float | None
    resources: list[ResourceSummary]
    alerts: list[dict[str, Any]]
    held_by_this_session: list[str]


class AllocationList(TypedDict):
    allocations: list[dict[str, Any]]
    held_by_this_session: list[str]


class Grant(TypedDict):
    resource: str
    type: str
    amount: float
    unit: str
    uuid: str | None


class Handle(TypedDict):
    handle: str
    """The allocation id: pass it to release and explain."""
    state: str
    granted: list[Grant]
    env: dict[str, str]
    """Environment for the work run inside the allocation; empty while queued."""
    expires_at: float | None
    allocation: dict[str, Any]


class Released(TypedDict):
    handle: str
    state: str
    release_reason: str | None
    allocation: dict[str, Any]


class Explanation(TypedDict):
    handle: str
    state: str
    queued: bool
    summary: str
    detail: dict[str, Any]
    """allocations.explain as the daemon answered it."""


# -- rendering: pure functions of the daemon's answers ------------------------


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _percent(value: Any) -> str | None:
    number = _number(value)
    return None if number is None else f"{number:.0f}%"


def measured_words(kind: str, metrics: dict[str, Any]) -> str:
    """What the samplers saw of one resource, in a few words ("" when nothing was measured)."""
    parts: list[str] = []

    def add(label: str, text: str | None) -> None:
        if text is not None:
            parts.append(f"{label} {text}" if label else text)

    if kind in ("cpu", "memory"):
        add("busy", _percent(metrics.get("utilisation")))
        load = _number(metrics.get("load1"))
        add("load1", None if load is None else f"{load:.2f}")
        add("swap", _percent(metrics.get("swap_utilisation")))
    elif kind == "disk":
        add("full", _percent(metrics.get("utilisation")))
    elif kind == "gpu":
        add("busy", _percent(metrics.get("utilisation")))
        add("memory", _percent(metrics.get("memory_utilisation")))
        temperature = _number(metrics.get("temperature_c"))
        add("", None if temperature is None else f"{temperature:.0f}°C")
        foreign = _number(metrics.get("foreign_memory"))
        if foreign:
            add("outside allocations", format_amount(foreign, "bytes"))
    elif kind == "network":
        for key, label in (("rx_bps", "rx"), ("tx_bps", "tx")):
            rate = _number(metrics.get(key))
            add(label, None if rate is None else format_amount(rate, "bytes/s"))
    return ", ".join(parts)


def summarise_resource(resource: dict[str, Any], metrics: dict[str, Any]) -> ResourceSummary:
    health = resource.get("health") or {}
    return ResourceSummary(
        name=resource["name"], type=resource["type"], unit=resource["unit"], capacity=resource["capacity"],
        allocated=resource["allocated"], free=resource["free"], health_score=health.get("score"),
        granted=health.get("granted", True) is not False, metrics=dict(metrics))


def resource_line(summary: ResourceSummary, label: str = "") -> str:
    unit = summary["unit"]
    sized = unit in ("bytes", "bytes/s")
    allocated = format_size(summary["allocated"]) if sized else format_amount(summary["allocated"], "")
    free = format_amount(summary["free"], unit if sized else "")
    line = (f"{summary['name']}{label}: {allocated} of {format_amount(summary['capacity'], unit)} allocated, "
            f"{free} free")
    measured = measured_words(summary["type"], summary["metrics"])
    if measured:
        line += f"; measured {measured}"
    score = summary["health_score"]
    if not summary["granted"]:
        line += f"; health {score}: not granted until it recovers"
    elif score is not None and score < 100:
        line += f"; health {score}"
    return line


def summarise_host(status: dict[str, Any], resources: list[dict[str, Any]], current: dict[str, Any],
                alerts: list[dict[str, Any]], held: Sequence[str]) -> tuple[str, HostStatus]:
    """The machine at a glance (text for the agent to read) and the same as structured data."""
    readings: dict[str, Any] = current.get("resources") or {}
    order = {"cpu": 0, "memory": 1, "gpu": 2, "custom": 3, "disk": 4, "network": 5}
    ordered = sorted(resources, key=lambda r: (order.get(r["type"], 9), r["name"]))
    summaries = [summarise_resource(r, readings.get(r["name"]) or {}) for r in ordered]
    firing = [a for a in alerts if a.get("state") == "firing"]
    counts = status.get("allocations") or {}
    lines = [f"mcpresd {status['version']} up {format_duration(status['uptime_s'])}: "
             f"{counts.get('active', 0)} active and {counts.get('queued', 0)} queued allocations; "
             f"this session holds {len(held)}."]
    networks = [s for s in summaries if s["type"] == "network"]
    for summary in summaries:
        if summary["type"] == "network" and len(networks) > NETWORK_LINES:
            continue
        by_resource = next((r for r in resources if r["name"] == summary["name"]), {})
        model = (by_resource.get("labels") or {}).get("name") if summary["type"] == "gpu" else None
        lines.append(resource_line(summary, f" ({model})" if model else ""))
    if len(networks) > NETWORK_LINES:
        lines.append(f"network: {len(networks)} interfaces (see the structured result or mcpres://host/utilisation)")
    if firing:
        lines.append("firing alerts: " + "; ".join(
            f"{a['rule']} on {a['resource']} ({a['level']}, last {a.get('last_value')})" for a in firing))
    else:
        lines.append("no alerts firing.")
    ts = _number(current.get("ts"))
    if ts is not None:
        lines.append(f"measured {max(0.0, time.time() - ts):.0f}s ago.")
    daemon = DaemonSummary(version=status["version"], pid=status["pid"], uptime_s=status["uptime_s"],
                           socket=status["socket"], gpu_source=status.get("gpu_source", "none"),
                           allocations=dict(counts))
    return "\n".join(lines), HostStatus(daemon=daemon, sampled_at=ts, resources=summaries, alerts=firing,
                                        held_by_this_session=list(held))


def items_words(allocation: dict[str, Any]) -> str:
    words = []
    for item in allocation.get("items") or []:
        word = f"{item['resource']} {format_amount(item['amount'], item['unit'])}"
        if item.get("uuid"):
            word += f" ({item['uuid']})"
        words.append(word)
    return ", ".join(words)


def allocation_line(allocation: dict[str, Any], held: Sequence[str], now: float) -> str:
    request = allocation.get("request") or {}
    what = items_words(allocation) or ", ".join(
        f"{d['resource']} {d['amount']:g}" for d in request.get("resources") or []) or "-"
    age = format_duration(max(0.0, now - allocation["created_at"]))
    holder = "this session" if allocation["id"] in held else _holder(allocation)
    line = (f"{allocation['id']} {allocation['state']} {allocation['priority']}: {what}; "
            f"tool {allocation.get('tool_id') or '-'}; held by {holder}; {age} old")
    if allocation.get("expires_at") is not None:
        line += f"; lease ends in {format_duration(max(0.0, allocation['expires_at'] - now))}"
    if allocation.get("release_reason"):
        line += f"; ended: {allocation['release_reason']}"
    return line


def _holder(allocation: dict[str, Any]) -> str:
    if allocation.get("redacted"):
        return f"uid {allocation['owner_uid']}"
    if allocation.get("holder") == "pid":
        return f"pid {allocation.get('holder_pid')}"
    return "a connection"


def describe_handle(allocation: dict[str, Any]) -> tuple[str, Handle]:
    """What allocate returns: the handle, what was granted, and the environment to run the work with."""
    active = allocation["state"] == "active"
    env = run_environment(allocation) if active else {}
    grants = [Grant(resource=i["resource"], type=i["type"], amount=i["amount"], unit=i["unit"], uuid=i.get("uuid"))
              for i in allocation.get("items") or []]
    if active:
        lines = [f"granted {allocation['id']}: {items_words(allocation)}.",
                 "run the work with: " + " ".join(f"{k}={v}" for k, v in env.items()),
                 f"release it with release(handle={allocation['id']!r}) when done; it is also released "
                 + (f"when its lease ends in {format_duration(allocation['ttl_s'])} or " if allocation.get("ttl_s")
                    else "")
                 + "when this MCP session ends."]
        lines += [f"warning: {risk}" for risk in allocation.get("risks") or []]
    else:
        lines = [f"queued {allocation['id']}: it is granted in the background when it fits "
                 f"(explain says why it waits; list_allocations shows when it is active; release cancels it)."]
    return "\n".join(lines), Handle(handle=allocation["id"], state=allocation["state"], granted=grants, env=env,
                                    expires_at=allocation.get("expires_at"), allocation=allocation)


def queued_line(why: dict[str, Any]) -> str:
    """One line on a queued request, for progress messages."""
    if not why.get("queued"):
        return str(why.get("summary") or f"{why.get('id')} is {why.get('state')}")
    line = f"{why['id']} is queued, position {why['position']} of {why['queue_length']}"
    if why.get("suggestion"):
        line += f": {why['suggestion']}"
    return line


def refusal(error: RpcError | DaemonUnreachable) -> CallToolResult:
    """A daemon's error (or its absence) as a tool error the agent reads."""
    if isinstance(error, DaemonUnreachable):
        text = str(error)
    else:
        text = error.message
        if error.code == ErrorCode.INSUFFICIENT_CAPACITY:
            text += ("\nnothing was allocated: ask for less, pass wait (seconds) to queue for it, "
                     "or see host_status for what is free")
    return CallToolResult(content=[shown(text)], is_error=True)


def mistake(text: str) -> CallToolResult:
    return CallToolResult(content=[shown(text)], is_error=True)


def result(text: str, structured: Any) -> CallToolResult:
    return CallToolResult(content=[shown(text)], structured_content=dict(structured))


def shown(text: str) -> TextContent:
    """A tool's text, each line `printable`: what other users named (tool ids, resources, pools) can carry bidi
    overrides, C1 controls and invisible tag characters, meant for whoever reads the text; the structured
    content keeps them exact."""
    return TextContent(type="text", text="\n".join(map(printable, text.split("\n"))))


def demands(cpu: float | None, mem: str | int | None, gpu: float | None,
            resources: dict[str, float | str] | None, pool: str | None) -> list[dict[str, Any]]:
    """The allocate request's demands from the tool's arguments; UnitError names the argument with a bad size."""
    asked: list[dict[str, Any]] = []
    if cpu is not None:
        asked.append({"resource": "cpu", "amount": cpu})
    if mem is not None:
        asked.append({"resource": "memory",
                      "amount": float(mem) if isinstance(mem, int) else _parsed(parse_size, mem, "mem")})
    if gpu is not None:
        asked.append({"resource": "gpu", "amount": gpu})
    for name, amount in (resources or {}).items():
        asked.append({"resource": name,
                      "amount": amount if isinstance(amount, (int, float))
                      else _parsed(parse_amount, amount, f"resources[{name!r}]")})
    if pool is not None:
        asked.append({"resource": f"pool:{pool}", "amount": 1})
    return asked


def _parsed(parse: Callable[[str], float], text: str, argument: str) -> float:
    try:
        return float(parse(text))
    except UnitError as error:
        raise UnitError(f"{argument}: {error}") from None


# -- the server ---------------------------------------------------------------

Positive = Annotated[float, Field(gt=0)]
Seconds = Annotated[float, Field(ge=0)]
ReadOnly = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)


def build_server(socket_path: str) -> MCPServer[Any]:
    """The MCP server for the daemon at `socket_path`; its allocations live as long as the server runs."""
    holder = Holder(socket_path)

    @asynccontextmanager
    async def lifespan(_: MCPServer[Any]) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await holder.aclose()

    server: MCPServer[Any] = MCPServer("mcpres", version=VERSION, instructions=INSTRUCTIONS, lifespan=lifespan,
                                       log_level="WARNING")

    @server.tool(annotations=ReadOnly, structured_output=True)
    async def host_status() -> Annotated[CallToolResult, HostStatus]:
        """The machine now: each resource's capacity, allocated and free amounts, what is measurably busy
        (CPU, memory, GPU utilisation and temperature, disks), its health, and the alerts firing.
        Call it before heavy work to pick what to ask for."""
        try:
            status, resources, current, alerts = await holder.batch([
                (Method.DAEMON_STATUS, None), (Method.RESOURCES_LIST, None), (Method.METRICS_CURRENT, None),
                (Method.ALERTS_LIST, None)])
            held = await holder.held()
        except (RpcError, DaemonUnreachable) as error:
            return refusal(error)
        text, structured = summarise_host(status, resources, current, alerts, held)
        return result(text, structured)

    @server.tool(annotations=ReadOnly, structured_output=True)
    async def list_allocations(
        state: Annotated[Literal["active", "queued", "released", "withdrawn", "all"],
                         Field(description="Which allocations: active (default), queued, ended ones, or all.")]
            = "active",
        limit: Annotated[int, Field(ge=1, le=1000, description="At most this many, newest first.")] = 50,
    ) -> Annotated[CallToolResult, AllocationList]:
        """The machine's allocations, newest first, every owner's (others' without their details); the ones
        this session holds are marked."""
        try:
            allocations = await holder.call(Method.ALLOCATIONS_LIST, {"state": state, "limit": limit})
            held = await holder.held()
        except (RpcError, DaemonUnreachable) as error:
            return refusal(error)
        now = time.time()
        lines = [allocation_line(a, held, now) for a in allocations] or [f"no {state} allocations."]
        return result("\n".join(lines), AllocationList(allocations=allocations, held_by_this_session=held))

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False,
                                             open_world_hint=False), structured_output=True)
    async def allocate(
        ctx: Context[Any, Any],
        cpu: Annotated[Positive | None, Field(description="CPU cores; fractions allowed (0.5).")] = None,
        mem: Annotated[str | int | None, Field(description="Memory: '512M', '8G', '1.5T', or bytes.")] = None,
        gpu: Annotated[Positive | None, Field(
            description="Whole GPUs (1, 2: distinct idle devices) or a share of one below 1 (0.5).")] = None,
        resources: Annotated[dict[str, float | str] | None, Field(
            description="Any resources by name (or GPU UUID) and amount in its unit, e.g. {\"licence\": 1, "
                        "\"disk:/\": \"10G\", \"pool:build\": 2}.")] = None,
        pool: Annotated[str | None, Field(
            description="One member of a pool: names, globs or selectors, comma-separated.")] = None,
        priority: Annotated[Literal["low", "normal", "high", "critical"],
                            Field(description="Orders the queue.")] = "normal",
        wait: Annotated[Seconds | Literal["forever"], Field(
            description="If it does not fit now, queue and wait this many seconds (or 'forever'); "
                        "0 (default): fail at once.")] = 0,
        detach: Annotated[bool, Field(
            description="With wait: return the queued handle at once instead of waiting for the grant.")] = False,
        ttl: Annotated[Positive | None, Field(
            description="Lease in seconds: released this long after the grant unless released before.")] = None,
        tool_id: Annotated[str | None, Field(description="Who the allocation is for, for accounting.")] = None,
    ) -> Annotated[CallToolResult, Handle]:
        """Reserve resources all or nothing and return a handle: the allocation id, what was granted, and the
        environment to run the work with (CUDA_VISIBLE_DEVICES names the granted GPUs). This MCP session holds
        it until release, its ttl, or the end of the session. Waits in the queue with wait > 0, reporting
        progress; fails at once otherwise."""
        try:
            asked = demands(cpu, mem, gpu, resources, pool)
        except UnitError as error:
            return mistake(str(error))
        if not asked:
            return mistake("ask for something: cpu, mem, gpu, resources or pool")
        params: dict[str, Any] = {"resources": asked, "priority": priority, "wait": wait, "detach": True}
        if ttl is not None:
            params["ttl"] = ttl
        if tool_id is not None:
            params["tool_id"] = tool_id
        try:
            # Shielded: a request the daemon accepted must have its handle recorded, or it could not be released.
            with anyio.CancelScope(shield=True):
                allocation: dict[str, Any] = await holder.call(Method.ALLOCATE, params)
        except (RpcError, DaemonUnreachable) as error:
            return refusal(error)
        holder.handles[allocation["id"]] = None
        try:
            if allocation["state"] == "queued" and not detach:
                allocation = await holder.wait_for_grant(
                    allocation["id"], None if wait == "forever" else float(wait), ctx)
            else:
                await anyio.lowlevel.checkpoint()
        except BaseException as error:
            # Cancelled, withdrawn or lost: the agent gets no handle, so the session must not keep the request.
            await holder.drop(allocation["id"])
            if isinstance(error, (RpcError, DaemonUnreachable)):
                return refusal(error)
            raise
        text, structured = describe_handle(allocation)
        return result(text, structured)

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=False,
                                             open_world_hint=False), structured_output=True)
    async def release(
        handle: Annotated[str, Field(description="A handle that allocate returned in this session.")],
    ) -> Annotated[CallToolResult, Released]:
        """Release an allocation made in this session (or cancel a queued one): its resources are free at once."""
        if not holder.made(handle):
            return mistake(f"{handle} is not an allocation of this session; release only takes handles that "
                           "allocate returned here (list_allocations marks them)")
        try:
            allocation = await holder.call(Method.RELEASE, {"id": handle})
        except (RpcError, DaemonUnreachable) as error:
            if isinstance(error, RpcError) and error.code in (ErrorCode.ALREADY_RELEASED,
                                                              ErrorCode.ALLOCATION_NOT_FOUND):
                holder.forget(handle)
            return refusal(error)
        holder.forget(handle)
        freed = items_words(allocation)
        text = (f"cancelled the queued request {handle}." if allocation["state"] == "withdrawn"
                else f"released {handle}" + (f": {freed} free again." if freed else "."))
        return result(text, Released(handle=handle, state=allocation["state"],
                                     release_reason=allocation.get("release_reason"), allocation=allocation))

    @server.tool(annotations=ReadOnly, structured_output=True)
    async def explain(
        handle: Annotated[str, Field(description="An allocation id, e.g. a handle from allocate.")],
    ) -> Annotated[CallToolResult, Explanation]:
        """Why a queued request waits: its place in the queue, what it lacks, which allocations hold that, the
        smallest change that would let it fit, and when it should be granted."""
        try:
            why = await holder.call(Method.ALLOCATIONS_EXPLAIN, {"id": handle})
        except (RpcError, DaemonUnreachable) as error:
            return refusal(error)
        text = "\n".join(explanation_lines(why, time.time()))
        summary = queued_line(why)
        return result(text, Explanation(handle=handle, state=why["state"], queued=bool(why.get("queued")),
                                        summary=summary, detail=why))

    @server.resource("mcpres://host/utilisation", name="utilisation", mime_type="application/json",
                     description="The latest sampling round of every resource (metrics.current): CPU, memory, "
                                 "disk, network and GPU utilisation, GPU memory and temperature, and "
                                 "utilisation_rate, the share of each resource that is allocated.")
    async def utilisation() -> str:
        return json.dumps(await _read(holder, Method.METRICS_CURRENT), indent=1)

    @server.resource("mcpres://resources", name="resources", mime_type="application/json",
                     description="Every resource with its capacity, allocated and free amounts and health "
                                 "(resources.list).")
    async def resource_list() -> str:
        return json.dumps(await _read(holder, Method.RESOURCES_LIST), indent=1)

    return server


async def _read(holder: Holder, method: str) -> Any:
    try:
        return await holder.call(method)
    except (RpcError, DaemonUnreachable) as error:
        raise ResourceError(str(error)) from None


def serve(socket_path: str) -> None:
    """Serve MCP on stdin/stdout until the client closes stdin."""
    build_server(socket_path).run("stdio")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mcpctl.mcp_server", description=serve.__doc__)
    parser.add_argument("--socket", default=resolve_socket().path,
                        help="The daemon's socket.")
    args = parser.parse_args(argv)
    serve(args.socket)
    return 0


if __name__ == "__main__":
    sys.exit(main())
