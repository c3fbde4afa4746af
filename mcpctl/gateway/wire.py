"""MCP on the wire, as the gateway sees it: lines, ids, and the few messages it writes itself.

Rules of this module:
- A message the gateway passes on is never re-serialised: callers forward the
  line's original bytes. Only messages the gateway creates (and a server's
  progress it must renumber) are serialised here, as one compact line each.
- Request ids are compared by their JSON text (`id_key`), so `1` and `"1"`
  stay different ids, as JSON-RPC says.
- The gateway's own JSON-RPC error codes live in GatewayErrorCode, outside
  the range JSON-RPC reserves (-32768..-32000) and beside mcpres's (1001-1099).
"""

from __future__ import annotations

import json
import re
from enum import IntEnum

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

PREFIX = "mcpres: "
"""How the text of every tool result the gateway writes begins."""
TERMINAL_TASK_STATES = frozenset({"completed", "failed", "cancelled"})
TASK_QUERIES = frozenset({"tasks/get", "tasks/result", "tasks/cancel"})
"""Client requests about a task whose answers may show it has ended."""
EDGE_BYTES = 4096
"""How much of the start and of the end of an over-long line is kept to find out what it answers."""

_ID = rb'(-?\d+|"(?:[^"\\]|\\.)*")'
_VERSION = rb'(?:"jsonrpc"\s*:\s*"2\.0"\s*,\s*)?'
_HEAD_ID = re.compile(rb'\s*\{\s*' + _VERSION + rb'"id"\s*:\s*' + _ID + rb'\s*,\s*' + _VERSION
                      + rb'"(?:result|error)"\s*:')
_HEAD_RESPONSE = re.compile(rb'\s*\{\s*' + _VERSION + rb'"(?:result|error)"\s*:')
_HEAD_REQUEST_ID = re.compile(rb'\s*\{\s*' + _VERSION + rb'"id"\s*:\s*' + _ID + rb'\s*[,}]')
_TAIL_ID = re.compile(rb',\s*"id"\s*:\s*' + _ID + rb'\s*(?:,\s*"jsonrpc"\s*:\s*"2\.0"\s*)?\}\s*\Z')


class GatewayErrorCode(IntEnum):
    """JSON-RPC error codes of the gateway's own answers to a gated `tools/call`."""

    BROKER_UNREACHABLE = 1101
    """mcpresd cannot be reached and the tools file says `on_broker_down = "closed"`."""
    SERVER_EXITED = 1102
    """The wrapped server exited while the call waited for its allocation."""
    SHUTTING_DOWN = 1103
    """The gateway is stopping (its client closed stdin, or it got SIGTERM) while the call waited."""
    NOT_EXAMINABLE = 1104
    """A client request the gateway cannot examine for gating (over LINE_LIMIT, or a batch holding a gated
    `tools/call`): refused, never passed on ungated."""


def parse(line: bytes) -> Any:
    """The JSON value of a line, or None for a line that is not JSON (passed on all the same)."""
    try:
        return json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
        return None
    except RecursionError:
        return None


