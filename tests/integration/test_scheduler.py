"""The wait queue, holders and leases, checked through the real daemon (docs/scheduling.md states the rules).

Every daemon here ticks every 50 ms, so timeouts, TTLs, aging and preemption grace are seen within a tick.
Tests never time the daemon: they wait (bounded by DEADLINE_S) for the state or event they expect, and check
when things happened through the daemon's own timestamps (granted_at, released_at, expires_at, preempt_at).
Queued requests that must outlive the call that made them are detached and held by a `sleep` child
(`holders`), one per request, so a test can end any one of them; every child is killed afterwards.
Every wait is bounded: a broken daemon fails a test, it never hangs it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mcpctl.client import RpcError
from mcpresd.protocol import ErrorCode, Method
from tests.conftest import CONFIG, DaemonProcess

RESOURCES = CONFIG + """
[[resources]]
name = "one"
capacity = 1

[[resources]]
name = "units"
capacity = 2
"""

ORDER = ["critical", "high", "normal", "low"]
DEADLINE_S = 30.0  # how long a wait for an expected state may take on a loaded machine before the test fails


def config(**scheduler: str | bool) -> str:
    lines = [f"{key} = {json.dumps(value)}" for key, value in {"tick_interval": "50ms", **scheduler}.items()]
    return RESOURCES + "\n[scheduler]\n" + "\n".join(lines) + "\n"


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Start a daemon whose [scheduler] table is the keyword arguments (tick_interval 50ms unless given)."""
    started: list[DaemonProcess] = []

    def start(**scheduler: str | bool) -> DaemonProcess:
        home = tmp_path / f"daemon-{len(started)}"
        home.mkdir()
        process = DaemonProcess(home, config=config(**scheduler))
        process.start()
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            process.stop()


@pytest.fixture
def daemon(start_daemon: Callable[..., DaemonProcess]) -> DaemonProcess:
    return start_daemon()


@pytest.fixture
def holders() -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """Spawns `sleep 30` holder processes; every one is killed and reaped at the end of the test."""
    children: list[subprocess.Popen[bytes]] = []

    def spawn() -> subprocess.Popen[bytes]:
        child = subprocess.Popen(["sleep", "30"])
        children.append(child)
        return child

    try:
        yield spawn
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.wait(timeout=10)


