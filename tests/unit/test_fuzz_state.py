"""Stateful fuzzing of the allocation core and the broker: random allocations, releases, closed connections,
clock ticks and resource changes, with the books checked after every step.

The broker runs on a temporary database through the daemon's own transaction handling
(`GroupCommitter._run_batch`: a domain error still commits, so a handler that wrote before raising would show).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, multiple, rule

from mcpresd import params
from mcpresd.core.errors import DomainError
from mcpresd.core.ledger import EPSILON
from mcpresd.service import Broker, Caller
from tests.fuzz_harness import UID, InProcessDaemon

RESOURCES = ["licence", "slot", "lic:a", "lic:b", "gpu", "gpu0", "GPU-0001"]
CUSTOM = ["lic:a", "lic:b", "licence", "slot"]
KEYS = [None, "k1", "k2", "k3"]
CONNECTIONS = [1, 2, 3]
ADMIN = Caller(uid=UID, gid=UID, pid=None, admin=True)
"""Resources are added and removed by the admin group (another uid is refused before anything changes)."""


class AllocationMachine(RuleBasedStateMachine):
    allocations = Bundle("allocations")

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="mcpres-state-")
        self.daemon = InProcessDaemon(Path(self.directory) / "state.db")
        self.broker: Broker = self.daemon.broker
        self.keys: dict[str, str] = {}

    def teardown(self) -> None:
        self.daemon.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def run(self, job: Any) -> Any:
        """Run one store job; a domain error must leave the database as it was. Returns the result or None."""
        before = self.daemon.snapshot()
        future = self.daemon.submit(job)
        error = future.exception()
        if error is None:
            return future.result()
        assert isinstance(error, DomainError), f"not a domain error: {error!r}"
        assert self.daemon.snapshot() == before, f"{type(error).__name__} changed the database"
        return None

    @initialize()
    def start(self) -> None:
        self.broker.take_outbox()

    @rule(target=allocations,
          demands=st.lists(st.tuples(st.sampled_from(RESOURCES), st.sampled_from([0.5, 1, 2, 3])),
                           min_size=1, max_size=3),
          queued=st.sampled_from(["no", "forever", "5s"]),
          key=st.sampled_from(KEYS),
          connection=st.sampled_from(CONNECTIONS),
          priority=st.sampled_from(["low", "normal", "high"]))
    def allocate(self, demands: list[tuple[str, float]], queued: str, key: str | None, connection: int,
                 priority: str) -> Any:
        raw: dict[str, Any] = {"resources": [{"resource": r, "amount": a} for r, a in demands],
                               "priority": priority}
        if queued != "no":
            raw.update(detach=True, wait="forever" if queued == "forever" else 5)
        if key is not None:
            raw["idempotency_key"] = key
        command = params.allocate(raw)
        caller = Caller(uid=UID, gid=UID, pid=os.getpid(), connection=connection)
        result = self.run(lambda broker: broker.allocate(caller, command))
        if result is None:
            return multiple()
        if key is not None:
            assert self.keys.setdefault(key, result["id"]) == result["id"], f"key {key} maps to two allocations"
        if result["state"] == "queued":
            assert result["items"] == []
        return result["id"]

    @rule(allocation_id=st.one_of(allocations, st.just("ffffffffffffffff")))
    def release(self, allocation_id: str) -> None:
        caller = Caller(uid=UID, gid=UID, pid=os.getpid())
        self.run(lambda broker: broker.release(caller, params.release({"id": allocation_id})))

    @rule(connection=st.sampled_from(CONNECTIONS))
    def connection_closes(self, connection: int) -> None:
        self.run(lambda broker: broker.connection_closed(connection))

    @rule(seconds=st.sampled_from([0.5, 3.0, 6.0, 400.0]))
    def tick(self, seconds: float) -> None:
        self.daemon.clock.now += seconds
        self.run(lambda broker: broker.tick())

    @rule(name=st.sampled_from(CUSTOM[:2]), capacity=st.sampled_from([0.5, 1, 2.5, 4]))
    def add_resource(self, name: str, capacity: float) -> None:
        command = params.add_resource({"name": name, "capacity": capacity})
        self.run(lambda broker: broker.resources_add(ADMIN, command))

    @rule(name=st.sampled_from(CUSTOM))
    def remove_resource(self, name: str) -> None:
        command = params.remove_resource({"name": name})
        self.run(lambda broker: broker.resources_remove(ADMIN, command))

    # -- the books -------------------------------------------------------------------

    @invariant()
    def nothing_is_over_committed(self) -> None:
        ledger = self.broker.ledger
        rows = self.daemon.store.conn.execute(
            "SELECT i.resource, sum(i.amount) FROM allocation_items i JOIN allocations a ON a.id = i.allocation_id"
            " WHERE a.state = 'active' GROUP BY i.resource").fetchall()
        in_db = dict(rows)
        for resource in ledger.resources():
            assert ledger.used(resource.name) <= resource.capacity + EPSILON, f"{resource.name} over-committed"
            assert math.isclose(in_db.pop(resource.name, 0.0), ledger.used(resource.name), abs_tol=1e-9), \
                f"{resource.name}: the database and the ledger disagree"
        assert not in_db, f"active items on resources the ledger does not know: {in_db}"

    @invariant()
    def memory_and_database_agree(self) -> None:
        conn = self.daemon.store.conn
        for state in ("active", "queued"):
            in_db = {row[0] for row in conn.execute("SELECT id FROM allocations WHERE state = ?", (state,))}
            in_memory = {a.id for a in self.broker.live.values() if a.state.value == state}
            assert in_db == in_memory, f"{state}: database {sorted(in_db)} != memory {sorted(in_memory)}"

    @invariant()
    def one_allocation_per_key(self) -> None:
        duplicates = self.daemon.store.conn.execute(
            "SELECT owner_uid, idempotency_key, count(*) FROM allocations WHERE idempotency_key IS NOT NULL"
            " GROUP BY 1, 2 HAVING count(*) > 1").fetchall()
        assert not duplicates

    @invariant()
    def queued_allocations_hold_nothing(self) -> None:
        held = self.daemon.store.conn.execute(
            "SELECT count(*) FROM allocation_items i JOIN allocations a ON a.id = i.allocation_id"
            " WHERE a.state = 'queued'").fetchone()[0]
        assert held == 0, "a queued allocation has items"
        assert all(not a.items for a in self.broker.queued)


AllocationMachine.TestCase.settings = settings(max_examples=50, stateful_step_count=30, deadline=None,
                                               suppress_health_check=[HealthCheck.too_slow])
TestAllocationMachine = AllocationMachine.TestCase