def id_key(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def long_response_id(head: bytes, tail: bytes) -> str | None:
    """The id (as `id_key`) of the response an over-long line is, from its first and last EDGE_BYTES; else None.

    Such a line is passed on in pieces, never parsed whole. A response from either
    SDK names its id next to its start (`{"jsonrpc":"2.0","id":1,"result":...`,
    Python) or at its very end (`{"result":...,"jsonrpc":"2.0","id":1}`,
    TypeScript); the id is taken only from those two places, and only when the
    line opens with `result`, `error` or `id`, so a request or notification, which
    opens with `method` or carries one, is never taken for a response. In valid
    JSON, `,"id":X}` closing the line can only be a member of the outermost object.
    """
    found = _HEAD_ID.match(head)
    if found is None and _HEAD_RESPONSE.match(head):
        found = _TAIL_ID.search(tail)
    if found is None:
        return None
    try:
        return id_key(json.loads(found.group(1)))
    except ValueError:
        return None


def is_response_head(head: bytes) -> bool:
    """Whether a line opening with `head` is a response (result or error), by its first members only."""
    return _HEAD_ID.match(head) is not None or _HEAD_RESPONSE.match(head) is not None


def long_request_id(head: bytes, tail: bytes) -> Any:
    """The id of an over-long request, as JSON, from its first or last EDGE_BYTES; None where neither end holds it.

    An `"id"` opening the outermost object (after `"jsonrpc"` at most) or closing it is that object's own.
    """
    found = _HEAD_REQUEST_ID.match(head) or _TAIL_ID.search(tail)
    if found is None:
        return None
    try:
        return json.loads(found.group(1))
    except ValueError:
        return None


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def tool_error(request_id: Any, text: str) -> bytes:
    """A `tools/call` result that tells the agent, in words, why its call did not run."""
    return encode({"jsonrpc": "2.0", "id": request_id,
                   "result": {"content": [{"type": "text", "text": PREFIX + _shown(text)}], "isError": True}})


def _shown(text: str) -> str:
    """The gateway's words, each line `printable`, for whoever reads them in an MCP client: they quote what
    others named (tool ids of the allocations a call waits for, resources, the daemon's messages)."""
    from mcpctl.escape import printable

    return "\n".join(map(printable, text.split("\n")))


def error_response(request_id: Any, code: GatewayErrorCode, message: str, data: dict[str, Any] | None = None) -> bytes:
    error: dict[str, Any] = {"code": int(code), "message": PREFIX + message}
    if data is not None:
        error["data"] = data
    return encode({"jsonrpc": "2.0", "id": request_id, "error": error})


def progress(token: Any, value: float, message: str | None = None) -> bytes:
    params: dict[str, Any] = {"progressToken": token, "progress": value}
    if message:
        params["message"] = _shown(message)
    return encode({"jsonrpc": "2.0", "method": "notifications/progress", "params": params})


def progress_token(params: Any) -> Any:
    """The request's `params._meta.progressToken` (a string or an integer), or None."""
    if not isinstance(params, dict):
        return None
    meta = params.get("_meta")
    if not isinstance(meta, dict):
        return None
    token = meta.get("progressToken")
    if isinstance(token, str) or (isinstance(token, int) and not isinstance(token, bool)):
        return token
    return None


def shift_progress(message: dict[str, Any], shift: float) -> bytes | None:
    """A server's progress notification moved up by `shift` (progress and total alike); None if malformed."""
    params = message.get("params")
    if not isinstance(params, dict):
        return None
    value = params.get("progress")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    params["progress"] = value + shift
    total = params.get("total")
    if isinstance(total, (int, float)) and not isinstance(total, bool):
        params["total"] = total + shift
    return encode(message)


def progress_complete(params: Any) -> bool:
    """Whether progress notification params say the work is done: a `total`, and `progress` at or past it."""
    if not isinstance(params, dict):
        return False
    value, total = params.get("progress"), params.get("total")
    if isinstance(value, bool) or isinstance(total, bool):
        return False
    return isinstance(value, (int, float)) and isinstance(total, (int, float)) and value >= total


def task_of(result: Any) -> tuple[str, float | None, str | None] | None:
    """(task id, ttl in ms, status) when a `tools/call` result starts a task instead of finishing.

    The 2026-07-28 tasks extension tags such a result `"resultType": "task"`; a
    2025-11-25 server answers a task-augmented call with `{"task": {...}}`.
    """
    if not isinstance(result, dict):
        return None
    result_type = result.get("resultType")
    task = result.get("task")
    if result_type == "task":
        if not isinstance(task, dict):
            task = result
    elif result_type is not None or not isinstance(task, dict):
        return None
    assert isinstance(task, dict)
    task_id = task.get("taskId")
    if not isinstance(task_id, str):
        return None
    ttl = task.get("ttl")
    ttl_ms = float(ttl) if isinstance(ttl, (int, float)) and not isinstance(ttl, bool) and ttl >= 0 else None
    status = task.get("status")
    return task_id, ttl_ms, status if isinstance(status, str) else None