class Line:
    """One raw client connection kept open: send requests, read replies and notifications, close at will."""

    def __init__(self, daemon: DaemonProcess, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(daemon.socket)
        self.buffer = b""
        self.ids = 0

    def __enter__(self) -> Line:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, method: str, params: dict[str, Any] | None = None) -> int:
        self.ids += 1
        message = {"jsonrpc": "2.0", "id": self.ids, "method": method, "params": params or {}}
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        return self.ids

    def read(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next message from the daemon (a reply or a notification); socket.timeout if none comes in time."""
        self.sock.settimeout(timeout)
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the daemon closed the connection")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        return message

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 5.0) -> dict[str, Any]:
        """Send one request and return its reply (the whole response object), skipping notifications."""
        request_id = self.send(method, params)
        while True:
            message = self.read(timeout)
            if message.get("id") == request_id:
                return message

    def close(self) -> None:
        self.sock.close()


def demand(resource: str, amount: float, **fields: Any) -> dict[str, Any]:
    return {"resources": [{"resource": resource, "amount": amount}], **fields}


def hold(daemon: DaemonProcess, resource: str, amount: float, holder: int | None = None, **fields: Any) -> str:
    """An active allocation held by `holder` (this test process by default)."""
    granted = daemon.call(Method.ALLOCATE, demand(resource, amount, holder_pid=holder or os.getpid(), **fields))
    assert granted["state"] == "active", granted
    return str(granted["id"])


def enqueue(daemon: DaemonProcess, resource: str, amount: float, holder: int, **fields: Any) -> str:
    """A detached request that does not fit now: answered at once, state queued."""
    queued = daemon.call(Method.ALLOCATE, demand(resource, amount, holder_pid=holder, wait=30, detach=True, **fields))
    assert queued["state"] == "queued", queued
    return str(queued["id"])


def get(daemon: DaemonProcess, allocation_id: str) -> dict[str, Any]:
    allocation: dict[str, Any] = daemon.call(Method.ALLOCATIONS_GET, {"id": allocation_id})
    return allocation


def state(daemon: DaemonProcess, allocation_id: str) -> str:
    return str(get(daemon, allocation_id)["state"])


def events(daemon: DaemonProcess, allocation_id: str | None = None) -> list[dict[str, Any]]:
    params: dict[str, Any] = {"limit": 10_000}
    if allocation_id is not None:
        params["allocation_id"] = allocation_id
    listed: list[dict[str, Any]] = daemon.call(Method.EVENTS_LIST, params)
    return listed


def kinds(daemon: DaemonProcess, allocation_id: str) -> list[str]:
    return [e["kind"] for e in events(daemon, allocation_id)]


def granted_order(daemon: DaemonProcess, ids: list[str]) -> list[str]:
    """`ids` in the order of their `allocated` events."""
    wanted = set(ids)
    return [e["allocation_id"] for e in events(daemon) if e["kind"] == "allocated" and e["allocation_id"] in wanted]


def eventually(check: Callable[[], bool], within: float = DEADLINE_S, every: float = 0.02) -> float:
    """Seconds until `check()` held; fails the test if it did not within `within` seconds."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > within:
            raise AssertionError(f"not true within {within}s: {check.__doc__ or check}")
        time.sleep(every)
    return time.monotonic() - start


def error_of(daemon: DaemonProcess, method: str, params: dict[str, Any]) -> RpcError:
    with pytest.raises(RpcError) as raised:
        daemon.call(method, params)
    return raised.value


def free(daemon: DaemonProcess, name: str) -> float:
    (resource,) = [r for r in daemon.call(Method.RESOURCES_LIST) if r["name"] == name]
    return float(resource["free"])


# -- order ----------------------------------------------------------------------


def test_waiters_are_granted_in_priority_order_critical_high_normal_low(
        daemon: DaemonProcess, holders: Callable[[], subprocess.Popen[bytes]]) -> None:
    current = hold(daemon, "one", 1)
    ids = {priority: enqueue(daemon, "one", 1, holders().pid, priority=priority)
           for priority in ["low", "critical", "normal", "high"]}

    served = []
    for _ in ORDER:
        daemon.call(Method.RELEASE, {"id": current})
        [current] = [i for i in ids.values() if state(daemon, i) == "active"]
        served.append(get(daemon, current)["priority"])
    assert served == ORDER
    assert granted_order(daemon, list(ids.values())) == [ids[p] for p in ORDER]


def test_waiters_of_one_priority_are_served_first_come_first_served(
        daemon: DaemonProcess, holders: Callable[[], subprocess.Popen[bytes]]) -> None:
    current = hold(daemon, "one", 1)
    ids = [enqueue(daemon, "one", 1, holders().pid) for _ in range(4)]

    for expected in ids:
        daemon.call(Method.RELEASE, {"id": current})
        assert [i for i in ids if state(daemon, i) == "active"] == [expected]
        current = expected
    assert granted_order(daemon, ids) == ids


def test_aging_serves_a_low_request_that_waited_three_intervals_before_a_newer_high_one(
        start_daemon: Callable[..., DaemonProcess], holders: Callable[[], subprocess.Popen[bytes]]) -> None:
    """A queued request gains one priority level per aging_interval it has waited, up to critical.

    With aging_interval 1 s, a low request that has waited over 3 s ranks as critical, above a high
    request that has just arrived, so it is served first.
    """
    daemon = start_daemon(aging_interval="1s")
    current = hold(daemon, "one", 1)
    old_low = enqueue(daemon, "one", 1, holders().pid, priority="low")
    eventually(lambda: daemon.call(Method.ALLOCATIONS_EXPLAIN, {"id": old_low})["effective_priority"] == "critical")
    new_high = enqueue(daemon, "one", 1, holders().pid, priority="high")
    assert daemon.call(Method.ALLOCATIONS_EXPLAIN, {"id": old_low})["effective_priority"] == "critical"

    daemon.call(Method.RELEASE, {"id": current})
    assert (state(daemon, old_low), state(daemon, new_high)) == ("active", "queued")


def test_a_two_unit_head_is_granted_before_one_unit_requests_that_keep_arriving(
        daemon: DaemonProcess, holders: Callable[[], subprocess.Popen[bytes]]) -> None:
    """Head-of-line protection: the head keeps what comes free; later, smaller requests wait behind it."""
    held = [hold(daemon, "units", 1), hold(daemon, "units", 1)]
    head = enqueue(daemon, "units", 2, holders().pid)

    later = []
    for allocation_id in held:
        later.append(enqueue(daemon, "units", 1, holders().pid))  # would fit in a freed unit, but must wait
        daemon.call(Method.RELEASE, {"id": allocation_id})
        later.append(enqueue(daemon, "units", 1, holders().pid))
        assert all(state(daemon, i) == "queued" for i in later)
    assert state(daemon, head) == "active"

    daemon.call(Method.RELEASE, {"id": head})
    assert [state(daemon, i) for i in later] == ["active", "active", "queued", "queued"]
    assert granted_order(daemon, [head, *later]) == [head, *later[:2]]


# -- waiting ends: timeout, disconnect ----------------------------------------------


def test_a_wait_that_runs_out_is_error_1012_and_leaves_nothing_held(daemon: DaemonProcess) -> None:
    hold(daemon, "one", 1)
    error = error_of(daemon, Method.ALLOCATE, demand("one", 1, holder_pid=os.getpid(), wait=0.3))

    assert error.code == ErrorCode.WAIT_TIMEOUT
    withdrawn = get(daemon, error.data["id"])
    assert withdrawn["released_at"] - withdrawn["created_at"] >= 0.3  # the daemon's clock: not before its wait
    assert (withdrawn["state"], withdrawn["release_reason"], withdrawn["items"]) == ("withdrawn", "timeout", [])
    assert daemon.call(Method.ALLOCATIONS_LIST, {"state": "queued"}) == []
    assert free(daemon, "one") == 0  # only the first allocation holds it


@pytest.mark.parametrize("holder", ["process", "connection"])
def test_a_waiting_client_that_disconnects_withdraws_its_request(daemon: DaemonProcess, holder: str) -> None:
    current = hold(daemon, "one", 1)
    fields = {"holder_pid": os.getpid()} if holder == "process" else {}
    with Line(daemon) as waiting:
        waiting.send(Method.ALLOCATE, demand("one", 1, wait=30, **fields))
        [queued] = eventually_queued(daemon)
    eventually(lambda: state(daemon, queued["id"]) == "withdrawn")

    assert get(daemon, queued["id"])["release_reason"] == "disconnected"
    daemon.call(Method.RELEASE, {"id": current})  # the queue is served in the release's own transaction
    assert state(daemon, queued["id"]) == "withdrawn"
    assert free(daemon, "one") == 1


def test_a_waiting_client_that_only_stops_sending_still_gets_its_grant(daemon: DaemonProcess) -> None:
    """shutdown(SHUT_WR) is a half-close, not a disconnect: the client still reads its reply."""
    current = hold(daemon, "one", 1)
    with Line(daemon) as waiting:
        request = waiting.send(Method.ALLOCATE, demand("one", 1, holder_pid=os.getpid(), wait=30))
        waiting.sock.shutdown(socket.SHUT_WR)
        [queued] = eventually_queued(daemon)
        daemon.call(Method.RELEASE, {"id": current})
        reply = waiting.read(timeout=DEADLINE_S)  # a withdrawal on the half-close would answer 1013 here

    assert reply["id"] == request
    assert (reply["result"]["id"], reply["result"]["state"]) == (queued["id"], "active")


def eventually_queued(daemon: DaemonProcess, count: int = 1) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = []

    def queued() -> bool:
        listed[:] = daemon.call(Method.ALLOCATIONS_LIST, {"state": "queued"})
        return len(listed) == count

    eventually(queued)
    return listed


# -- holders and leases ---------------------------------------------------------------


def test_a_sigkilled_holder_releases_at_once_and_the_waiter_is_granted(
        daemon: DaemonProcess, holders: Callable[[], subprocess.Popen[bytes]]) -> None:
    """The holder is watched (pidfd): its death frees the slot and the waiter is granted, without a poll of its
    own (the read below waits for that reply)."""
    holder = holders()
    held = hold(daemon, "one", 1, holder=holder.pid)
    with Line(daemon) as waiting:
        request = waiting.send(Method.ALLOCATE, demand("one", 1, wait=10))
        [queued] = eventually_queued(daemon)
        holder.send_signal(signal.SIGKILL)
        reply = waiting.read(timeout=DEADLINE_S)

    assert reply["id"] == request and reply["result"]["id"] == queued["id"]
    assert reply["result"]["state"] == "active"
    released = get(daemon, held)
    assert (released["state"], released["release_reason"]) == ("released", "holder_exited")
    assert kinds(daemon, held) == ["allocated", "holder_exited"]


def test_a_connection_held_allocation_lives_while_its_connection_is_open(daemon: DaemonProcess) -> None:
    with Line(daemon) as client:
        granted = client.call(Method.ALLOCATE, demand("licence", 1))["result"]
        assert granted["holder"] == "connection" and granted["holder_pid"] is None
        assert client.call(Method.DAEMON_STATUS)["result"]  # the connection is still served, and it holds:
        assert state(daemon, granted["id"]) == "active"
        assert free(daemon, "licence") == 1
    eventually(lambda: state(daemon, granted["id"]) == "released")

    assert get(daemon, granted["id"])["release_reason"] == "connection_closed"
    assert free(daemon, "licence") == 2
    assert kinds(daemon, granted["id"]) == ["allocated", "connection_closed"]


@pytest.mark.parametrize("busy", [False, True])
def test_an_allocate_still_waiting_its_turn_when_its_connection_closes_leaves_nothing_held(
        daemon: DaemonProcess, busy: bool) -> None:
    """A client sends thousands of requests, an allocate held by its connection behind them, then closes at once.
    The close is the daemon's own job and the committer takes submitters in turn: it ran while this uid's jobs
    still waited, and the allocate, run after it, was held by a connection already gone (until a restart); one
    that queued (busy) was attended by it, so never withdrawn, and granted later with no client to know."""
    reads = [{"jsonrpc": "2.0", "id": n, "method": Method.ALLOCATIONS_LIST, "params": {"limit": 1}}
             for n in range(1000)]
    last = [{"jsonrpc": "2.0", "id": "allocate", "method": Method.ALLOCATE, "params": demand("licence", 1)},
            {"jsonrpc": "2.0", "id": "after", "method": Method.RESOURCES_ADD,
             "params": {"name": "served", "capacity": 1}}]
    if busy:  # both wait in the queue, the connection attending them: withdrawn ("disconnected") when it closes
        held = hold(daemon, "licence", 2)
        last[:1] = [{"jsonrpc": "2.0", "id": "held", "method": Method.ALLOCATE, "params": demand("licence", 1, wait=60)},
                    {"jsonrpc": "2.0", "id": "pid", "method": Method.ALLOCATE,
                     "params": demand("licence", 1, wait=60, holder_pid=os.getpid())}]
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(daemon.socket)
        sock.sendall(b"".join(json.dumps(batch).encode() + b"\n" for batch in [reads] * 5 + [last]))

    def served() -> bool:
        """the connection's last job ran (one uid's jobs run in the order sent): the allocate before it too"""
        return any(r["name"] == "served" for r in daemon.call(Method.RESOURCES_LIST))

    eventually(served)
    assert daemon.call(Method.ALLOCATIONS_LIST, {"state": "queued"}) == []
    assert [a["id"] for a in daemon.call(Method.ALLOCATIONS_LIST, {"state": "active"})] == ([held] if busy else [])
    assert free(daemon, "licence") == (0 if busy else 2)


def test_an_allocation_is_released_when_its_ttl_runs_out(daemon: DaemonProcess) -> None:
    allocation_id = hold(daemon, "licence", 1, ttl=0.5)
    assert get(daemon, allocation_id)["expires_at"] is not None

    eventually(lambda: state(daemon, allocation_id) == "released")

    expired = get(daemon, allocation_id)
    assert expired["release_reason"] == "expired"
    assert expired["released_at"] >= expired["expires_at"]  # not before the lease ran out
    assert kinds(daemon, allocation_id) == ["allocated", "expired"]


def test_renewing_before_expiry_extends_the_lease(daemon: DaemonProcess) -> None:
    allocation_id = hold(daemon, "licence", 1, ttl=1.0)
    first_expiry = get(daemon, allocation_id)["expires_at"]

    renewed = daemon.call(Method.ALLOCATIONS_RENEW, {"id": allocation_id, "ttl": DEADLINE_S})
    assert renewed["expires_at"] > first_expiry
    eventually(lambda: time.time() > first_expiry + 0.2)  # past the first expiry (the host's one clock)...
    daemon.call(Method.DAEMON_STATUS)
    assert state(daemon, allocation_id) == "active"  # ...and it was kept: the renewed lease runs on

    shortened = daemon.call(Method.ALLOCATIONS_RENEW, {"id": allocation_id, "ttl": 0.2})
    eventually(lambda: state(daemon, allocation_id) == "released")
    expired = get(daemon, allocation_id)
    assert expired["release_reason"] == "expired" and expired["released_at"] >= shortened["expires_at"]
    assert kinds(daemon, allocation_id) == ["allocated", "renewed", "renewed", "expired"]


# -- preemption ---------------------------------------------------------------------


def test_a_preemptible_low_allocation_is_revoked_for_a_high_request_after_the_grace(
        start_daemon: Callable[..., DaemonProcess], holders: Callable[[], subprocess.Popen[bytes]]) -> None:
    daemon = start_daemon(preemption=True, preempt_grace="1s")
    victim = hold(daemon, "one", 1, priority="low", preemptible=True)
    high = enqueue(daemon, "one", 1, holders().pid, priority="high")

    assert "preempted" in kinds(daemon, victim)
    [preempted] = [e for e in events(daemon, victim) if e["kind"] == "preempted"]
    assert preempted["detail"]["for"] == high
    assert get(daemon, victim)["preempt_at"] is not None
    assert state(daemon, victim) == "active"  # the grace period first

    preempt_at = get(daemon, victim)["preempt_at"]
    eventually(lambda: state(daemon, high) == "active")
    assert get(daemon, high)["granted_at"] >= preempt_at  # after the grace, by the daemon's clock
    revoked = get(daemon, victim)
    assert (revoked["state"], revoked["release_reason"]) == ("released", "revoked")
    assert granted_order(daemon, [victim, high]) == [victim, high]


@pytest.mark.parametrize(("scheduler", "preemptible"), [
    pytest.param({"preemption": True, "preempt_grace": "1s"}, False, id="holder not preemptible"),
    pytest.param({"preempt_grace": "1s"}, True, id="preemption disabled (the default)"),
])
def test_without_consent_and_policy_nothing_is_preempted(
        start_daemon: Callable[..., DaemonProcess], holders: Callable[[], subprocess.Popen[bytes]],
        scheduler: dict[str, Any], preemptible: bool) -> None:
    daemon = start_daemon(**scheduler)
    victim = hold(daemon, "one", 1, priority="low", preemptible=preemptible)
    critical = enqueue(daemon, "one", 1, holders().pid, priority="critical")

    # Past the grace a preemption would have had, by the daemon's clock (its uptime):
    asked = daemon.call(Method.DAEMON_STATUS)["uptime_s"]
    eventually(lambda: daemon.call(Method.DAEMON_STATUS)["uptime_s"] > asked + 1.5)

    assert (state(daemon, victim), state(daemon, critical)) == ("active", "queued")
    assert kinds(daemon, victim) == ["allocated"]
    assert get(daemon, victim)["preempt_at"] is None


# -- explain ------------------------------------------------------------------------


def test_explain_names_the_blocker_its_place_and_when_the_blockers_ttl_runs_out(
        daemon: DaemonProcess, holders: Callable[[], subprocess.Popen[bytes]]) -> None:
    blocker = hold(daemon, "one", 1, ttl=60)
    first = enqueue(daemon, "one", 1, holders().pid, priority="high")
    second = enqueue(daemon, "one", 1, holders().pid)

    why = daemon.call(Method.ALLOCATIONS_EXPLAIN, {"id": second})

    assert why["queued"] is True
    assert (why["position"], why["queue_length"]) == (2, 2)
    assert why["fits_now"] is False
    assert [b["id"] for b in why["blockers"]] == [blocker]
    assert blocker in why["suggestion"]
    assert why["estimate"] == get(daemon, blocker)["expires_at"]
    assert daemon.call(Method.ALLOCATIONS_EXPLAIN, {"id": first})["position"] == 1
    assert daemon.call(Method.ALLOCATIONS_EXPLAIN, {"id": blocker})["queued"] is False


def test_explain_gives_no_estimate_when_the_blocker_has_no_ttl(
        daemon: DaemonProcess, holders: Callable[[], subprocess.Popen[bytes]]) -> None:
    blocker = hold(daemon, "one", 1)
    waiting = enqueue(daemon, "one", 1, holders().pid)

    why = daemon.call(Method.ALLOCATIONS_EXPLAIN, {"id": waiting})

    assert [b["id"] for b in why["blockers"]] == [blocker]
    assert why["estimate"] is None


# -- events -------------------------------------------------------------------------


def test_a_subscribed_connection_is_sent_the_events_of_other_clients(daemon: DaemonProcess) -> None:
    with Line(daemon) as subscriber:
        reply = subscriber.call(Method.EVENTS_SUBSCRIBE)
        assert reply["result"]["subscribed"] is True
        allocation_id = hold(daemon, "licence", 1)
        daemon.call(Method.RELEASE, {"id": allocation_id})

        seen = []
        while len(seen) < 2:
            message = subscriber.read(timeout=2.0)
            assert message["method"] == "event" and "id" not in message
            if message["params"]["allocation_id"] == allocation_id:
                seen.append(message["params"]["kind"])
    assert seen == ["allocated", "released"]


# -- choosing resources ---------------------------------------------------------------


@pytest.mark.parametrize(("where", "code"), [
    pytest.param("name~H100", None, id="H100 matches"),
    pytest.param("name~A100", ErrorCode.NEVER_FITS, id="A100 never fits"),
])
def test_where_filters_gpus_by_label(daemon: DaemonProcess, where: str, code: ErrorCode | None) -> None:
    params = demand("gpu", 1, holder_pid=os.getpid(), where=[where], wait=5)
    if code is None:
        assert [i["resource"] for i in daemon.call(Method.ALLOCATE, params)["items"]] == ["gpu:0"]
    else:
        assert error_of(daemon, Method.ALLOCATE, params).code == code  # refused at once, never queued
        assert daemon.call(Method.ALLOCATIONS_LIST, {"state": "queued"}) == []


def test_a_grant_dearer_than_max_cost_is_refused(daemon: DaemonProcess) -> None:
    assert error_of(daemon, Method.ALLOCATE, demand("licence", 1, max_cost=1)).code == \
        ErrorCode.INSUFFICIENT_CAPACITY
    assert free(daemon, "licence") == 2
    assert hold(daemon, "licence", 1, max_cost=1.5)


def test_a_range_is_granted_the_most_that_fits(daemon: DaemonProcess) -> None:
    params = {"resources": [{"resource": "slot", "amount": 2, "max": 20}], "holder_pid": os.getpid()}
    everything = daemon.call(Method.ALLOCATE, params)
    assert everything["items"][0]["amount"] == 10
    daemon.call(Method.RELEASE, {"id": everything["id"]})
    hold(daemon, "slot", 7)
    assert daemon.call(Method.ALLOCATE, params)["items"][0]["amount"] == 3
    assert error_of(daemon, Method.ALLOCATE, params).code == ErrorCode.INSUFFICIENT_CAPACITY


# -- idempotency ----------------------------------------------------------------------


def test_a_retry_of_a_queued_request_with_its_key_returns_it_and_waits_for_it(
        daemon: DaemonProcess, holders: Callable[[], subprocess.Popen[bytes]]) -> None:
    current = hold(daemon, "one", 1)
    holder = holders().pid
    queued = enqueue(daemon, "one", 1, holder, idempotency_key="job-9")
    assert enqueue(daemon, "one", 1, holder, idempotency_key="job-9") == queued

    with Line(daemon) as retry:
        request = retry.send(Method.ALLOCATE, demand("one", 1, holder_pid=holder, wait=30, idempotency_key="job-9"))
        with pytest.raises(TimeoutError):
            retry.read(timeout=0.3)  # it waits for the queued request, it does not answer "queued"
        daemon.call(Method.RELEASE, {"id": current})
        reply = retry.read(timeout=2.0)

    assert reply["id"] == request
    assert (reply["result"]["id"], reply["result"]["state"]) == (queued, "active")
    assert [a["id"] for a in daemon.call(Method.ALLOCATIONS_LIST, {"state": "all"})
            if a["idempotency_key"] == "job-9"] == [queued]


def test_a_request_waiting_when_the_daemon_stops_is_withdrawn_before_the_store_closes(
        daemon: DaemonProcess) -> None:
    current = hold(daemon, "one", 1)
    with Line(daemon) as waiting:
        waiting.send(Method.ALLOCATE, demand("one", 1, wait=30, holder_pid=os.getpid()))
        [queued] = eventually_queued(daemon)
        assert daemon.stop() == 0  # SIGTERM: the daemon closes the waiting connection on its way out
    daemon.start()

    withdrawn = get(daemon, queued["id"])
    assert (withdrawn["state"], withdrawn["release_reason"]) == ("withdrawn", "disconnected")
    assert state(daemon, current) == "active"  # held by this (living) process: it survives the restart
