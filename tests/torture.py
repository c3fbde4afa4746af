"""Crash torture: clients allocate and release while the daemon is SIGKILLed and restarted, again and again.

Clients log, before sending, every key and release they attempt, and, after a reply, what was acknowledged.
A reply comes only after COMMIT, so every acknowledgement names a state the database must still hold after any
crash. `check` compares a log copy taken *before* a read-only snapshot of the database (what was acknowledged
then must be in it) with the attempts logged *after* it (what may legitimately have happened since).
Shared by tests/integration/test_torture.py and bench/bench_torture.py.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcpctl.client import Client, DaemonUnreachable, RpcError
from mcpresd.protocol import ErrorCode
from tests.conftest import FIXTURES, DaemonProcess, mcpresd_command

CAPACITY = {"slot": 10.0, "licence": 2.0}
CONFIG = "".join(f'\n[[resources]]\nname = "{name}"\ncapacity = {capacity:g}\nunit = "u"\n'
                 for name, capacity in CAPACITY.items())
UNSAFE_DAEMON = FIXTURES / "unsafe_daemon.py"


@dataclass
class Log:
    """What the clients asked for and what the daemon acknowledged; guarded by `lock`."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    keys: set[str] = field(default_factory=set)
    acked: dict[str, str] = field(default_factory=dict)  # allocation id -> its key, acknowledged active
    release_attempted: set[str] = field(default_factory=set)
    released: set[str] = field(default_factory=set)  # acknowledged released
    reclaimable: set[str] = field(default_factory=set)  # held by a process the test kills
    requests: int = 0
    acknowledged: int = 0
    anomalies: list[str] = field(default_factory=list)

    def copy(self) -> Log:
        with self.lock:
            return Log(keys=set(self.keys), acked=dict(self.acked), release_attempted=set(self.release_attempted),
                       released=set(self.released), reclaimable=set(self.reclaimable), requests=self.requests,
                       acknowledged=self.acknowledged, anomalies=list(self.anomalies))


def call_until_answered(socket_path: str, method: str, params: dict[str, Any],
                        resent: list[bool] | None = None) -> Any:
    """One request, sent again on a fresh connection until the daemon answers it (result or RpcError)."""
    give_up = time.monotonic() + 30.0  # the daemon is restarted within a second or two
    while True:
        try:
            with Client(socket_path, timeout=20.0) as client:
                return client.call(method, params)
        except DaemonUnreachable as error:
            if not error.transient or time.monotonic() > give_up:
                raise
            if error.lost and resent is not None:
                resent[0] = True
            time.sleep(0.01)


class Clients:
    """`count` threads allocating (keys key-<client>-<n>, holder: this process) and releasing at random."""

    def __init__(self, socket_path: str, log: Log, count: int = 4, seed: int = 0) -> None:
        self.socket_path = socket_path
        self.log = log
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._guarded, args=(n, random.Random(seed * 100 + n)), daemon=True)
                        for n in range(count)]

    def __enter__(self) -> Clients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def _guarded(self, client: int, rng: random.Random) -> None:
        try:
            self._run(client, rng)
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.errors.append(error)

    def _run(self, client: int, rng: random.Random) -> None:
        log = self.log
        holding: list[str] = []
        n = 0
        while not self.stop.is_set():
            if holding and (len(holding) >= 3 or rng.random() < 0.4):
                self._release(holding.pop(rng.randrange(len(holding))))
                continue
            n += 1
            key = f"key-{client}-{n}"
            resource = "licence" if rng.random() < 0.25 else "slot"
            params = {"resources": [{"resource": resource, "amount": rng.choice((1, 1, 2))}],
                      "holder_pid": os.getpid(), "idempotency_key": key}
            with log.lock:
                log.keys.add(key)
                log.requests += 1
            try:
                result = call_until_answered(self.socket_path, "allocate", params)
            except RpcError as error:
                if error.code != ErrorCode.INSUFFICIENT_CAPACITY:
                    with log.lock:
                        log.anomalies.append(f"allocate {key}: {error.code} {error.message}")
                continue
            with log.lock:
                log.acknowledged += 1
                if result["state"] != "active":
                    log.anomalies.append(f"allocate {key} answered {result['id']} {result['state']}")
                    continue
                log.acked[result["id"]] = key
            holding.append(result["id"])

    def _release(self, allocation_id: str) -> None:
        log = self.log
        with log.lock:
            log.release_attempted.add(allocation_id)
            log.requests += 1
        resent = [False]
        try:
            call_until_answered(self.socket_path, "release", {"id": allocation_id}, resent)
        except RpcError as error:
            if not (error.code == ErrorCode.ALREADY_RELEASED and resent[0]):
                with log.lock:
                    log.anomalies.append(f"release {allocation_id}: {error.code} {error.message}")
                return
        with log.lock:
            log.acknowledged += 1
            log.released.add(allocation_id)


def read_only(db: str) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10.0)
    conn.row_factory = sqlite3.Row
    return conn


