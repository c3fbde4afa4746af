"""JSON-RPC 2.0: the dispatch table (method -> handler) and error translation.

Rules:
- Every protocol method has exactly one handler here; every domain error has
  exactly one error code here. Nothing else maps errors to codes.
- One JSON text per line in, one per line out. Parse errors, invalid requests,
  batches and notifications follow the JSON-RPC 2.0 specification.
- Parameters are validated (`mcpresd.params`) before anything reaches the
  store; the store work itself runs through `submit`, which returns only after
  the transaction holding it has committed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from functools import partial
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from mcpresd import params
from mcpresd.core import errors
from mcpresd.core.model import Resource
from mcpresd.exposition import RpcTotals, exposition_reply
from mcpresd.protocol import JSONRPC, MAX_BATCH, ErrorCode, Method, compact_json_encoder
from mcpresd.service import Broker, Caller
from mcpresd.store import StorageError

log = logging.getLogger("mcpresd.rpc")

StoreJob = Callable[[Broker], Any]
Submit = Callable[[StoreJob, object], "asyncio.Future[Any]"]
"""Run a store job; the second argument is who submits it (the caller's uid): submitters take turns."""


class Outcome(Protocol):
    """A store job's settled outcome, as an asyncio future gives it (or the committer's `Then`)."""

    def cancelled(self) -> bool: ...

    def exception(self) -> BaseException | None: ...

    def result(self) -> Any: ...


Call = Callable[[StoreJob, object, Callable[[Any], None]], None]
"""As Submit, with a callback given the job's Outcome once it has committed (no future, no loop round)."""


@dataclass(frozen=True)
class Handler:
    """How one method is served: parse its params, run it on the store; optionally wait or subscribe."""

    parse: Callable[[Any], Any]
    run: Callable[..., Any]
    discovers: bool = False
    waits: bool = False
    subscribes: bool = False
    finish: Callable[[Any], Any] | None = None
    """A pure step the store job's result goes through on the default executor, off the store's thread."""


class Router(Protocol):
    """A site beside the host (the cluster) that may serve a request instead of, or as well as, the store."""

    def route(self, method: str, command: Any, caller: Caller, local: Callable[..., Awaitable[Any]]) \
            -> Coroutine[Any, Any, Any] | None: ...


class Peer(Protocol):
    """The connection a request came on: who sent it, and a way to push notifications to it."""

    caller: Caller

    @property
    def batch_reply_bytes(self) -> int:
        """How many bytes one batch's replies may take (config [limits])."""
        ...

    def notify(self, data: bytes) -> None: ...

    def subscribe(self) -> None: ...


HANDLERS: dict[Method, Handler] = {
    Method.DAEMON_STATUS: Handler(params.no_params, Broker.daemon_status),
    Method.RESOURCES_LIST: Handler(params.list_resources, Broker.resources_list),
    Method.RESOURCES_ADD: Handler(params.add_resource, Broker.resources_add),
    Method.RESOURCES_REMOVE: Handler(params.remove_resource, Broker.resources_remove),
    Method.RESOURCES_REFRESH: Handler(params.no_params, Broker.resources_refresh, discovers=True),
    Method.ALLOCATE: Handler(params.allocate, Broker.allocate, waits=True),
    Method.RELEASE: Handler(params.release, Broker.release),
    Method.ALLOCATIONS_LIST: Handler(params.list_allocations, Broker.allocations_list),
    Method.ALLOCATIONS_GET: Handler(params.get_allocation, Broker.allocations_get),
    Method.ALLOCATIONS_WAIT: Handler(params.wait_for, Broker.allocations_wait, waits=True),
    Method.ALLOCATIONS_RENEW: Handler(params.renew, Broker.allocations_renew),
    Method.ALLOCATIONS_EXPLAIN: Handler(params.explain, Broker.allocations_explain),
    Method.ALLOCATIONS_ATTACH: Handler(params.attach, Broker.allocations_attach),
    Method.EVENTS_LIST: Handler(params.list_events, Broker.events_list),
    Method.EVENTS_SUBSCRIBE: Handler(params.subscribe, Broker.events_subscribe, subscribes=True),
    Method.METRICS_CURRENT: Handler(params.metrics_current, Broker.metrics_current),
    Method.METRICS_HISTORY: Handler(params.metrics_history, Broker.metrics_history),
    Method.METRICS_EXPOSITION: Handler(params.no_params, Broker.metrics_exposition, finish=exposition_reply),
    Method.ALERTS_LIST: Handler(params.alerts_list, Broker.alerts_list),
    Method.PREDICT: Handler(params.predict, Broker.predict),
    Method.DB_BACKUP: Handler(params.db_backup, Broker.db_backup),
    Method.RESOURCES_SET_COST: Handler(params.set_cost, Broker.resources_set_cost),
    Method.POOLS_LIST: Handler(params.no_params, Broker.pools_list),
    Method.POOLS_GET: Handler(params.pool_name, Broker.pools_get),
    Method.POOLS_CREATE: Handler(params.create_pool, Broker.pools_create),
    Method.POOLS_DELETE: Handler(params.pool_name, Broker.pools_delete),
    Method.POOLS_DRAIN: Handler(params.pool_name, Broker.pools_drain),
    Method.POOLS_UNDRAIN: Handler(params.pool_name, Broker.pools_undrain),
    Method.POOLS_EVENTS: Handler(params.pool_events, Broker.pools_events),
    Method.BUDGETS_SET: Handler(params.set_budget, Broker.budgets_set),
    Method.BUDGETS_LIST: Handler(params.no_params, Broker.budgets_list),
    Method.BUDGETS_DELETE: Handler(params.budget_key, Broker.budgets_delete),
    Method.USAGE: Handler(params.usage, Broker.usage),
    Method.RECOMMEND: Handler(params.recommend, Broker.recommend),
    Method.OPTIMISE: Handler(params.no_params, Broker.optimise),
}

_BY_NAME: dict[str, Handler] = {method.value: handler for method, handler in HANDLERS.items()}
"""HANDLERS by the method's name on the wire (a StrEnum member hashes by its Python name, not its value)."""

ERROR_CODES: dict[type[errors.DomainError], ErrorCode] = {
    errors.InvalidRequest: ErrorCode.INVALID_PARAMS,
    errors.UnknownResource: ErrorCode.UNKNOWN_RESOURCE,
    errors.InsufficientCapacity: ErrorCode.INSUFFICIENT_CAPACITY,
    errors.NeverFits: ErrorCode.NEVER_FITS,
    errors.AllocationNotFound: ErrorCode.ALLOCATION_NOT_FOUND,
    errors.AlreadyReleased: ErrorCode.ALREADY_RELEASED,
    errors.ResourceExists: ErrorCode.RESOURCE_EXISTS,
    errors.ResourceInUse: ErrorCode.RESOURCE_IN_USE,
    errors.IdempotencyConflict: ErrorCode.IDEMPOTENCY_CONFLICT,
    errors.PermissionDenied: ErrorCode.PERMISSION_DENIED,
    errors.InvalidHolder: ErrorCode.INVALID_HOLDER,
    errors.WaitTimeout: ErrorCode.WAIT_TIMEOUT,
    errors.Withdrawn: ErrorCode.WITHDRAWN,
    errors.BackupFailed: ErrorCode.STORAGE_ERROR,
    errors.LimitExceeded: ErrorCode.LIMIT_EXCEEDED,
    errors.BudgetExceeded: ErrorCode.BUDGET_EXCEEDED,
    errors.PoolDraining: ErrorCode.POOL_DRAINING,
    errors.UnknownPool: ErrorCode.UNKNOWN_POOL,
    errors.PoolExists: ErrorCode.POOL_EXISTS,
    errors.ClusterFailed: ErrorCode.CLUSTER_FAILED,
}

_NO_ID = object()


def error_object(code: ErrorCode, message: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": int(code), "message": message}
    if data is not None:
        error["data"] = data
    return error


def error_response(id: Any, code: ErrorCode, message: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"jsonrpc": JSONRPC, "id": id, "error": error_object(code, message, data)}


# ASCII with \u escapes: a lone surrogate echoed from a request (an id, an unknown field name) stays valid JSON.
_ENCODE = compact_json_encoder(allow_nan=False)


def encode(message: Any) -> bytes:
    return _ENCODE(message).encode("ascii") + b"\n"


def encode_reply(response: dict[str, Any]) -> bytes:
    """One reply's line; a -32603 error for its id if the result cannot be written as JSON.

    Every request gets its line: an exception here would end in a future's callback, and the connection
    (whose later replies wait behind this one) would hang.
    """
    try:
        return encode(response)
    except (ValueError, TypeError, OverflowError, RecursionError) as error:
        log.error("the reply to request id %r could not be encoded: %s", response.get("id"), error)
        return encode(error_response(response.get("id"), ErrorCode.INTERNAL_ERROR,
                                     "internal error: the result could not be written as JSON; see the daemon's log",
                                     {"type": "InternalError"}))


class RpcStats:
    """Calls, errors and response times per method since the last `take()` (the daemon's own metrics)."""

    def __init__(self) -> None:
        self._calls: dict[str, list[float]] = {}
        self._errors: dict[str, int] = {}
        self._since = time.monotonic()
        # Since the daemon started, for the Prometheus exposition; every key from the start, so the store
        # thread may copy them while the loop counts (their size never changes).
        self.started = time.time()
        self._requests_total = dict.fromkeys(_KNOWN | {"unknown"}, 0)
        self._errors_total = dict.fromkeys(_KNOWN | {"unknown"}, 0)
        self._seconds_total = dict.fromkeys(_KNOWN | {"unknown"}, 0.0)

    def record(self, method: str, seconds: float, failed: bool) -> None:
        key = method if method in _KNOWN else "unknown"
        times = self._calls.setdefault(key, [])
        if len(times) < 10_000:
            times.append(seconds)
        self._requests_total[key] += 1
        self._seconds_total[key] += seconds
        if failed:
            self._errors[key] = self._errors.get(key, 0) + 1
            self._errors_total[key] += 1

    def totals(self) -> RpcTotals:
        """Requests, errors and seconds by method since the daemon started (a copy)."""
        return RpcTotals(self.started, dict(self._requests_total), dict(self._errors_total),
                         dict(self._seconds_total))

    def take(self) -> dict[str, dict[str, float]]:
        now = time.monotonic()
        span = max(1e-9, now - self._since)
        figures = {}
        for method, times in self._calls.items():
            ordered = sorted(times)
            figures[method] = {
                "rate": len(times) / span,
                "error_rate": self._errors.get(method, 0) / len(times),
                "p50_ms": 1000 * ordered[len(ordered) // 2],
                "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
            }
        self._calls, self._errors, self._since = {}, {}, now
        return figures


_KNOWN = frozenset(m.value for m in Method)
Reply = Callable[[bytes | None], None]
Done = Callable[["dict[str, Any] | None"], None]


class Dispatcher:
    """Turns one line from a client into at most one line back, through a callback.

    Callback-based rather than a coroutine per request: a store job's future calls
    back when its transaction has committed, which costs far less than a task.
    `reply` is called exactly once per line, with None when nothing is to be sent.
    """

    def __init__(self, submit: Submit, discover: Callable[[], list[Resource]], call: Call | None = None) -> None:
        self._submit = submit
        self._call_job: Call = call if call is not None else \
            (lambda job, submitter, then: submit(job, submitter).add_done_callback(then))
        self._discover = discover
        self.stats = RpcStats()
        self._tasks: set[asyncio.Future[Any]] = set()
        """Work a request's reply waits for outside the store's queue (discovery, finish steps in the executor)."""
        self.router: Router | None = None

    def handle_line(self, line: bytes, peer: Peer, reply: Reply) -> None:
        try:
            message = _DECODER.decode(line.decode("utf-8"))
        except UnicodeDecodeError as error:
            reply(encode(error_response(None, ErrorCode.PARSE_ERROR, f"message is not valid UTF-8 ({error.reason})")))
            return
        except RecursionError:
            reply(encode(error_response(None, ErrorCode.PARSE_ERROR, "message is nested too deeply")))
            return
        except ValueError as error:
            reply(encode(error_response(None, ErrorCode.PARSE_ERROR, f"message is not valid JSON ({error})")))
            return
        if not isinstance(message, list):
            self.handle_message(message, peer, lambda response: reply(None if response is None else encode_reply(response)))
        elif not message:
            reply(encode(error_response(None, ErrorCode.INVALID_REQUEST, "an empty batch is not a request")))
        elif len(message) > MAX_BATCH:
            reply(encode(error_response(None, ErrorCode.INVALID_REQUEST, f"a batch holds at most {MAX_BATCH} requests")))
        else:
            _Batch(message, peer, self, reply)

    def handle_message(self, message: Any, peer: Peer, done: Done) -> None:
        id = message.get("id", _NO_ID) if isinstance(message, dict) else _NO_ID
        problem = _envelope_problem(message, id)
        if problem is not None:
            done(error_response(None if id is _NO_ID or not _valid_id(id) else id, ErrorCode.INVALID_REQUEST, problem))
            return

        started = time.perf_counter()
        method = message["method"]

        def finish(result: Any) -> None:
            self.stats.record(method, time.perf_counter() - started, isinstance(result, _Failure))
            if id is _NO_ID:
                done(None)
            elif isinstance(result, _Failure):
                done({"jsonrpc": JSONRPC, "id": id, "error": result.error})
            else:
                done({"jsonrpc": JSONRPC, "id": id, "result": result})

        self._call(message["method"], message.get("params"), peer, finish)

    def _call(self, method: str, raw_params: Any, peer: Peer, finish: Callable[[Any], None]) -> None:
        try:
            handler = _BY_NAME[method]
        except KeyError:
            finish(_Failure(error_object(ErrorCode.METHOD_NOT_FOUND, f"method not found: {method!r}")))
            return
        try:
            command = handler.parse(raw_params)
        except params.InvalidParams as error:
            finish(_Failure(error_object(ErrorCode.INVALID_PARAMS, error.message,
                                         {"type": "InvalidParams", "field": error.field})))
            return
        except Exception:  # a bug in a parser: one reply, not a dropped connection
            log.exception("internal error parsing the params of %s", method)
            finish(_Failure(error_object(ErrorCode.INTERNAL_ERROR, "internal error; see the daemon's log",
                                         {"type": "InternalError"})))
            return
        run = handler.run
        caller = peer.caller
        if self.router is not None:
            def local(changed: Any = None) -> asyncio.Future[Any]:
                return self._submit(lambda broker: run(broker, caller, command if changed is None else changed),
                                    caller.uid)

            routed = self.router.route(method, command, caller, local)
            if routed is not None:
                task = asyncio.get_running_loop().create_task(routed)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                task.add_done_callback(lambda t: finish(_outcome(method, t)))
                return
        if handler.discovers:
            task = asyncio.get_running_loop().create_task(self._discover_then(method, run, caller, finish))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        if handler.waits:
            self._call_and_wait(method, run, caller, command, finish)
            return
        if handler.finish is not None:
            then = handler.finish
            future = self._submit(lambda broker: run(broker, caller, command), caller.uid)
            future.add_done_callback(lambda f: self._finish_off_store(method, f, then, finish))
            return
        if handler.subscribes:
            peer.subscribe()  # before the reply: no event committed after the reply's snapshot is missed
        self._call_job(lambda broker: run(broker, caller, command), caller.uid, lambda f: finish(_outcome(method, f)))

    def _finish_off_store(self, method: str, future: asyncio.Future[Any], then: Callable[[Any], Any],
                          finish: Callable[[Any], None]) -> None:
        result = _outcome(method, future)
        if isinstance(result, _Failure):
            finish(result)
            return
        done = asyncio.get_running_loop().run_in_executor(None, then, result)
        self._tasks.add(done)
        done.add_done_callback(self._tasks.discard)
        done.add_done_callback(lambda f: finish(_outcome(method, f)))

    def _call_and_wait(self, method: str, run: Callable[..., Any], caller: Caller, command: Any,
                       finish: Callable[[Any], None]) -> None:
        """Run a job that may leave the request queued; then answer when it settles (or the wait times out)."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()

        def first(f: Outcome) -> None:
            result = _outcome(method, f)
            if (isinstance(result, _Failure) or result.get("state") != "queued" or getattr(command, "detach", False)
                    or getattr(command, "wait", None) == 0):
                finish(result)
                return
            timeout = getattr(command, "timeout", None)
            timer = None if timeout is None else loop.call_later(timeout, _time_out, waiter, result["id"])

            def settled(w: asyncio.Future[Any]) -> None:
                if timer is not None:
                    timer.cancel()
                finish(_outcome(method, w))

            waiter.add_done_callback(settled)

        self._call_job(lambda broker: run(broker, caller, command, waiter), caller.uid, first)

    async def _discover_then(self, method: str, run: Callable[[Broker, Caller, Any], Any], caller: Caller,
                             finish: Callable[[Any], None]) -> None:
        try:
            Broker.check_refresh(caller)
        except errors.DomainError as error:
            finish(_refusal(error))
            return
        try:
            discovered = await asyncio.get_running_loop().run_in_executor(None, self._discover)
        except Exception:
            log.exception("discovery failed")
            finish(_Failure(error_object(ErrorCode.INTERNAL_ERROR, "discovery failed; see the daemon's log",
                                         {"type": "InternalError"})))
            return
        future = self._submit(lambda broker: run(broker, caller, discovered), caller.uid)
        future.add_done_callback(lambda f: finish(_outcome(method, f)))


def _time_out(waiter: asyncio.Future[Any], allocation_id: str) -> None:
    if not waiter.done():
        waiter.set_exception(errors.WaitTimeout(
            f"still queued after the wait's timeout; {allocation_id} stays queued", id=allocation_id))


class _Batch:
    """Collects the replies of a batch and sends them as one array once all are in.

    Each reply is encoded as it comes; once the replies so far take more than the peer's `batch_reply_bytes`,
    each later one is replaced by a LIMIT_EXCEEDED error, so one batch cannot make the daemon hold without bound.
    """

    def __init__(self, messages: list[Any], peer: Peer, dispatcher: Dispatcher, reply: Reply) -> None:
        self._encoded: list[bytes | None] = [None] * len(messages)
        self._left = len(messages)
        self._bytes = 0
        self._limit = peer.batch_reply_bytes
        self._reply = reply
        for index, message in enumerate(messages):
            dispatcher.handle_message(message, peer, partial(self._done, index))

    def _done(self, index: int, response: dict[str, Any] | None) -> None:
        if response is not None:
            line = encode_reply(response)[:-1]
            if self._bytes + len(line) > self._limit:
                line = encode(error_response(
                    response.get("id"), ErrorCode.LIMIT_EXCEEDED,
                    f"this batch's replies would take over {self._limit} bytes; send this request on its own"
                    " or ask for less", {"type": "LimitExceeded", "limit": self._limit}))[:-1]
            self._bytes += len(line)
            self._encoded[index] = line
        self._left -= 1
        if self._left == 0:
            replies = [line for line in self._encoded if line is not None]
            self._reply(b"[" + b",".join(replies) + b"]\n" if replies else None)


def _outcome(method: str, future: Outcome) -> Any:
    """A committed job's result, or its error translated at this one place."""
    if future.cancelled():
        return _Failure(error_object(ErrorCode.INTERNAL_ERROR, "the daemon is shutting down", {"type": "InternalError"}))
    error = future.exception()
    if error is None:
        return future.result()
    if isinstance(error, errors.DomainError):
        return _refusal(error)
    if isinstance(error, StorageError):
        log.error("storage error in %s: %s", method, error)
        return _Failure(error_object(ErrorCode.STORAGE_ERROR, f"the database could not be written: {error}",
                                     {"type": "StorageError"}))
    log.error("internal error in %s", method, exc_info=error)
    return _Failure(error_object(ErrorCode.INTERNAL_ERROR, "internal error; see the daemon's log",
                                 {"type": "InternalError"}))


def _refusal(error: errors.DomainError) -> _Failure:
    return _Failure(error_object(ERROR_CODES[type(error)], error.message, {"type": type(error).__name__, **error.data}))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


@dataclass(frozen=True)
class _Failure:
    error: dict[str, Any]


def _valid_id(id: Any) -> bool:
    if isinstance(id, float):
        return math.isfinite(id)  # 1e400 parses to inf, which cannot be written back: reject it before it runs
    return id is None or isinstance(id, str) or (isinstance(id, int) and not isinstance(id, bool))


def _envelope_problem(message: Any, id: Any) -> str | None:
    if not isinstance(message, dict):
        return "a request must be a JSON object"
    if message.get("jsonrpc") != JSONRPC:
        return 'a request must have "jsonrpc": "2.0"'
    if not isinstance(message.get("method"), str):
        return "a request must have a string method"
    if id is not _NO_ID and not _valid_id(id):
        return "id must be a string, a finite number or null"
    if "params" in message and not isinstance(message["params"], (dict, list)):
        return "params must be an object or an array"
    return None
