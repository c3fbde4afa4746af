"""Hangs and exhaustion (issue 13, items 9, 10 and 12): numbers that overflow, clients that do not read,
file descriptors. A real daemon on a temporary socket; every reply is read with a timeout, so a hang fails."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from mcpresd.params import SetBudgetCommand, BudgetKey
from mcpresd.protocol import MAX_QUANTITY, MIN_QUANTITY, BudgetScope, ErrorCode, Period
from mcpresd.service import Caller
from tests.conftest import CONFIG, DaemonProcess
from tests.live import LiveDaemon, live  # noqa: F401 - a fixture

HOUR = 3600.0


def big_config(capacity: float) -> str:
    return f"""
memory_reserve = "0"

[[resources]]
name = "vast-a"
capacity = {capacity!r}
unit = "units"
cost_per_unit_hour = {MAX_QUANTITY!r}

[[resources]]
name = "vast-b"
capacity = {capacity!r}
unit = "units"
"""


class Line:
    """One raw connection: send JSON lines, read reply lines, each read bounded by a timeout."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buffer = b""

    def send(self, message: Any) -> None:
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    def read(self) -> Any:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError("the daemon closed the connection")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def call(self, id: int, method: str, params: dict[str, Any] | None = None) -> Any:
        self.send({"jsonrpc": "2.0", "id": id, "method": method, **({"params": params} if params else {})})
        reply = self.read()
        assert reply["id"] == id
        return reply

    def close(self) -> None:
        self.sock.close()


# -- item 9: numbers are bounded where they enter, and every reply is sent --------------------------------------


@pytest.mark.parametrize(("method", "params", "field"), [
    ("resources.add", {"name": "huge", "capacity": 1e308}, "capacity"),
    ("resources.add", {"name": "huge", "capacity": MAX_QUANTITY * 2}, "capacity"),
    ("resources.add", {"name": "tiny", "capacity": 5e-324}, "capacity"),
    ("resources.add", {"name": "tiny", "capacity": MIN_QUANTITY / 2}, "capacity"),
    ("resources.add", {"name": "dear", "capacity": 1, "cost_per_unit_hour": 1e308}, "cost_per_unit_hour"),
    ("resources.set_cost", {"name": "slot", "cost_per_unit_hour": 1e308}, "cost_per_unit_hour"),
    ("allocate", {"resources": [{"resource": "slot", "amount": 1e308}]}, "resources[0].amount"),
    ("allocate", {"resources": [{"resource": "slot", "amount": 5e-324}]}, "resources[0].amount"),
    ("allocate", {"resources": [{"resource": "slot", "amount": 1, "max": 1e308}]}, "resources[0].max"),
    ("allocate", {"resources": [{"resource": "slot", "amount": 1}], "max_cost": 1e308}, "max_cost"),
    ("budgets.set", {"scope": "owner", "subject": "0", "period": "day", "limit": 5e-324}, "limit"),
    ("budgets.set", {"scope": "owner", "subject": "0", "period": "day", "limit": 1e308}, "limit"),
    ("release", {"id": "x", "measured": {"cpu_seconds": 1e308}}, "measured.cpu_seconds"),
    ("pools.create", {"name": "p", "factory": "slots", "parent": "slot", "slot_size": 5e-324, "max": 2},
     "slot_size"),
])
def test_numbers_past_the_bounds_are_invalid_params_naming_the_field(live: LiveDaemon, method: str,
                                                                     params: dict[str, Any], field: str) -> None:
    error = live.error(method, params)
    assert error.code == ErrorCode.INVALID_PARAMS
    assert error.data.get("field") == field


@pytest.mark.parametrize("capacity", [1e308, 5e-324, "1e-10"])
def test_a_config_capacity_past_the_bounds_is_refused(tmp_path: Path, capacity: Any) -> None:
    from mcpresd.config import ConfigError, load

    path = tmp_path / "mcpresd.toml"
    path.write_text(big_config(capacity).replace("'1e-10'", "1e-10"))
    with pytest.raises(ConfigError, match="capacity must be from"):
        load(path, socket=str(tmp_path / "s.sock"), database=str(tmp_path / "db"))