def check(daemon: DaemonProcess, log: Log) -> list[str]:
    """Every broken invariant, in words; [] when the database and the API agree with the log."""
    before = log.copy()
    conn = read_only(daemon.db)
    try:
        conn.execute("BEGIN")  # one snapshot for every query below
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        rows = {r["id"]: r for r in conn.execute("SELECT id, state, idempotency_key, release_reason, owner_uid "
                                                 "FROM allocations")}
        used = conn.execute("SELECT i.resource, SUM(i.amount) FROM allocation_items i JOIN allocations a "
                            "ON a.id = i.allocation_id WHERE a.state = 'active' GROUP BY i.resource").fetchall()
        doubled = conn.execute("SELECT owner_uid, idempotency_key, COUNT(*) FROM allocations WHERE idempotency_key "
                               "IS NOT NULL GROUP BY 1, 2 HAVING COUNT(*) > 1").fetchall()
        conn.execute("COMMIT")
    finally:
        conn.close()
    after = log.copy()
    problems = list(after.anomalies)
    if integrity != "ok":
        problems.append(f"integrity_check: {integrity}")
    for resource, amount in used:
        if amount > CAPACITY.get(resource, float("inf")) + 1e-9:
            problems.append(f"over-commit: {amount:g} of {resource} active, capacity {CAPACITY[resource]:g}")
    problems += [f"key {key!r} has {n} allocations" for _, key, n in doubled]
    for allocation_id, key in before.acked.items():
        row = rows.get(allocation_id)
        if row is None:
            problems.append(f"lost: acknowledged allocation {allocation_id} ({key}) is not in the database")
        elif row["state"] != "active" and allocation_id not in after.release_attempted | after.reclaimable:
            problems.append(f"lost: acknowledged allocation {allocation_id} ({key}) is {row['state']} "
                            f"({row['release_reason']}) though nobody released it")
    for allocation_id in before.released:
        row = rows.get(allocation_id)
        if row is None or row["state"] != "released":
            problems.append(f"resurrected: acknowledged release of {allocation_id} is "
                            f"{'gone' if row is None else row['state']}")
    for allocation_id, row in rows.items():
        if row["idempotency_key"] not in after.keys:
            problems.append(f"unasked: allocation {allocation_id} with key {row['idempotency_key']!r}")
    live = {a["id"] for a in daemon.call("allocations.list", {"state": "active"})}
    settled = log.copy()
    for allocation_id in before.acked.keys() - settled.release_attempted - settled.reclaimable:
        if allocation_id not in live and allocation_id in rows:
            problems.append(f"lost: the API does not list acknowledged allocation {allocation_id} as active")
    return problems


def spawn_holder() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])


@dataclass
class Result:
    kills: int = 0
    requests: int = 0
    acknowledged: int = 0
    violations: list[str] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)


def torture(tmp: Path, kills: int, *, unsafe: bool = False, clients: int = 4, seed: int = 0,
            max_delay: float = 0.15, stop_at_first_violation: bool = False,
            say: Callable[[str], None] = lambda line: None) -> Result:
    """Run clients against a daemon SIGKILLed `kills` times at random moments; check after every restart."""
    rng = random.Random(seed)
    daemon = DaemonProcess(tmp, config=CONFIG, gpu_replay=None)
    if unsafe:
        daemon.args[:len(mcpresd_command())] = [sys.executable, str(UNSAFE_DAEMON)]
    log = Log()
    result = Result()
    daemon.start()
    holder: subprocess.Popen[bytes] | None = None
    holder_allocation: str | None = None
    try:
        # One allocation held by a child process that dies while the daemon is down: reclaimed on restart.
        holder = spawn_holder()
        allocation = daemon.call("allocate", {"resources": [{"resource": "slot", "amount": 1}],
                                              "holder_pid": holder.pid, "idempotency_key": "key-holder"})
        holder_allocation = allocation["id"]
        log.keys.add("key-holder")
        log.acked[holder_allocation] = "key-holder"
        log.reclaimable.add(holder_allocation)
        with Clients(daemon.socket, log, clients, seed) as running:
            for kill in range(kills):
                time.sleep(rng.uniform(0, max_delay))
                daemon.kill()
                result.kills += 1
                if holder is not None and holder.poll() is None:
                    holder.send_signal(signal.SIGKILL)
                    holder.wait()
                daemon.start()
                found = check(daemon, log)
                if kill == 0 and holder_allocation is not None:
                    found += check_reclaimed(daemon, holder_allocation)
                if found:
                    say(f"after kill {kill + 1}: {found[:3]}")
                    result.violations += found
                    if stop_at_first_violation:
                        break
            time.sleep(0.1)
        result.errors = running.errors
        result.violations += check(daemon, log)
        result.violations += check_own_allocations_kept(daemon, log)
    finally:
        daemon.stop()
        if holder is not None and holder.poll() is None:
            holder.kill()
            holder.wait()
    final = log.copy()
    result.requests, result.acknowledged = final.requests, final.acknowledged
    result.violations = list(dict.fromkeys(result.violations))  # the same one is found again after each restart
    return result


def check_reclaimed(daemon: DaemonProcess, allocation_id: str) -> list[str]:
    try:
        allocation = daemon.call("allocations.get", {"id": allocation_id})
    except RpcError as error:
        return [f"lost: allocation {allocation_id} of the killed holder: {error.message}"]
    if allocation["state"] != "released" or allocation.get("release_reason") != "holder_exited":
        return [f"dead holder kept: {allocation_id} is {allocation['state']} ({allocation.get('release_reason')})"]
    return []


def check_own_allocations_kept(daemon: DaemonProcess, log: Log) -> list[str]:
    """Allocations held by this (live) process and never released are still active after every restart."""
    final = log.copy()
    live = {a["id"] for a in daemon.call("allocations.list", {"state": "active"})}
    kept = final.acked.keys() - final.release_attempted - final.reclaimable
    return [f"live holder's allocation {i} was reclaimed" for i in sorted(kept - live)]
