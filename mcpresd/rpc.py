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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from mcpresd import params
from mcpresd.core import errors
from mcpresd.core.model import Resource
from mcpresd.protocol import JSONRPC, MAX_BATCH, ErrorCode, Method
from mcpresd.service import Broker, Caller
from mcpresd.store import StorageError

log = logging.getLogger("mcpresd.rpc")

StoreJob = Callable[[Broker], Any]
Submit = Callable[[StoreJob], Awaitable[Any]]


@dataclass(frozen=True)
class Handler:
    parse: Callable[[Any], Any]
    run: Callable[[Broker, Caller, Any], Any]
    discovers: bool = False


HANDLERS: dict[Method, Handler] = {
    Method.DAEMON_STATUS: Handler(params.no_params, Broker.daemon_status),
    Method.RESOURCES_LIST: Handler(params.list_resources, Broker.resources_list),
    Method.RESOURCES_ADD: Handler(params.add_resource, Broker.resources_add),
    Method.RESOURCES_REMOVE: Handler(params.remove_resource, Broker.resources_remove),
    Method.RESOURCES_REFRESH: Handler(params.no_params, Broker.resources_refresh, discovers=True),
    Method.ALLOCATE: Handler(params.allocate, Broker.allocate),
    Method.RELEASE: Handler(params.release, Broker.release),
    Method.ALLOCATIONS_LIST: Handler(params.list_allocations, Broker.allocations_list),
    Method.ALLOCATIONS_GET: Handler(params.get_allocation, Broker.allocations_get),
    Method.EVENTS_LIST: Handler(params.list_events, Broker.events_list),
}

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
}

_NO_ID = object()


def error_object(code: ErrorCode, message: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": int(code), "message": message}
    if data is not None:
        error["data"] = data
    return error


def error_response(id: Any, code: ErrorCode, message: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"jsonrpc": JSONRPC, "id": id, "error": error_object(code, message, data)}


def encode(message: Any) -> bytes:
    # ASCII with \u escapes: a lone surrogate echoed from a request (an id, an unknown field name) stays valid JSON.
    return json.dumps(message, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii") + b"\n"


class Dispatcher:
    """Turns one line from a client into at most one line back."""

    def __init__(self, submit: Submit, discover: Callable[[], list[Resource]]) -> None:
        self._submit = submit
        self._discover = discover

    async def handle_line(self, line: bytes, caller: Caller) -> bytes | None:
        try:
            message = _DECODER.decode(line.decode("utf-8"))
        except UnicodeDecodeError as error:
            return encode(error_response(None, ErrorCode.PARSE_ERROR, f"message is not valid UTF-8 ({error.reason})"))
        except RecursionError:
            return encode(error_response(None, ErrorCode.PARSE_ERROR, "message is nested too deeply"))
        except ValueError as error:
            return encode(error_response(None, ErrorCode.PARSE_ERROR, f"message is not valid JSON ({error})"))
        if isinstance(message, list):
            return await self._handle_batch(message, caller)
        response = await self.handle_message(message, caller)
        return None if response is None else encode(response)

    async def _handle_batch(self, batch: list[Any], caller: Caller) -> bytes | None:
        if not batch:
            return encode(error_response(None, ErrorCode.INVALID_REQUEST, "an empty batch is not a request"))
        if len(batch) > MAX_BATCH:
            return encode(error_response(None, ErrorCode.INVALID_REQUEST, f"a batch holds at most {MAX_BATCH} requests"))
        responses = await asyncio.gather(*(self.handle_message(m, caller) for m in batch))
        replies = [r for r in responses if r is not None]
        return encode(replies) if replies else None

    async def handle_message(self, message: Any, caller: Caller) -> dict[str, Any] | None:
        id = message.get("id", _NO_ID) if isinstance(message, dict) else _NO_ID
        problem = _envelope_problem(message, id)
        if problem is not None:
            return error_response(None if id is _NO_ID or not _valid_id(id) else id, ErrorCode.INVALID_REQUEST, problem)
        result = await self._call(message["method"], message.get("params"), caller)
        if id is _NO_ID:
            return None
        if isinstance(result, _Failure):
            return {"jsonrpc": JSONRPC, "id": id, "error": result.error}
        return {"jsonrpc": JSONRPC, "id": id, "result": result}

    async def _call(self, method: str, raw_params: Any, caller: Caller) -> Any:
        try:
            handler = HANDLERS[Method(method)]
        except ValueError:
            return _Failure(error_object(ErrorCode.METHOD_NOT_FOUND, f"method not found: {method!r}"))
        try:
            command = handler.parse(raw_params)
        except params.InvalidParams as error:
            return _Failure(error_object(ErrorCode.INVALID_PARAMS, error.message, {"type": "InvalidParams",
                                                                                   "field": error.field}))
        try:
            if handler.discovers:
                command = await asyncio.get_running_loop().run_in_executor(None, self._discover)
            run = handler.run
            return await self._submit(lambda broker: run(broker, caller, command))
        except errors.DomainError as error:
            return _Failure(error_object(ERROR_CODES[type(error)], error.message, {"type": type(error).__name__,
                                                                                   **error.data}))
        except StorageError as error:
            log.error("storage error in %s: %s", method, error)
            return _Failure(error_object(ErrorCode.STORAGE_ERROR, f"the database could not be written: {error}",
                                         {"type": "StorageError"}))
        except Exception:
            log.exception("internal error in %s", method)
            return _Failure(error_object(ErrorCode.INTERNAL_ERROR, "internal error; see the daemon's log",
                                         {"type": "InternalError"}))


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