def test_capacities_and_costs_at_the_bounds_are_served_everywhere(tmp_path: Path) -> None:
    """The largest capacity and cost and the smallest budget limit: typed allocation, metrics, budgets, usage."""
    live = LiveDaemon(tmp_path, big_config(MAX_QUANTITY)).start()
    holder = Line(live.socket)
    try:
        granted = holder.call(1, "allocate", {"resources": [{"resource": "custom", "amount": MAX_QUANTITY}]})
        assert granted["result"]["state"] == "active"
        both = holder.call(2, "allocate", {"resources": [{"resource": "custom", "amount": MAX_QUANTITY}]})
        assert both["result"]["state"] == "active"
        live.call("budgets.set", {"scope": "owner", "subject": "0", "period": "day", "limit": MIN_QUANTITY})
        live.advance(HOUR)
        live.on_store(lambda broker: broker.record_samples({}, {}))  # one sampling round: rates of custom resources
        rates = live.call("metrics.current")["resources"]
        assert rates["vast-a"]["utilisation_rate"] == 100.0 and rates["vast-b"]["utilisation_rate"] == 100.0
        (budget,) = live.call("budgets.list")
        assert budget["state"] == "exceeded" and budget["fraction"] > 1
        assert live.call("usage", {"by": "resource"})["totals"]["cost"] > 0
    finally:
        holder.close()
        live.close()


def test_a_result_that_cannot_be_written_as_json_gets_an_internal_error_and_the_connection_goes_on(
        tmp_path: Path) -> None:
    """A budget limit of 5e-324 (written before the bounds) makes spent/limit infinite: -32603, not a hang."""
    live = LiveDaemon(tmp_path).start()
    line = Line(live.socket)
    try:
        root = Caller(uid=0, gid=0, pid=None, admin=True)
        key = BudgetKey(BudgetScope.OWNER, "0", Period.DAY)
        held = line.call(1, "allocate", {"resources": [{"resource": "licence", "amount": 1}],
                                         "holder_pid": os.getpid()})
        assert held["result"]["state"] == "active"
        live.on_store(lambda broker: broker.budgets_set(root, SetBudgetCommand(key, 5e-324, 0.8)))
        live.advance(HOUR)
        line.send([{"jsonrpc": "2.0", "id": 2, "method": "budgets.list"},
                   {"jsonrpc": "2.0", "id": 3, "method": "daemon.status"}])
        line.send({"jsonrpc": "2.0", "id": 4, "method": "budgets.list"})
        batch, alone = line.read(), line.read()
        assert [reply["id"] for reply in batch] == [2, 3]
        assert batch[0]["error"]["code"] == ErrorCode.INTERNAL_ERROR and "result" in batch[1]
        assert alone["id"] == 4 and alone["error"]["code"] == ErrorCode.INTERNAL_ERROR
        assert line.call(5, "daemon.status")["result"]["version"]
    finally:
        line.close()
        live.close()


# -- item 10: what a connection queues is bounded ---------------------------------------------------------------

BOUNDED = """
memory_reserve = "0"

[[resources]]
name = "slot"
capacity = 10
unit = "slots"

[limits]
max_pipelined = 4
reply_buffer = "64K"
batch_reply = "64K"
subscriber_buffer = "64K"
"""


