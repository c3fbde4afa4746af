"""Following the daemon's events as they happen: `events --follow` and `alerts --follow`.

Rules: subscribe first, then read any backlog on the same connection, so no
event falls between the two; each event is printed and flushed at once. A
reader that fell behind (stdout blocked on a full pipe) is unsubscribed by the
daemon: it subscribes again and pages through what it missed with
`events.list`, so no event is lost or shown twice. A daemon that restarts is
ridden through the same way, for as long as --retry-for allows (10 s by
default), as every other command rides through it. Exits 0 on Ctrl-C, SIGTERM
or a closed stdout (a `| head` that has read enough), 5 when the daemon goes
away for longer.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from mcpctl import exitcodes
from mcpctl.actions import quiet_stdout, rpc_failure, unreachable
from mcpctl.client import Client, DaemonUnreachable, RpcError
from mcpresd.protocol import ErrorCode, Method

PAGE = 10_000


class _Stop(BaseException):
    """SIGTERM: stop following, like Ctrl-C."""


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop()


def follow(socket_path: str, show: Callable[[dict[str, Any]], None], *,
           backlog: dict[str, object] | None = None, retry_for: float = 0.0) -> int:
    """Call `show` with every event from now on (after the `events.list` backlog, if `backlog` params are given);
    return the exit code. A connection lost once it was up is made again for up to `retry_for` seconds."""
    signal.signal(signal.SIGTERM, _stop)
    printed = 0
    try:
        with Client(socket_path, timeout=None, retry_for=retry_for) as client:
            subscribed = client.call(Method.EVENTS_SUBSCRIBE, {})
            newest_then = int(subscribed["last_id"]) if isinstance(subscribed, dict) else 0
            if backlog is not None:
                for event in client.call(Method.EVENTS_LIST, backlog):
                    show(event)
                    printed = max(printed, event["id"])
            while True:
                try:
                    for event in client.notifications():
                        if event["id"] <= printed:
                            continue
                        show(event)
                        printed = event["id"]
                except RpcError as error:
                    if not _lagged(error):
                        raise
                    printed = _catch_up(client, show, printed or int(error.data["after_id"] or 0))
                except DaemonUnreachable as error:
                    if not error.transient or retry_for <= 0:
                        raise
                    client.close()  # a daemon restarting: connect again (client.call waits for it)
                    printed = _catch_up(client, show, max(printed, newest_then))
    except DaemonUnreachable as error:
        return unreachable(error)
    except RpcError as error:
        return rpc_failure(error)
    except (KeyboardInterrupt, _Stop):
        return exitcodes.OK
    except BrokenPipeError:
        quiet_stdout()
        return exitcodes.OK
    return exitcodes.OK


def _lagged(error: RpcError) -> bool:
    """The daemon unsubscribed this connection because it left too many events unread."""
    return (error.code == ErrorCode.LIMIT_EXCEEDED and isinstance(error.data, dict)
            and error.data.get("type") == "SubscriberLagged")


def _catch_up(client: Client, show: Callable[[dict[str, Any]], None], printed: int) -> int:
    """Subscribe again, then show what was missed after `printed`, page by page; return the last id shown."""
    client.call(Method.EVENTS_SUBSCRIBE, {})
    while True:
        page = client.call(Method.EVENTS_LIST, {"after_id": printed, "limit": PAGE})
        for event in page:
            show(event)
            printed = event["id"]
        if len(page) < PAGE:
            return printed