def make_events(live: LiveDaemon, count: int, tag: str = "r") -> None:
    """`count` events: resources added, then removed, in batches (each a resource.added or .removed event)."""
    line = Line(live.socket)
    try:
        for first in range(0, count // 2, 250):
            names = [f"{tag}{n}" for n in range(first, min(first + 250, count // 2))]
            for method, params in (("resources.add", lambda n: {"name": n, "capacity": 1}),
                                   ("resources.remove", lambda n: {"name": n})):
                line.send([{"jsonrpc": "2.0", "id": i, "method": method, "params": params(name)}
                           for i, name in enumerate(names)])
                assert all("result" in reply for reply in line.read())
    finally:
        line.close()


def connection_state(live: LiveDaemon) -> list[tuple[int, int, bool]]:
    """(in flight, unread reply bytes, subscribed) of every connection, read on the daemon's loop."""
    server = live.daemon.server
    assert server is not None

    def read(broker: Any) -> list[tuple[int, int, bool]]:
        return [(c.in_flight, c._transport.get_write_buffer_size() if c._transport is not None else 0,
                 c in server.subscribers) for c in server.connections.values()]

    state: list[tuple[int, int, bool]] = live.on_store(read)
    return state


def wait_until(what: str, check: Any, live: LiveDaemon, rounds: int = 500) -> Any:
    """Ask the daemon's loop up to `rounds` times (each a store round trip) until `check` returns a value."""
    for _ in range(rounds):
        found = check(connection_state(live))
        if found:
            return found
    raise AssertionError(f"never saw {what}: {connection_state(live)}")


def test_a_client_that_never_reads_its_replies_holds_a_bounded_number_of_bytes(tmp_path: Path) -> None:
    live = LiveDaemon(tmp_path, BOUNDED).start()
    greedy = Line(live.socket, timeout=30)
    try:
        make_events(live, 1000)
        one_reply = len(json.dumps(live.call("events.list", {"limit": 10_000})))
        assert one_reply > 64 * 1024  # each reply alone passes the high-water mark
        greedy.sock.sendall(b"".join(
            json.dumps({"jsonrpc": "2.0", "id": n, "method": "events.list", "params": {"limit": 10_000}}).encode()
            + b"\n" for n in range(60)))
        unread = wait_until("the non-reading client's replies stop coming", lambda state: [
            size for in_flight, size, _ in state if in_flight == 0 and size > 0], live)
        assert max(unread) <= 4 * (one_reply + 1000) + 64 * 1024, f"{max(unread)} bytes queued for one client"
        assert live.call("daemon.status")["version"]  # the others are served meanwhile
        greedy.sock.settimeout(30)
        assert [greedy.read()["id"] for _ in range(60)] == list(range(60))  # reading again, it gets every reply
    finally:
        greedy.close()
        live.close()


def test_a_subscriber_that_never_reads_is_unsubscribed_with_a_last_line_saying_where_to_resume(
        tmp_path: Path) -> None:
    live = LiveDaemon(tmp_path, BOUNDED).start()
    listener = Line(live.socket, timeout=30)
    try:
        assert "result" in listener.call(1, "events.subscribe")
        for round in range(40):
            make_events(live, 500, tag=f"r{round}-")
            if not any(subscribed for _, _, subscribed in connection_state(live)):
                break
        else:
            raise AssertionError("a subscriber that never reads stayed subscribed")
        unread = max(size for _, size, _ in connection_state(live))
        assert unread <= 64 * 1024 + 4096, f"{unread} bytes of events queued for one subscriber"
        assert live.call("daemon.status")["version"]
        events = []
        while True:
            message = listener.read()
            if "id" in message:
                break
            events.append(message["params"])
        assert message["id"] is None and message["error"]["code"] == ErrorCode.LIMIT_EXCEEDED
        lagged = message["error"]["data"]
        assert lagged["type"] == "SubscriberLagged" and lagged["after_id"] == events[-1]["id"]
        assert [e["id"] for e in events] == list(range(events[0]["id"], events[-1]["id"] + 1))
        again = listener.call(2, "events.subscribe", {"after_id": lagged["after_id"]})["result"]
        assert [e["id"] for e in again["backlog"]] == list(range(lagged["after_id"] + 1, again["last_id"] + 1))
        make_events(live, 2, tag="after-")
        resumed = listener.read()
        assert resumed["method"] == "event" and resumed["params"]["id"] == again["last_id"] + 1
    finally:
        listener.close()
        live.close()


def test_a_batch_whose_replies_pass_the_cap_gets_errors_for_the_rest(tmp_path: Path) -> None:
    live = LiveDaemon(tmp_path, BOUNDED).start()
    line = Line(live.socket)
    try:
        make_events(live, 200)
        size = len(json.dumps(live.call("events.list", {"limit": 250})))
        assert 64 * 1024 / 3 < size < 64 * 1024 / 2
        line.send([{"jsonrpc": "2.0", "id": n, "method": "events.list", "params": {"limit": 250}} for n in range(5)])
        replies = line.read()
        assert [r["id"] for r in replies] == list(range(5))
        assert ["result" in r for r in replies] == [True, True, False, False, False]
        assert {r["error"]["code"] for r in replies[2:]} == {ErrorCode.LIMIT_EXCEEDED}
        assert "result" in line.call(9, "daemon.status")
    finally:
        line.close()
        live.close()


# -- item 12: one user cannot exhaust the daemon's file descriptors --------------------------------------------

NOBODY, SOMEONE, STRANGER = 65534, 65533, 65532

HOG = r"""
import json, socket, sys
path, most = sys.argv[1], int(sys.argv[2])
held, refusal = [], None
for _ in range(most):
    conn = socket.socket(socket.AF_UNIX)
    conn.settimeout(10)
    conn.connect(path)
    try:
        conn.sendall(b'{"jsonrpc":"2.0","id":1,"method":"daemon.status"}\n')
    except BrokenPipeError:  # refused: the daemon wrote why and closed before our request arrived
        pass
    reply = json.loads(conn.makefile("rb").readline())
    if "error" in reply:
        refusal = reply
        break
    held.append(conn)
print(json.dumps({"served": len(held), "refusal": refusal}), flush=True)
sys.stdin.read()  # hold every connection until the test closes our stdin
"""


class Hog:
    """A process running as `uid` that opens connections until one is refused, and holds them."""

    def __init__(self, socket_path: str, uid: int, most: int, groups: str = "--clear-groups") -> None:
        self.proc = subprocess.Popen(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", groups, sys.executable, "-c", HOG,
             socket_path, str(most)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd="/")
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "the connecting process died"
        self.outcome: dict[str, Any] = json.loads(line)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


def limited_daemon(tmp_path: Path, nofile: str, extra: str = "") -> DaemonProcess:
    """A daemon whose socket every user may open, started under `prlimit --nofile=SOFT:HARD`."""
    shared = Path(tempfile.mkdtemp(prefix="bounds-shared-"))  # other users may enter it (pytest's tmp is 0700)
    shared.chmod(0o755)
    daemon = DaemonProcess(tmp_path, config=CONFIG + extra, extra_args=("--socket-mode", "0666"))
    daemon.socket = str(shared / "mcpresd.sock")
    daemon.args[daemon.args.index("--socket") + 1] = daemon.socket
    daemon.args[:0] = ["prlimit", f"--nofile={nofile}"]
    try:
        daemon.start()
    except BaseException:
        shutil.rmtree(shared)
        raise
    return daemon


def stop(daemon: DaemonProcess) -> None:
    daemon.stop()
    shutil.rmtree(os.path.dirname(daemon.socket), ignore_errors=True)


def open_files(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc/PID/limits")


needs_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as other users")


@needs_root
def test_one_user_cannot_take_every_descriptor_and_is_told_why(tmp_path: Path) -> None:
    """Soft limit 100, hard 200: the daemon raises it to 200; nobody gets half of what is left for connections."""
    daemon = limited_daemon(tmp_path, "100:200")
    hog = None
    try:
        assert daemon.proc is not None and open_files(daemon.proc.pid) == (200, 200)
        hog = Hog(daemon.socket, NOBODY, most=300)
        assert hog.outcome["served"] == 48  # 200 - 64 = 136: 34 for pidfds, 6 in reserve, 96 connections
        refusal = hog.outcome["refusal"]
        assert refusal["id"] is None and refusal["error"]["code"] == ErrorCode.LIMIT_EXCEEDED
        assert "too many connections for uid 65534" in refusal["error"]["message"]
        assert daemon.call("daemon.status")["version"]  # root is still served
    finally:
        if hog is not None:
            hog.close()
        stop(daemon)


@needs_root
def test_root_and_the_admin_group_keep_a_reserve_when_other_users_hold_every_connection(tmp_path: Path) -> None:
    """200 descriptors: a reserve of 6 past max_connections, for root and members of the admin group only."""
    daemon = limited_daemon(tmp_path, "200:200", '\n[limits]\nmax_connections = 20\n[access]\nadmin_group = "staff"\n')
    hogs = []
    try:
        hogs = [Hog(daemon.socket, uid, most=50) for uid in (NOBODY, SOMEONE)]
        assert [hog.outcome["served"] for hog in hogs] == [10, 10]
        stranger = Hog(daemon.socket, STRANGER, most=5)
        hogs.append(stranger)
        assert stranger.outcome["served"] == 0
        assert "server overloaded" in stranger.outcome["refusal"]["error"]["message"]
        with daemon.client() as root:
            assert root.call("daemon.status")["version"]
        admin = Hog(daemon.socket, STRANGER, most=3, groups="--groups=50")  # staff, a supplementary group
        hogs.append(admin)
        assert admin.outcome["served"] == 3
    finally:
        for hog in hogs:
            hog.close()
        stop(daemon)


@needs_root
def test_holders_cannot_take_the_descriptors_connections_need(tmp_path: Path) -> None:
    """80 holders with a limit of 100: 9 get a pidfd, the rest are polled; connections are still accepted."""
    config = 'memory_reserve = "0"\n[[resources]]\nname = "seat"\ncapacity = 100\nunit = "seats"\n'
    daemon = DaemonProcess(tmp_path, config=config)
    daemon.args[:0] = ["prlimit", "--nofile=100:100"]
    daemon.start()
    holders = [subprocess.Popen(["sleep", "600"]) for _ in range(80)]
    held: list[socket.socket] = []
    try:
        with daemon.client() as client:
            granted = [client.call("allocate", {"resources": [{"resource": "seat", "amount": 1}],
                                                "holder_pid": holder.pid})["id"] for holder in holders]
        for _ in range(13):  # 100 - 64 = 36: 9 for pidfds, 1 in reserve, 26 connections, 13 per uid
            line = Line(daemon.socket)
            assert "result" in line.call(1, "daemon.status")
            held.append(line.sock)
        with socket.socket(socket.AF_UNIX) as extra:
            extra.settimeout(10)
            extra.connect(daemon.socket)
            refusal = json.loads(extra.makefile("rb").readline())
        assert "too many connections for uid 0" in refusal["error"]["message"]
        for conn in held:
            conn.close()
        holders[-1].kill()  # a polled holder: its allocation still ends when it does
        holders[-1].wait()
        with daemon.client() as client:
            for _ in range(1000):
                if client.call("allocations.get", {"id": granted[-1]})["state"] == "released":
                    break
            else:
                raise AssertionError("the allocation of a polled holder outlived it")
    finally:
        for conn in held:
            conn.close()
        for holder in holders:
            holder.kill()
            holder.wait()
        daemon.stop()


def test_a_pipelined_client_that_reads_late_gets_every_reply_in_order(tmp_path: Path) -> None:
    """Lines past max_pipelined wait, unread, and are all answered: also after the client's half-close."""
    live = LiveDaemon(tmp_path, BOUNDED + 'idle_timeout = "0.2s"\n')
    live.start()
    try:
        make_events(live, 500)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(live.socket)
            requests = b"".join(json.dumps({"jsonrpc": "2.0", "id": n, "method": "events.list",
                                            "params": {"limit": 10_000}}).encode() + b"\n" for n in range(200))
            sock.sendall(requests[:-10])  # a half-sent last line waits behind replies the client has not read
            wait_until("the daemon to stop reading the pipelined client",
                       lambda state: [size for in_flight, size, _ in state if in_flight == 0 and size > 0], live)
            # Let twice the idle timeout pass on the daemon's loop: a client that is not reading its replies is
            # not slow in sending, and keeps its connection.
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0.4), live.loop).result(10)
            sock.sendall(requests[-10:])
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := sock.recv(1 << 20):
                data += chunk
        replies = [json.loads(line) for line in data.splitlines()]
        assert [reply["id"] for reply in replies] == list(range(200))
        assert all("result" in reply for reply in replies)
    finally:
        live.close()


def test_a_pipelined_client_that_closes_while_its_requests_wait_has_them_withdrawn(tmp_path: Path) -> None:
    """Past max_pipelined the daemon stops reading, and so did not see the close: 8 waiting allocates stayed
    queued, and the first one granted went to their holder_pid with no client to know of it."""
    live = LiveDaemon(tmp_path).start()
    holder = subprocess.Popen(["sleep", "60"])
    try:
        blocker = live.call("allocate", {"resources": [{"resource": "licence", "amount": 2}],
                                         "holder_pid": os.getpid()})
        waiting = {"resources": [{"resource": "licence", "amount": 2}], "holder_pid": holder.pid, "wait": 600}
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(live.socket)
            sock.sendall(b"".join(json.dumps({"jsonrpc": "2.0", "id": n, "method": "allocate",
                                              "params": waiting}).encode() + b"\n" for n in range(9)))
            wait_until("eight requests in flight", lambda state: [1 for in_flight, _, _ in state if in_flight == 8],
                       live)
        deadline = time.monotonic() + 10
        while live.call("daemon.status")["allocations"]["queued"]:
            assert time.monotonic() < deadline, "the closed client's requests are still queued"
            time.sleep(0.05)
        live.call("release", {"id": blocker["id"]})
        assert live.call("daemon.status")["allocations"]["active"] == 0, "granted to a client that was gone"
    finally:
        holder.kill()
        holder.wait()
        live.close()


def test_one_users_many_subscribers_that_never_read_hold_a_bounded_number_of_bytes_together(
        tmp_path: Path) -> None:
    """Each subscriber was bounded alone: nobody's 100 subscribers held 760 MB of the daemon (8 GiB at the 1024
    connections one uid may have)."""
    live = LiveDaemon(tmp_path, BOUNDED + 'unread_per_uid = "256K"\n').start()
    listeners = [Line(live.socket, timeout=30) for _ in range(12)]
    try:
        for n, listener in enumerate(listeners):
            assert "result" in listener.call(n, "events.subscribe")
        for round in range(40):
            make_events(live, 500, tag=f"r{round}-")
            if not any(subscribed for _, _, subscribed in connection_state(live)):
                break
        else:
            raise AssertionError("subscribers that never read stayed subscribed")
        held = sum(size for _, size, _ in connection_state(live))
        assert held <= 256 * 1024 + 12 * 4096, f"{held} bytes queued for one user's subscribers"
        message = {}
        while "id" not in message:
            message = listeners[-1].read()
        assert message["error"]["data"]["type"] == "SubscriberLagged"
    finally:
        for listener in listeners:
            listener.close()
        live.close()


@pytest.mark.parametrize(("limit", "reply_buffer"), [(10_000, "64K"), (250, "1M")],
                         ids=["each past its reply_buffer", "each under its reply_buffer"])
def test_one_users_many_connections_that_never_read_hold_a_bounded_number_of_bytes_together(
        tmp_path: Path, limit: int, reply_buffer: str) -> None:
    """Each connection was bounded alone: nobody's 100 connections with 8 events.list each, never read, held
    400 MB of the daemon (4 GB at the 1024 connections one uid may have). Past unread_per_uid the connections
    that do not read are closed, largest first; the others are served."""
    config = BOUNDED.replace('reply_buffer = "64K"', f'reply_buffer = "{reply_buffer}"')
    live = LiveDaemon(tmp_path, config + 'unread_per_uid = "1M"\n').start()
    greedy = [Line(live.socket, timeout=30) for _ in range(12)]
    try:
        make_events(live, 1000)
        one_reply = len(json.dumps(live.call("events.list", {"limit": limit})))
        for line in greedy:
            line.sock.sendall(b"".join(json.dumps({"jsonrpc": "2.0", "id": n, "method": "events.list",
                                                   "params": {"limit": limit}}).encode() + b"\n"
                                       for n in range(20)))
        wait_until("the greedy clients' replies to stop coming", lambda state: len(state) < 13 and all(
            in_flight == 0 for in_flight, _, _ in state), live)
        held = sum(size for _, size, _ in connection_state(live))
        assert held <= (1 << 20) + 4 * one_reply, f"{held} bytes queued for one user's connections"
        assert live.call("daemon.status")["version"]
    finally:
        for line in greedy:
            line.close()
        live.close()
