"""SQLite storage: schema, migrations, and the statements the service runs.

Rules:
- One connection, opened and used by one thread (the event loop's, through `mcpresd.server.GroupCommitter`).
- WAL with synchronous=FULL: a COMMIT that returned is on disk.
- The WAL is checkpointed every WAL_CHECKPOINT_PAGES pages, not SQLite's default 1,000, where the disk has
  room for that (see there and `fit_wal_to_disk`).
- Transactions are explicit (`BEGIN IMMEDIATE` ... `COMMIT`); the caller groups
  requests into one transaction and replies only after it commits.
- Schema changes are registered migrations; CHECK constraints back the core's rules.
- After each COMMIT the database's path (and its -wal's) must still name the files this connection writes:
  a deleted or replaced database is a `DatabaseGone`, and from then on the store refuses every transaction
  (nothing more is acknowledged into a file nobody will read again).
- An ended allocation's hourly usage is summed in memory (`UsageFold`) and written into usage_hours at the
  next flush (each broker tick, any read of the totals, a correction, retention, close); its id waits in
  usage_unflushed, written in the transaction that ended it, so a start-up after a crash sums again what
  the last flush had not written, and nothing is lost or counted twice. The counts by state and the
  Prometheus counters (`MetricTally`) are kept the same way: a start counts the live allocations and those in
  usage_unflushed from their rows, beside what the last flush wrote.
- The newest committed event id is the commit high-water mark; the daemon's lock file remembers it
  (`mcpresd.files.DatabaseLock`), so a database that comes back behind it is seen to have lost commits.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import os
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mcpresd.core.accounting import Charge, UsageRecord, hourly_usage_parts
from mcpresd.core.model import Allocation, AllocationItem, Demand, HolderKind, Request, Resource
from mcpresd.files import DatabaseLock, restore_recipe
from mcpresd.protocol import POOL_PREFIX, AllocationState, Priority, ResourceType, compact_json_encoder

MIGRATIONS_NAME = "mcpresd"

WAL_CHECKPOINT_PAGES = 4096
"""Checkpoint the WAL (copy its pages into the database file and fsync it) once it holds this many pages.

The COMMIT that crosses the mark runs the checkpoint: it takes 3-8 times a plain commit (1-3 ms here). At
SQLite's default of 1,000 pages that was every ~170th commit of an allocate or release (about 6 pages each):
a checkpoint and the WAL restart after it fell on 1.2 % of commits, and on about half of the slowest 1 %,
so they set the p99 of grant latency (bench/bench_scheduler.py). At 4,096 pages it is every ~700th commit.
The cost: the -wal file grows to about 16 MiB (4 KiB pages) and keeps that size while the daemon runs
(SQLite removes it at a clean close). On a disk with less than WAL_ROOM_FACTOR times that free, the daemon
keeps SQLite's default (`Store.fit_wal_to_disk`): a WAL that fills the disk before its checkpoint would fail
writes, and a full disk cannot take the checkpoint that would free it.
"""
WAL_SMALL_DISK_PAGES = 1000
"""SQLite's default, kept while the disk holding the database is short of room."""
WAL_ROOM_FACTOR = 4
WAL_SIZE_LIMIT = 32 << 20
"""journal_size_limit: a -wal file grown past this by one huge transaction is cut back to it when the WAL
next starts over from its beginning (after a checkpoint)."""

SCHEMA_V1 = """
CREATE TABLE resources (
    name TEXT PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 200),
    type TEXT NOT NULL CHECK (type IN ('cpu', 'memory', 'disk', 'network', 'gpu', 'custom')),
    capacity REAL NOT NULL CHECK (capacity > 0),
    unit TEXT NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(labels)),
    uuid TEXT UNIQUE,
    cost_per_unit_hour REAL CHECK (cost_per_unit_hour IS NULL OR cost_per_unit_hour >= 0),
    source TEXT NOT NULL CHECK (source IN ('discovered', 'config', 'api')),
    created_at REAL NOT NULL
);
CREATE TABLE allocations (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('queued', 'active', 'released', 'withdrawn')),
    priority TEXT NOT NULL CHECK (priority IN ('low', 'normal', 'high', 'critical')),
    tool_id TEXT,
    execution_id TEXT,
    idempotency_key TEXT,
    request_digest TEXT,
    owner_uid INTEGER NOT NULL CHECK (owner_uid >= 0),
    requester_pid INTEGER,
    holder_pid INTEGER CHECK (holder_pid IS NULL OR holder_pid > 0),
    holder_start INTEGER,
    created_at REAL NOT NULL,
    released_at REAL,
    release_reason TEXT,
    request TEXT CHECK (request IS NULL OR json_valid(request)),
    holder_kind TEXT NOT NULL DEFAULT 'pid' CHECK (holder_kind IN ('pid', 'connection', 'none')),
    granted_at REAL,
    wait_until REAL,
    ttl_s REAL CHECK (ttl_s IS NULL OR ttl_s > 0),
    expires_at REAL,
    preemptible INTEGER NOT NULL DEFAULT 0 CHECK (preemptible IN (0, 1)),
    signal_holder INTEGER NOT NULL DEFAULT 0 CHECK (signal_holder IN (0, 1)),
    preempt_at REAL,
    CHECK ((state IN ('queued', 'active')) = (released_at IS NULL)),
    CHECK ((state = 'active') = (granted_at IS NOT NULL) OR state IN ('released', 'withdrawn'))
);
CREATE UNIQUE INDEX allocations_by_key ON allocations (owner_uid, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX allocations_live ON allocations (state) WHERE state IN ('queued', 'active');
CREATE TABLE allocation_items (
    allocation_id TEXT NOT NULL REFERENCES allocations (id),
    resource TEXT NOT NULL,
    amount REAL NOT NULL CHECK (amount > 0),
    PRIMARY KEY (allocation_id, resource)
) WITHOUT ROWID;
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    allocation_id TEXT,
    resource TEXT,
    uid INTEGER,
    detail TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(detail))
);
CREATE INDEX events_by_allocation ON events (allocation_id) WHERE allocation_id IS NOT NULL;
"""


SCHEMA_V2_METRICS = """
CREATE TABLE samples (
    resource TEXT NOT NULL,
    metric TEXT NOT NULL,
    ts REAL NOT NULL,
    value REAL,
    status TEXT NOT NULL DEFAULT 'ok' CHECK (status IN ('ok', 'unsupported', 'unknown')),
    CHECK ((status = 'ok') = (value IS NOT NULL))
);
CREATE INDEX samples_by_metric ON samples (resource, metric, ts);
CREATE INDEX samples_by_time ON samples (ts);
CREATE TABLE rollups (
    resource TEXT NOT NULL,
    metric TEXT NOT NULL,
    minute REAL NOT NULL,
    min REAL NOT NULL,
    max REAL NOT NULL,
    avg REAL NOT NULL,
    count INTEGER NOT NULL CHECK (count > 0),
    PRIMARY KEY (resource, metric, minute)
) WITHOUT ROWID;
CREATE TABLE alerts (
    id INTEGER PRIMARY KEY,
    rule TEXT NOT NULL,
    resource TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'firing', 'resolved')),
    level TEXT NOT NULL CHECK (level IN ('info', 'warning', 'error', 'critical')),
    since REAL NOT NULL,
    fired_at REAL,
    resolved_at REAL,
    last_value REAL,
    min REAL,
    max REAL,
    avg REAL,
    unknown INTEGER NOT NULL DEFAULT 0 CHECK (unknown IN (0, 1)),
    allocations TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(allocations))
);
CREATE UNIQUE INDEX alerts_open ON alerts (rule, resource) WHERE state != 'resolved';
"""


SCHEMA_V3_POOLS_AND_COST = """
CREATE TABLE resources_v3 (
    name TEXT PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 200),
    type TEXT NOT NULL CHECK (type IN ('cpu', 'memory', 'disk', 'network', 'gpu', 'custom')),
    capacity REAL NOT NULL CHECK (capacity > 0),
    unit TEXT NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(labels)),
    uuid TEXT UNIQUE,
    cost_per_unit_hour REAL CHECK (cost_per_unit_hour IS NULL OR cost_per_unit_hour >= 0),
    source TEXT NOT NULL CHECK (source IN ('discovered', 'config', 'api', 'pool')),
    created_at REAL NOT NULL
);
INSERT INTO resources_v3 SELECT name, type, capacity, unit, labels, uuid, cost_per_unit_hour, source, created_at
    FROM resources;
DROP TABLE resources;
ALTER TABLE resources_v3 RENAME TO resources;
ALTER TABLE allocations ADD COLUMN charges TEXT CHECK (charges IS NULL OR json_valid(charges));
ALTER TABLE allocations ADD COLUMN measured TEXT CHECK (measured IS NULL OR json_valid(measured));
CREATE INDEX allocations_by_end ON allocations (released_at) WHERE released_at IS NOT NULL;
CREATE INDEX allocations_by_tool ON allocations (tool_id, released_at) WHERE tool_id IS NOT NULL;
CREATE TABLE pools (
    name TEXT PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 100),
    spec TEXT NOT NULL CHECK (json_valid(spec)),
    state TEXT NOT NULL CHECK (state IN ('active', 'draining', 'drained')),
    source TEXT NOT NULL CHECK (source IN ('config', 'api')),
    created_at REAL NOT NULL,
    last_scaled_at REAL,
    failures INTEGER NOT NULL DEFAULT 0 CHECK (failures >= 0),
    paused_until REAL,
    next_index INTEGER NOT NULL DEFAULT 0 CHECK (next_index >= 0)
);
CREATE TABLE pool_members (
    resource TEXT PRIMARY KEY,
    pool TEXT NOT NULL REFERENCES pools (name),
    parent TEXT,
    parent_amount REAL CHECK (parent_amount IS NULL OR parent_amount > 0),
    handle TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(handle)),
    draining INTEGER NOT NULL DEFAULT 0 CHECK (draining IN (0, 1)),
    created_at REAL NOT NULL,
    CHECK ((parent IS NULL) = (parent_amount IS NULL))
);
CREATE INDEX events_by_pool ON events (resource) WHERE kind LIKE 'pool.%';
CREATE TABLE budgets (
    scope TEXT NOT NULL CHECK (scope IN ('tool', 'owner', 'pool')),
    subject TEXT NOT NULL CHECK (length(subject) BETWEEN 1 AND 200),
    period TEXT NOT NULL CHECK (period IN ('day', 'week', 'month')),
    "limit" REAL NOT NULL CHECK ("limit" > 0),
    soft REAL NOT NULL CHECK (soft > 0 AND soft <= 1),
    created_at REAL NOT NULL,
    PRIMARY KEY (scope, subject, period)
) WITHOUT ROWID;
"""


SCHEMA_V4_USAGE_HOURS = """
CREATE TABLE usage_hours (
    hour REAL NOT NULL,
    grouping TEXT NOT NULL CHECK (grouping IN ('tool', 'pool', 'resource')),
    key TEXT NOT NULL,
    owner_uid INTEGER NOT NULL,
    kind TEXT NOT NULL,
    through INTEGER NOT NULL CHECK (through IN (0, 1)),
    allocations INTEGER NOT NULL DEFAULT 0,
    waited REAL NOT NULL DEFAULT 0,
    cost REAL NOT NULL DEFAULT 0,
    resource_hours REAL,
    requested REAL,
    measured REAL,
    PRIMARY KEY (grouping, hour, owner_uid, key, kind, through)
) WITHOUT ROWID;
CREATE TABLE usage_spans (
    allocation_id TEXT NOT NULL,
    grouping TEXT NOT NULL CHECK (grouping IN ('tool', 'pool', 'resource')),
    key TEXT NOT NULL,
    owner_uid INTEGER NOT NULL,
    kind TEXT NOT NULL,
    first_hour REAL NOT NULL,
    end_hour REAL NOT NULL CHECK (end_hour > first_hour),
    cost REAL NOT NULL,
    resource_hours REAL,
    requested REAL,
    measured REAL
);
CREATE INDEX usage_spans_by_end ON usage_spans (grouping, end_hour);
CREATE INDEX usage_spans_by_allocation ON usage_spans (allocation_id);
CREATE INDEX allocations_by_grant ON allocations (granted_at) WHERE released_at IS NOT NULL;
"""
"""Ended allocations' usage summed per clock hour as they end (see `core.accounting.hourly_usage_parts`):
`usage` and budgets read these totals instead of every allocation, and they outlive pruned allocations.
A long hold keeps its whole hours as one row of usage_spans, figures per hour. Totals by owner are the tool
rows summed by owner_uid."""


SCHEMA_V5_ALLOCATION_COUNTS = """
CREATE TABLE allocation_counts (
    state TEXT PRIMARY KEY CHECK (state IN ('queued', 'active', 'released', 'withdrawn')),
    count INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO allocation_counts (state, count) VALUES ('queued', 0), ('active', 0), ('released', 0), ('withdrawn', 0);
UPDATE allocation_counts SET count = (SELECT count(*) FROM allocations WHERE allocations.state = allocation_counts.state);
CREATE TRIGGER allocations_counted_on_insert AFTER INSERT ON allocations BEGIN
    UPDATE allocation_counts SET count = count + 1 WHERE state = new.state;
END;
CREATE TRIGGER allocations_counted_on_change AFTER UPDATE OF state ON allocations WHEN old.state != new.state BEGIN
    UPDATE allocation_counts SET count = count - 1 WHERE state = old.state;
    UPDATE allocation_counts SET count = count + 1 WHERE state = new.state;
END;
CREATE TRIGGER allocations_counted_on_delete AFTER DELETE ON allocations BEGIN
    UPDATE allocation_counts SET count = count - 1 WHERE state = old.state;
END;
"""
"""Allocations by state, kept by triggers: `daemon.status` reads four rows instead of counting the table."""


WAIT_BOUNDS = (0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 14400.0, 86400.0)
"""The wait-time histogram's upper bounds (seconds; +Inf is the grants column), fixed by m009: changing them
takes a new migration."""
_WAITED = "max(0, new.granted_at - new.created_at)"
_GRANT_COUNTED = ("UPDATE metric_totals SET grants = grants + 1, wait_sum = wait_sum + {w}, "
                  + ", ".join(f"wait_le_{i} = wait_le_{i} + ({{w}} <= {bound!r})" for i, bound in enumerate(WAIT_BOUNDS))
                  + ";").format(w=_WAITED)
SCHEMA_V9_METRIC_COUNTERS = f"""
CREATE TABLE metric_totals (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    grants INTEGER NOT NULL,
    releases INTEGER NOT NULL,
    withdrawals INTEGER NOT NULL,
    timeouts INTEGER NOT NULL,
    wait_sum REAL NOT NULL,
    {", ".join(f"wait_le_{i} INTEGER NOT NULL" for i in range(len(WAIT_BOUNDS)))}
);
INSERT INTO metric_totals SELECT 1,
    count(granted_at),
    total(state = 'released' AND granted_at IS NOT NULL),
    total(state = 'withdrawn'),
    total(state = 'withdrawn' AND release_reason IS 'timeout'),
    total(max(0, granted_at - created_at)),
    {", ".join(f"total(max(0, granted_at - created_at) <= {bound!r})" for bound in WAIT_BOUNDS)}
    FROM allocations;
CREATE TRIGGER grants_counted_on_insert AFTER INSERT ON allocations WHEN new.state = 'active' BEGIN
    {_GRANT_COUNTED}
END;
CREATE TRIGGER grants_counted_on_change AFTER UPDATE OF state ON allocations
        WHEN old.state = 'queued' AND new.state = 'active' BEGIN
    {_GRANT_COUNTED}
END;
CREATE TRIGGER ends_counted AFTER UPDATE OF state ON allocations
        WHEN old.state IN ('queued', 'active') AND new.state IN ('released', 'withdrawn') BEGIN
    UPDATE metric_totals SET releases = releases + (new.state = 'released'),
        withdrawals = withdrawals + (new.state = 'withdrawn'),
        timeouts = timeouts + (new.state = 'withdrawn' AND new.release_reason IS 'timeout');
END;
"""
"""The Prometheus counters (grants, releases, withdrawals, timeouts, the wait-time histogram), in one row kept by
triggers in the transaction that changes the allocation (one UPDATE per grant, one per end): they survive
restarts and the pruning of ended allocations. On upgrade they start from the rows the database still holds.
`wait_le_N` counts grants that waited at most WAIT_BOUNDS[N] (cumulative, as Prometheus's buckets are)."""


def m001_initial_schema(db: Any) -> None:
    db.executescript(SCHEMA_V1)


def m002_metrics_and_alerts(db: Any) -> None:
    db.executescript(SCHEMA_V2_METRICS)


def m003_pools_and_cost(db: Any) -> None:
    db.executescript(SCHEMA_V3_POOLS_AND_COST)


def m004_usage_hours(db: Any) -> None:
    db.executescript(SCHEMA_V4_USAGE_HOURS)
    conn = db.conn
    totals: dict[tuple[Any, ...], list[Any]] = {}
    last = ""
    while True:
        rows = conn.execute(f"SELECT {_RECORD_COLUMNS} FROM allocations WHERE released_at IS NOT NULL AND id > ?"
                            " ORDER BY id LIMIT 5000", (last,)).fetchall()
        if not rows:
            break
        for row in rows:
            hours, spans = _usage_rows(usage_record(row), 1)
            for entry in hours:
                summed = totals.setdefault(entry[:6], [0, 0.0, 0.0, None, None, None])
                for index, value in enumerate(entry[6:]):
                    if value is not None:
                        summed[index] = (summed[index] or 0) + value
            conn.executemany(_ADD_SPAN, spans)
        last = rows[-1][0]
    conn.executemany(_ADD_USAGE, [(*key, *summed) for key, summed in totals.items()])


def m005_allocation_counts(db: Any) -> None:
    db.executescript(SCHEMA_V5_ALLOCATION_COUNTS)


def m006_measured_runs(db: Any) -> None:
    # `recent_runs` reads only a tool's measured runs, newest first: without it, the newest measured run of a
    # tool behind 500,000 unmeasured ones was found after reading all of them.
    db.executescript("CREATE INDEX allocations_measured_runs ON allocations (tool_id, released_at)"
                     " WHERE state = 'released' AND measured IS NOT NULL AND granted_at IS NOT NULL;")


def m007_allocations_by_state(db: Any) -> None:
    # `allocations.list` of one state, newest first, reads that state's rows only: a list of a rare state
    # (withdrawn) read the whole history by id.
    db.executescript("CREATE INDEX allocations_by_state ON allocations (state, id);")


def m008_usage_unflushed(db: Any) -> None:
    # Ended allocations whose usage is summed in memory and not yet in usage_hours (see UsageFold). The
    # counts by state are kept in memory too (Store.count_allocations) and written with the usage: the
    # triggers cost three UPDATEs per allocate+release.
    db.executescript("""
        CREATE TABLE usage_unflushed (allocation_id TEXT PRIMARY KEY) WITHOUT ROWID;
        DROP TRIGGER allocations_counted_on_insert;
        DROP TRIGGER allocations_counted_on_change;
        DROP TRIGGER allocations_counted_on_delete;
    """)


def m009_metric_counters(db: Any) -> None:
    db.executescript(SCHEMA_V9_METRIC_COUNTERS)


SCHEMA_V10_RESOURCE_CHECKS = """
CREATE TABLE resources_v10 (
    name TEXT PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 200),
    type TEXT NOT NULL CHECK (type = 'cpu' OR type = 'memory' OR type = 'disk' OR type = 'network' OR type = 'gpu'
                              OR type = 'custom'),
    capacity REAL NOT NULL CHECK (capacity > 0),
    unit TEXT NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(labels)),
    uuid TEXT UNIQUE,
    cost_per_unit_hour REAL CHECK (cost_per_unit_hour IS NULL OR cost_per_unit_hour >= 0),
    source TEXT NOT NULL CHECK (source = 'discovered' OR source = 'config' OR source = 'api' OR source = 'pool'),
    created_at REAL NOT NULL
);
INSERT INTO resources_v10 SELECT name, type, capacity, unit, labels, uuid, cost_per_unit_hour, source, created_at
    FROM resources;
DROP TABLE resources;
ALTER TABLE resources_v10 RENAME TO resources;
"""


def m010_resource_checks_without_in_lists(db: Any) -> None:
    # The same rules, as ORs: SQLite builds a throwaway table for `x IN (a, b, c)` at every row it checks,
    # which was half the cost of inserting a resource (0.42 of 0.8 s of CPU for 100,000, bench_register.py).
    db.executescript(SCHEMA_V10_RESOURCE_CHECKS)


def m011_cluster_allocations(db: Any) -> None:
    # The cluster site's allocations (mcpresd/cluster/site.py): Slurm grants them, the host's ledger never holds them.
    db.executescript(SCHEMA_V11_CLUSTER)


SCHEMA_V11_CLUSTER = """
CREATE TABLE cluster_allocations (
    id TEXT PRIMARY KEY,
    owner_uid INTEGER NOT NULL,
    owner_gid INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'active', 'released', 'withdrawn')),
    created_at REAL NOT NULL,
    granted_at REAL,
    released_at REAL,
    release_reason TEXT,
    job_id INTEGER,
    nodes TEXT,
    slurm_state TEXT,
    slurm_reason TEXT,
    request TEXT NOT NULL,
    holder_pid INTEGER,
    holder_start INTEGER,
    idempotency_key TEXT,
    tool_id TEXT,
    ttl_s REAL,
    expires_at REAL,
    wait_until REAL
);
CREATE INDEX cluster_allocations_live ON cluster_allocations (state) WHERE state IN ('queued', 'active');
"""


def m012_metric_counters_in_memory(db: Any) -> None:
    # The counters are kept in memory (MetricTally) and written with the usage: the triggers cost an UPDATE per
    # grant and per end. metric_totals now holds what the allocations that ended and were flushed add; a start
    # adds the live ones and those in usage_unflushed (Store._load_metrics), so take those out of it here.
    db.executescript("""
        DROP TRIGGER grants_counted_on_insert;
        DROP TRIGGER grants_counted_on_change;
        DROP TRIGGER ends_counted;
    """)
    conn = db.conn
    written = MetricTally.from_row(conn.execute("SELECT * FROM metric_totals").fetchone()[1:])
    written.take(_unwritten_tally(conn))
    conn.execute(_WRITE_METRICS, written.row())


def m013_live_and_withdrawn_by_id(db: Any) -> None:
    # m007's (state, id) index took an entry per allocation, moved at every release: a leaf page more written
    # by each allocate's and each release's COMMIT, and three b-tree changes per pair. A list of one state needs
    # an index only for the rare states: the live ones (allocations_live, now by id too) and the withdrawn ones;
    # released allocations are most of the table, read newest first by id (list_allocations names the state
    # as a literal, which a partial index needs).
    db.executescript("""
        DROP INDEX allocations_by_state;
        DROP INDEX allocations_live;
        CREATE INDEX allocations_live ON allocations (state, id) WHERE state IN ('queued', 'active');
        CREATE INDEX allocations_withdrawn ON allocations (id) WHERE state = 'withdrawn';
    """)


# Registered in order; never edit one that has shipped, add the next.
MIGRATIONS = (m001_initial_schema, m002_metrics_and_alerts, m003_pools_and_cost, m004_usage_hours,
              m005_allocation_counts, m006_measured_runs, m007_allocations_by_state, m008_usage_unflushed,
              m009_metric_counters, m010_resource_checks_without_in_lists, m011_cluster_allocations,
              m012_metric_counters_in_memory, m013_live_and_withdrawn_by_id)

_RECORD_COLUMNS = "id, tool_id, owner_uid, created_at, granted_at, released_at, charges, measured"
_LIVE = ("allocations INDEXED BY allocations_live", " AND state IN ('queued', 'active')")
_LISTED_BY = {"queued": _LIVE, "active": _LIVE, "withdrawn": ("allocations INDEXED BY allocations_withdrawn", "")}
"""How list_allocations reads one state (m013): the table with its index, and the index's own WHERE term (a
partial index is taken only where the query has that term); released allocations, most of the table, by id."""


def usage_record(row: tuple[Any, ...]) -> UsageRecord:
    """An ended allocation as accounting sees it, from a row of _RECORD_COLUMNS."""
    return UsageRecord(row[0], row[1], row[2], row[3], row[4], row[5], _charges_from_json(row[6]),
                       {} if row[7] is None else json.loads(row[7]))


def add_usage(conn: sqlite3.Connection, record: UsageRecord, sign: int) -> None:
    """Add (sign 1) or take back (-1) an ended record's hourly usage parts and spans."""
    hours, spans = _usage_rows(record, sign)
    conn.executemany(_ADD_USAGE, hours)
    if sign < 0:
        conn.execute("DELETE FROM usage_spans WHERE allocation_id = ?", (record.allocation_id,))
    else:
        conn.executemany(_ADD_SPAN, spans)


class MetricTally:
    """The Prometheus counters as values: grants, ends by kind, the wait-time sum and histogram (by bucket, not
    cumulative: WAIT_BOUNDS then +Inf)."""

    __slots__ = ("grants", "releases", "withdrawals", "timeouts", "wait_sum", "waits")

    def __init__(self) -> None:
        self.grants = self.releases = self.withdrawals = self.timeouts = 0
        self.wait_sum = 0.0
        self.waits = [0] * (len(WAIT_BOUNDS) + 1)

    def __bool__(self) -> bool:
        return bool(self.grants or self.releases or self.withdrawals)

    @classmethod
    def from_row(cls, row: Iterable[Any]) -> MetricTally:
        """From metric_totals' columns after its id (cumulative buckets)."""
        grants, releases, withdrawals, timeouts, wait_sum, *cumulative = row
        tally = cls()
        tally.grants, tally.releases, tally.withdrawals, tally.timeouts = grants, releases, withdrawals, timeouts
        tally.wait_sum = wait_sum
        below = 0
        for index, count in enumerate([*cumulative, grants]):
            tally.waits[index] = count - below
            below = count
        return tally

    def row(self) -> tuple[Any, ...]:
        """metric_totals' columns after its id."""
        return (self.grants, self.releases, self.withdrawals, self.timeouts, self.wait_sum,
                *itertools.accumulate(self.waits[:-1]))

    def grant(self, created_at: float, granted_at: float) -> None:
        waited = granted_at - created_at
        if waited < 0:
            waited = 0.0
        self.grants += 1
        self.wait_sum += waited
        self.waits[bisect.bisect_left(WAIT_BOUNDS, waited)] += 1

    def end(self, state: str, reason: str | None) -> None:
        if state == "released":
            self.releases += 1
        else:
            self.withdrawals += 1
            if reason == "timeout":
                self.timeouts += 1

    def ended(self, allocation: Allocation) -> None:
        """All an ended allocation adds: its grant, if it had one, and its end."""
        if allocation.granted_at is not None:
            self.grant(allocation.created_at, allocation.granted_at)
        self.end(allocation.state.value, allocation.release_reason)

    def merge(self, other: MetricTally) -> None:
        self.grants += other.grants
        self.releases += other.releases
        self.withdrawals += other.withdrawals
        self.timeouts += other.timeouts
        self.wait_sum += other.wait_sum
        self.waits = [mine + theirs for mine, theirs in zip(self.waits, other.waits)]

    def take(self, other: MetricTally) -> None:
        self.grants -= other.grants
        self.releases -= other.releases
        self.withdrawals -= other.withdrawals
        self.timeouts -= other.timeouts
        self.wait_sum -= other.wait_sum
        self.waits = [mine - theirs for mine, theirs in zip(self.waits, other.waits)]


_WRITE_METRICS = ("UPDATE metric_totals SET grants = ?, releases = ?, withdrawals = ?, timeouts = ?, wait_sum = ?, "
                  + ", ".join(f"wait_le_{i} = ?" for i in range(len(WAIT_BOUNDS))))


def _tally_rows(conn: sqlite3.Connection, where: str) -> MetricTally:
    tally = MetricTally()
    for state, created_at, granted_at, reason in conn.execute(
            f"SELECT state, created_at, granted_at, release_reason FROM allocations WHERE {where}"):
        if granted_at is not None:
            tally.grant(created_at, granted_at)
        if state in ("released", "withdrawn"):
            tally.end(state, reason)
    return tally


def _unwritten_tally(conn: sqlite3.Connection) -> MetricTally:
    """What metric_totals does not hold: the live allocations' grants and what those ended since the last flush
    (usage_unflushed) add."""
    tally = _tally_rows(conn, "state IN ('queued', 'active')")
    tally.merge(_tally_rows(conn, "id IN (SELECT allocation_id FROM usage_unflushed)"))
    return tally


class UsageFold:
    """Ended records' usage_hours rows summed by key, their usage_spans rows, in memory until written."""

    __slots__ = ("hours", "spans")

    def __init__(self) -> None:
        self.hours: dict[tuple[Any, ...], list[Any]] = {}
        self.spans: list[tuple[Any, ...]] = []

    def __bool__(self) -> bool:
        return bool(self.hours or self.spans)

    def add(self, record: UsageRecord) -> None:
        hours, spans = _usage_rows(record, 1)
        self._sum(hours)
        self.spans += spans

    def merge(self, other: UsageFold) -> None:
        self._sum([(*key, *figures) for key, figures in other.hours.items()])
        self.spans += other.spans

    def _sum(self, rows: Iterable[tuple[Any, ...]]) -> None:
        for row in rows:
            key = row[:6]
            summed = self.hours.get(key)
            if summed is None:
                self.hours[key] = list(row[6:])
                continue
            for index, value in enumerate(row[6:]):
                if value is not None:
                    summed[index] = value if summed[index] is None else summed[index] + value

    def write(self, conn: sqlite3.Connection) -> None:
        conn.executemany(_ADD_USAGE, [(*key, *figures) for key, figures in self.hours.items()])
        conn.executemany(_ADD_SPAN, self.spans)


def _usage_rows(record: UsageRecord, sign: int) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    def signed(value: float | None) -> float | None:
        return None if value is None else sign * value

    hours, spans = hourly_usage_parts(record)
    owner = record.owner_uid
    if sign == 1:
        return ([(hour, part.by, part.key, owner, part.kind, int(through), *part[3:]) for hour, through, part in hours],
                [(record.allocation_id, part.by, part.key, owner, part.kind, first, end, *part[5:])
                 for first, end, part in spans])
    return ([(hour, part.by, part.key, record.owner_uid, part.kind, int(through), sign * part.allocations,
              sign * part.waited, sign * part.cost, signed(part.resource_hours), signed(part.requested),
              signed(part.measured)) for hour, through, part in hours],
            [(record.allocation_id, part.by, part.key, record.owner_uid, part.kind, first, end, part.cost,
              part.resource_hours, part.requested, part.measured) for first, end, part in spans])


def _plus(column: str) -> str:
    """NULL (nothing of that kind) stays NULL until a part brings a figure."""
    return f"CASE WHEN excluded.{column} IS NULL THEN {column} ELSE coalesce({column}, 0) + excluded.{column} END"


_ADD_USAGE = (
    "INSERT INTO usage_hours (hour, grouping, key, owner_uid, kind, through, allocations, waited, cost,"
    " resource_hours, requested, measured) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (grouping, hour, owner_uid, key, kind, through) DO UPDATE SET"
    " allocations = allocations + excluded.allocations, waited = waited + excluded.waited,"
    f" cost = cost + excluded.cost, resource_hours = {_plus('resource_hours')}, requested = {_plus('requested')},"
    f" measured = {_plus('measured')}")
_ADD_SPAN = ("INSERT INTO usage_spans (allocation_id, grouping, key, owner_uid, kind, first_hour, end_hour, cost,"
             " resource_hours, requested, measured) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


def _migrations() -> Any:
    from sqlite_utils import Migrations

    migrations = Migrations(MIGRATIONS_NAME)
    for migration in MIGRATIONS:
        migrations()(migration)
    return migrations


class StorageError(Exception):
    """The database could not be read or written."""


class CorruptDatabase(StorageError):
    """The database file failed its integrity check."""


class MigrationFailed(StorageError):
    """Applying the migrations failed; `sqlite_errorcode` is SQLite's primary result code where known."""

    sqlite_errorcode = 0


class DatabaseGone(StorageError):
    """The database's path no longer names the file the daemon writes (deleted or replaced)."""


MIGRATION_HEARTBEAT_S = 10.0
"""How often a running migration is reported (Store.migration_heartbeat)."""


def apply_migrations(conn: sqlite3.Connection) -> None:
    from sqlite_utils import Database

    _migrations().apply(Database(conn))


class Store:
    """The daemon's SQLite database."""

    migrate_in_child = False
    """Set by the daemon: apply pending migrations in a child process (keeps sqlite-utils out of its memory)."""
    migration_heartbeat: Callable[[float, bool], None] | None = None
    """Set by the daemon: called every MIGRATION_HEARTBEAT_S while that child runs, with the seconds so far and
    whether the child used CPU since the last call (it asks systemd to extend its start timeout while the
    child progresses: a large database's migration may outlast TimeoutStartSec; a stalled one may not)."""

    def __init__(self, path: str | Path, *, check_integrity: bool = False, lock: DatabaseLock | None = None,
                 identity: tuple[int, int] | None = None) -> None:
        self.path = str(path)
        self.lock = lock
        self.lost_commits: dict[str, Any] | None = None
        """Set by the daemon when the database came back behind its commit high-water mark (see daemon.status)."""
        self.gone: str | None = None
        """Why the database can no longer be written (its file was deleted or replaced), once seen."""
        self.wal_commits_dropped = 0
        """Committed transactions in the -wal that SQLite's recovery dropped at this open (a damaged frame)."""
        frames: list[tuple[int, bool]] = []
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            frames = wal_frames(self.path + "-wal")
        self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self._wal_pages = 0
        self.fit_wal_to_disk()
        self.conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        self.conn.execute("PRAGMA foreign_keys=ON")
        self.conn.execute("PRAGMA busy_timeout=5000")
        if check_integrity and not self.integrity_ok():
            self.conn.close()  # before any migration writes into a damaged file
            raise CorruptDatabase(f"database {self.path} failed its integrity check (PRAGMA quick_check)")
        if frames:
            self.wal_commits_dropped = self._commits_recovery_dropped(frames)
        self._migrate()
        self._files: dict[str, tuple[int, int]] = {}
        if self.path != ":memory:":
            if identity is None:
                info = os.stat(self.path)
                identity = (info.st_dev, info.st_ino)
            self._files[self.path] = identity
            self._note_wal()
        self.mark = self.last_event_id()
        """The commit high-water mark: the newest committed event id."""
        self._newest_event = self.mark
        self._usage_open = UsageFold()
        """Usage of allocations ended in the open transaction (dropped if it rolls back)."""
        self._usage_kept = UsageFold()
        """Committed usage not yet written into usage_hours; at start, what the last run had not written."""
        self._usage_writing = UsageFold()
        """Kept usage written by the open transaction's flush (kept again if it rolls back)."""
        for row in self.conn.execute(f"SELECT {_RECORD_COLUMNS} FROM allocations"
                                     " WHERE id IN (SELECT allocation_id FROM usage_unflushed)"):
            self._usage_kept.add(usage_record(row))
        self._counts = self._load_counts()
        """Allocations by state, committed; the open transaction's changes are in _counts_open."""
        self._counts_open: dict[str, int] = {}
        self._metrics_written = MetricTally.from_row(self.conn.execute("SELECT * FROM metric_totals").fetchone()[1:])
        """What metric_totals holds, committed: the counts of allocations ended and flushed."""
        self._metrics_pending = _tally_rows(self.conn, "id IN (SELECT allocation_id FROM usage_unflushed)")
        """What committed ends add that metric_totals does not hold yet (written at the next flush)."""
        self._metrics = MetricTally()
        """The counters, committed."""
        self._metrics.merge(self._metrics_written)
        self._metrics.merge(self._metrics_pending)
        self._metrics.merge(_tally_rows(self.conn, "state IN ('queued', 'active')"))
        self._metrics_open = MetricTally()
        """The open transaction's grants and ends."""
        self._metrics_ended_open = MetricTally()
        """What the open transaction's ends add, not yet written by a flush."""
        self._metrics_writing: MetricTally | None = None
        """What the open transaction's flush wrote into metric_totals (its whole row), and the pending tally it
        took (kept again if it rolls back)."""
        self._metrics_took: MetricTally | None = None

    def _commits_recovery_dropped(self, frames: list[tuple[int, bool]]) -> int:
        """How many commit frames of the -wal's current generation lie past what SQLite's recovery kept.

        SQLite drops a WAL from its first frame that fails its checksum on, silently (its log callback is not
        reachable from Python). The frames it kept are `mxFrame`, which a PASSIVE checkpoint reports. A commit
        frame past it is a transaction that was committed and is gone, unless it is the only one and the file's
        very last frame: a commit torn by a crash of the host (never acknowledged: its fsync did not return).
        """
        row = self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        kept = int(row[1]) if row is not None else -1
        if kept < 0:
            return 0
        dropped = [number for number, commit in frames if commit and number > kept]
        return 0 if dropped == [frames[-1][0]] else len(dropped)

    def _migrate(self) -> None:
        if self._applied_migrations() >= {m.__name__ for m in MIGRATIONS}:
            return  # nothing to do: skip importing sqlite_utils (~5 MiB of RSS and ~60 ms of start-up)
        if self.path != ":memory:" and self.migrate_in_child:
            # A short-lived child applies them, so the long-running daemon never carries sqlite-utils.
            child = subprocess.Popen([sys.executable, "-m", "mcpresd.store", self.path], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
            from mcpresd.samplers.usage import read_stat  # only while migrating in a child

            def cpu_ticks() -> int | None:
                stat = read_stat(child.pid)
                return None if stat is None else stat.cpu_ticks

            started = time.monotonic()
            used = cpu_ticks()
            while True:
                try:
                    _, stderr = child.communicate(timeout=MIGRATION_HEARTBEAT_S)
                    break
                except subprocess.TimeoutExpired:  # communicate() again loses no output
                    now_used = cpu_ticks()
                    if Store.migration_heartbeat is not None:
                        Store.migration_heartbeat(time.monotonic() - started, now_used is None or now_used != used)
                    used = now_used
            if child.returncode != 0:
                lines = stderr.strip().splitlines() or [f"exit status {child.returncode}"]
                failure = MigrationFailed(f"migrating {self.path} failed: {lines[-1]}")
                failure.sqlite_errorcode = child.returncode
                raise failure
            return
        apply_migrations(self.conn)

    def _applied_migrations(self) -> set[str]:
        try:
            rows = self.conn.execute(
                "SELECT name FROM _sqlite_migrations WHERE migration_set = ?", (MIGRATIONS_NAME,)
            ).fetchall()
        except sqlite3.OperationalError:
            return set()
        return {row[0] for row in rows}

    def _load_counts(self) -> dict[str, int]:
        """Live allocations counted (few, by their index); ended ones as last written, plus those ended since."""
        counts = {state.value: 0 for state in AllocationState}
        for state, count in self.conn.execute("SELECT state, count FROM allocation_counts"
                                              " WHERE state IN ('released', 'withdrawn')"):
            counts[state] = count
        for state, count in self.conn.execute(
                "SELECT state, count(*) FROM allocations WHERE state IN ('queued', 'active') GROUP BY state"
                " UNION ALL SELECT state, count(*) FROM allocations"
                " WHERE id IN (SELECT allocation_id FROM usage_unflushed) GROUP BY state"):
            counts[state] += count
        return counts

    def _count(self, state: str, change: int) -> None:
        self._counts_open[state] = self._counts_open.get(state, 0) + change

    def close(self) -> None:
        if self._usage_kept and self.gone is None:
            try:
                with self.transaction():
                    self.flush_usage()
            except (sqlite3.Error, StorageError):
                pass  # still in usage_unflushed: the next start sums it again
        self.conn.close()

    # -- transactions -----------------------------------------------------

    def begin(self) -> None:
        if self.gone is not None:
            raise DatabaseGone(self.gone)
        self.conn.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.conn.execute("COMMIT")
        if self._usage_open:
            self._usage_kept.merge(self._usage_open)
            self._usage_open = UsageFold()
        if self._usage_writing:
            self._usage_writing = UsageFold()
        if self._counts_open:
            for state, change in self._counts_open.items():
                self._counts[state] += change
            self._counts_open = {}
        if self._metrics_open:
            self._metrics.merge(self._metrics_open)
            self._metrics_open = MetricTally()
        if self._metrics_ended_open:
            self._metrics_pending.merge(self._metrics_ended_open)
            self._metrics_ended_open = MetricTally()
        if self._metrics_writing is not None:
            self._metrics_written = self._metrics_writing
            self._metrics_writing = self._metrics_took = None
        self.verify_files()
        if self._newest_event != self.mark:
            self.mark = self._newest_event
            if self.lock is not None:
                self.lock.record(self.mark)

    def _note_wal(self) -> None:
        try:
            info = os.lstat(self.path + "-wal")
        except FileNotFoundError:
            return
        self._files[self.path + "-wal"] = (info.st_dev, info.st_ino)

    def verify_files(self) -> None:
        """Raise DatabaseGone (now and for every later transaction) if a path no longer names its open file."""
        if self.gone is not None:
            raise DatabaseGone(self.gone)
        if not self._files:
            return
        if len(self._files) == 1:
            self._note_wal()  # SQLite had not made the -wal yet when the store opened
        for path, identity in self._files.items():
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                self._lost(path, "no longer exists")
            else:
                if (info.st_dev, info.st_ino) != identity:
                    self._lost(path, "now names another file")
        if self.lock is not None and not self.lock.still_named():
            self._lost(self.lock.path, "no longer names the lock this daemon holds",
                       "another daemon could open the database beside this one")

    def _lost(self, path: str, what: str, why: str = "the database was deleted or replaced while the daemon ran") \
            -> None:
        self.gone = (f"{path} {what}: {why}; writes are no longer acknowledged and the daemon stops (its "
                     f"supervisor restarts it; to restore a backup while it is stopped: `{restore_recipe(self.path)}`)")
        raise DatabaseGone(self.gone)

    def fit_wal_to_disk(self) -> int:
        """Checkpoint every WAL_CHECKPOINT_PAGES pages where the disk has room for WAL_ROOM_FACTOR such WALs, at
        SQLite's default otherwise; the daemon calls it each sampling round. Returns the pages now in force.

        When the mark falls under the WAL's size, the next COMMIT checkpoints it and the WAL starts over.
        """
        pages = WAL_CHECKPOINT_PAGES
        if self.path != ":memory:":
            try:
                disk = os.statvfs(Path(self.path).parent)
                page_size = int(self.conn.execute("PRAGMA page_size").fetchone()[0])
                if disk.f_bavail * disk.f_frsize < WAL_ROOM_FACTOR * WAL_CHECKPOINT_PAGES * page_size:
                    pages = WAL_SMALL_DISK_PAGES
            except (OSError, sqlite3.Error):
                pages = WAL_SMALL_DISK_PAGES
        if pages != self._wal_pages:
            self.conn.execute(f"PRAGMA wal_autocheckpoint={pages}")
            self._wal_pages = pages
        return pages

    def rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
        self._newest_event = self.mark
        self._usage_open = UsageFold()
        if self._usage_writing:
            self._usage_kept.merge(self._usage_writing)
            self._usage_writing = UsageFold()
        self._counts_open = {}
        self._metrics_open = MetricTally()
        self._metrics_ended_open = MetricTally()
        if self._metrics_took is not None:
            self._metrics_pending.merge(self._metrics_took)
            self._metrics_writing = self._metrics_took = None
        self.verify_files()  # a failed write may be the first sign of a lost file; nothing may rebuild over one

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.begin()
        try:
            yield
        except BaseException:
            self.rollback()
            raise
        self.commit()

    # -- resources --------------------------------------------------------

    def load_resources(self) -> list[Resource]:
        rows = self.conn.execute(
            "SELECT name, type, capacity, unit, labels, uuid, cost_per_unit_hour, source FROM resources"
        ).fetchall()
        return [
            Resource(
                name=name,
                type=ResourceType(kind),
                capacity=capacity,
                unit=unit,
                labels=json.loads(labels),
                uuid=uuid,
                cost_per_unit_hour=cost,
                source=source,
            )
            for name, kind, capacity, unit, labels, uuid, cost, source in rows
        ]

    def insert_resource(self, resource: Resource, now: float) -> None:
        self.conn.execute(
            "INSERT INTO resources (name, type, capacity, unit, labels, uuid, cost_per_unit_hour, source, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*_resource_row(resource), now),
        )

    def insert_resources(self, resources: Iterable[Resource], now: float) -> None:
        """In order. A run of resources alike but for their names goes in one statement (see RUN_BY_NAME)."""
        columns = ("INSERT INTO resources (name, type, capacity, unit, labels, uuid, cost_per_unit_hour, source,"
                   " created_at)")
        by_name = ("INSERT INTO resources (rowid, name, type, capacity, unit, labels, uuid, cost_per_unit_hour, source,"
                   " created_at) SELECT ? + key, value, ?, ?, ?, '{}', NULL, ?, ?, ? FROM json_each(?)")
        rows: list[tuple[Any, ...]] = []
        for shape, run in itertools.groupby(resources, _shape):
            alike = list(run)
            if shape is None or len(alike) < RUN_BY_NAME:
                # The row built inline, not by _resource_row: a call and a tuple unpacked per row were a third of
                # building them for 100,000 resources.
                rows.extend((r.name, r.type.value, r.capacity, r.unit, _compact(dict(r.labels)) if r.labels else "{}",
                             r.uuid, r.cost_per_unit_hour, r.source, now) for r in alike)
            else:
                _insert_rows(self.conn, columns, rows)
                rows = []
                self.conn.execute(by_name, (self._next_rowid("resources"), *shape, now,
                                            _names([r.name for r in alike])))
        _insert_rows(self.conn, columns, rows)

    def _next_rowid(self, table: str) -> int:
        """The rowid SQLite would give the next row of `table` (one past the largest: none is ever near 2**63)."""
        return int(self.conn.execute(f"SELECT coalesce(max(rowid), 0) + 1 FROM {table}").fetchone()[0])

    def update_resource(self, resource: Resource) -> None:
        self.conn.execute(
            "UPDATE resources SET type = ?, capacity = ?, unit = ?, labels = ?, uuid = ?,"
            " cost_per_unit_hour = ?, source = ? WHERE name = ?",
            (*_resource_row(resource)[1:], resource.name),
        )

    def delete_resource(self, name: str) -> None:
        self.conn.execute("DELETE FROM resources WHERE name = ?", (name,))

    # -- allocations ------------------------------------------------------

    def insert_allocation(self, allocation: Allocation, request_digest: str | None = None) -> None:
        self.conn.execute(
            f"INSERT INTO allocations ({_COLUMNS}, request_digest) VALUES ({_MARKS}, ?)",
            (*_row(allocation), request_digest),
        )
        self._count(allocation.state.value, 1)
        if allocation.state is AllocationState.ACTIVE and allocation.granted_at is not None:
            self._metrics_open.grant(allocation.created_at, allocation.granted_at)
        if allocation.released_at is not None:  # inserted ended (an import): not in usage_unflushed, so written now
            self.conn.execute("UPDATE allocation_counts SET count = count + 1 WHERE state = ?",
                              (allocation.state.value,))
        if allocation.items:
            self.insert_items(allocation.id, allocation.items)

    def insert_items(self, allocation_id: str, items: tuple[AllocationItem, ...]) -> None:
        self.conn.executemany(
            "INSERT INTO allocation_items (allocation_id, resource, amount) VALUES (?, ?, ?)",
            [(allocation_id, item.resource, item.amount) for item in items],
        )

    def mark_ended(self, allocation: Allocation) -> None:
        """Record a release or withdrawal (`allocation` is the ended value)."""
        self.conn.execute(
            "UPDATE allocations SET state = ?, released_at = ?, release_reason = ?, preempt_at = NULL, measured = ?"
            " WHERE id = ?",
            (allocation.state.value, allocation.released_at, allocation.release_reason,
             None if allocation.measured is None else _compact(dict(allocation.measured)), allocation.id),
        )
        self._count("active" if allocation.granted_at is not None else "queued", -1)
        self._count(allocation.state.value, 1)
        self._metrics_open.end(allocation.state.value, allocation.release_reason)
        self._metrics_ended_open.ended(allocation)

    def mark_granted(self, allocation: Allocation) -> None:
        """Record a queued request's grant (`allocation` is the granted value)."""
        self.conn.execute(
            "UPDATE allocations SET state = 'active', granted_at = ?, expires_at = ?, wait_until = NULL, charges = ?"
            " WHERE id = ?",
            (allocation.granted_at, allocation.expires_at,
             _charges_json(allocation.charges) if allocation.charges else None, allocation.id),
        )
        self._count("queued", -1)
        self._count("active", 1)
        if allocation.granted_at is not None:
            self._metrics_open.grant(allocation.created_at, allocation.granted_at)
        self.insert_items(allocation.id, allocation.items)

    def update_lease(self, allocation: Allocation) -> None:
        """Record a changed TTL, expiry, preemption deadline or holder."""
        self.conn.execute(
            "UPDATE allocations SET ttl_s = ?, expires_at = ?, preempt_at = ?, holder_kind = ?, holder_pid = ?,"
            " holder_start = ? WHERE id = ?",
            (allocation.ttl_s, allocation.expires_at, allocation.preempt_at, allocation.holder_kind.value,
             allocation.holder_pid, allocation.holder_start, allocation.id),
        )

    def last_allocation_id(self) -> str | None:
        row = self.conn.execute("SELECT max(id) FROM allocations").fetchone()
        return None if row is None else row[0]

    def request_digest(self, allocation_id: str) -> str | None:
        row = self.conn.execute("SELECT request_digest FROM allocations WHERE id = ?", (allocation_id,)).fetchone()
        return None if row is None else row[0]

    def get_allocation(self, allocation_id: str) -> Allocation | None:
        rows = self._select_allocations("WHERE id = ?", (allocation_id,))
        return rows[0] if rows else None

    def find_by_key(self, owner_uid: int, key: str) -> Allocation | None:
        rows = self._select_allocations("WHERE owner_uid = ? AND idempotency_key = ?", (owner_uid, key))
        return rows[0] if rows else None

    def load_live(self) -> list[Allocation]:
        """Queued and active allocations."""
        return self._select_allocations("WHERE state IN ('queued', 'active') ORDER BY id", ())

    def list_allocations(self, state: str | None, limit: int, before_id: str | None = None) -> list[Allocation]:
        """The newest `limit` allocations (in `state`; older than `before_id`), newest first."""
        where = "WHERE id < ?" if before_id is not None else "WHERE 1"
        args: tuple[Any, ...] = () if before_id is None else (before_id,)
        source = "allocations"
        if state is not None:
            # The state as a literal, which a partial index needs; the live and the withdrawn ones through their
            # index by name (the planner, without statistics, would read the whole table by id for a few).
            state = AllocationState(state).value
            source, term = _LISTED_BY.get(state, (source, ""))
            where += f"{term} AND state = '{state}'"
        return self._select_allocations(f"{where} ORDER BY id DESC LIMIT ?", (*args, limit), source)

    def count_allocations(self) -> dict[str, int]:
        """Allocations by state, as the open transaction sees them (kept in memory, see _load_counts)."""
        return {state: count + self._counts_open.get(state, 0) for state, count in self._counts.items()}

    def _write_counts(self) -> None:
        """The counts into allocation_counts: with usage_unflushed emptied, what a start reads back."""
        self.conn.executemany("UPDATE allocation_counts SET count = ? WHERE state = ?",
                              [(count, state) for state, count in self.count_allocations().items()])

    def metric_counters(self) -> tuple[dict[str, float], list[tuple[float, int]]]:
        """The counters as the open transaction sees them (kept in memory, see MetricTally), and the wait-time
        histogram: (upper bound, grants that waited at most that long), cumulative, +Inf last."""
        tally = MetricTally()
        tally.merge(self._metrics)
        tally.merge(self._metrics_open)
        row = tally.row()
        counters = {"grants": row[0], "releases": row[1], "withdrawals": row[2], "timeouts": row[3],
                    "wait_sum": row[4]}
        return counters, [*zip(WAIT_BOUNDS, row[5:]), (math.inf, row[0])]

    def _write_metrics(self) -> None:
        """What the ends since the last flush add into metric_totals (with usage_unflushed emptied)."""
        if not self._metrics_pending and not self._metrics_ended_open:
            return
        written = MetricTally()
        written.merge(self._metrics_written if self._metrics_writing is None else self._metrics_writing)
        written.merge(self._metrics_pending)
        written.merge(self._metrics_ended_open)
        self.conn.execute(_WRITE_METRICS, written.row())
        if self._metrics_took is None:
            self._metrics_took = MetricTally()
        self._metrics_took.merge(self._metrics_pending)
        self._metrics_writing = written
        self._metrics_pending = MetricTally()
        self._metrics_ended_open = MetricTally()

    def _select_allocations(self, where: str, args: tuple[Any, ...], source: str = "allocations") -> list[Allocation]:
        rows = self.conn.execute(f"SELECT {_COLUMNS} FROM {source} {where}", args).fetchall()
        if not rows:
            return []
        items: dict[str, list[AllocationItem]] = {row[0]: [] for row in rows}
        ids = list(items)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for allocation_id, resource, amount in self.conn.execute(
                f"SELECT allocation_id, resource, amount FROM allocation_items WHERE allocation_id IN ({marks})",
                chunk,
            ):
                items[allocation_id].append(AllocationItem(resource, amount))
        return [_allocation(row, tuple(items[row[0]])) for row in rows]

    def add_usage(self, record: UsageRecord, sign: int = 1) -> None:
        """Add (sign 1) or take back (-1) an ended record's usage in usage_hours now."""
        if sign < 0:
            self.flush_usage()  # what is taken back must be there, its spans included
        add_usage(self.conn, record, sign)

    def end_usage(self, record: UsageRecord) -> None:
        """An allocation ended (in the open transaction): sum its usage in memory, written at the next flush."""
        self.conn.execute("INSERT INTO usage_unflushed (allocation_id) VALUES (?)", (record.allocation_id,))
        self._usage_open.add(record)

    def flush_usage(self) -> None:
        """Write the usage summed in memory into usage_hours (in the open transaction, else in one of its own)."""
        if not self._usage_kept and not self._usage_open:
            return
        if not self.conn.in_transaction:
            with self.transaction():
                self.flush_usage()
            return
        fold = UsageFold()
        fold.merge(self._usage_kept)
        fold.merge(self._usage_open)
        fold.write(self.conn)
        self.conn.execute("DELETE FROM usage_unflushed")
        self._write_counts()
        self._write_metrics()
        self._usage_writing.merge(self._usage_kept)
        self._usage_kept = UsageFold()
        self._usage_open = UsageFold()

    def usage_totals(self, by: str, from_hour: float, owner_uid: int | None = None, key: str | None = None,
                     *, through_hour: float | None = None) -> list[tuple[Any, ...]]:
        """Summed hourly usage by key and kind: every hour from `from_hour` on, or only what was held through
        the whole of `through_hour`. Each row: key, kind, allocations, waited, cost, resource_hours, requested,
        measured."""
        self.flush_usage()
        kept, key_of = ("tool", "CAST(owner_uid AS TEXT)") if by == "owner" else (by, "key")
        if by == "owner" and key is not None:
            owner_uid, key = int(key), None
        where = "grouping = ?"
        args: list[Any] = [kept]
        spans = "grouping = ?"
        span_args: list[Any] = [kept]
        if through_hour is None:
            where += " AND hour >= ?"
            args.append(from_hour)
            spans += " AND end_hour > ?"
            span_args.append(from_hour)
            hours = "(end_hour - max(first_hour, ?)) / 3600.0"
            hours_args: list[Any] = [from_hour]
        else:
            where += " AND hour >= ? AND hour <= ? AND through = 1"
            args += [through_hour, through_hour]
            spans += " AND end_hour > ? AND first_hour <= ?"
            span_args += [through_hour, through_hour]
            hours, hours_args = "1.0", []
        for column, value in (("owner_uid", owner_uid), ("key", key)):
            if value is not None:
                where += f" AND {column} = ?"
                args.append(value)
                spans += f" AND {column} = ?"
                span_args.append(value)
        return self.conn.execute(
            f"SELECT {key_of} AS shown, kind, sum(allocations), sum(waited), sum(cost), sum(resource_hours),"
            f" sum(requested), sum(measured) FROM usage_hours WHERE {where} GROUP BY shown, kind"
            f" UNION ALL SELECT {key_of} AS shown, kind, 0, 0.0, sum(cost * n), sum(resource_hours * n),"
            f" sum(requested * n), sum(measured * n) FROM (SELECT *, {hours} AS n FROM usage_spans WHERE {spans})"
            " GROUP BY shown, kind", [*args, *hours_args, *span_args]).fetchall()

    def ended_within_hour(self, hour: float, end: float) -> list[UsageRecord]:
        """Ended allocations granted or ended in [hour, end) (end within the hour): those not held through it."""
        rows = self.conn.execute(
            f"SELECT {_RECORD_COLUMNS} FROM allocations WHERE released_at >= ? AND released_at < ?"
            f" UNION SELECT {_RECORD_COLUMNS} FROM allocations"
            " WHERE granted_at > ? AND granted_at < ? AND released_at IS NOT NULL",
            (hour, end, hour, end)).fetchall()
        return [usage_record(row) for row in rows]

    def prune_ended_allocations(self, before: float, limit: int) -> int:
        """Delete up to `limit` allocations that ended before `before`, oldest first (their usage stays in
        usage_hours)."""
        self.flush_usage()
        rows = self.conn.execute(
            "SELECT id, state FROM allocations WHERE released_at < ? ORDER BY released_at LIMIT ?",
            (before, limit)).fetchall()
        if rows:
            ids = [row[0] for row in rows]
            marks = ",".join("?" * len(ids))
            self.conn.execute(f"DELETE FROM allocation_items WHERE allocation_id IN ({marks})", ids)
            self.conn.execute(f"DELETE FROM allocations WHERE id IN ({marks})", ids)
            for _, state in rows:
                self._count(state, -1)
            self._write_counts()
        return len(rows)

    def forget_key(self, allocation_id: str) -> None:
        """An expired idempotency key: the ended allocation keeps no key, and the key can be used again."""
        self.conn.execute("UPDATE allocations SET idempotency_key = NULL, request_digest = NULL WHERE id = ?",
                          (allocation_id,))

    def set_measured(self, allocation_id: str, measured: Any) -> None:
        self.conn.execute("UPDATE allocations SET measured = ? WHERE id = ?", (_compact(dict(measured)), allocation_id))

    def ended_since(self, since: float, tool_id: str | None = None) -> list[Allocation]:
        """Allocations that ended at or after `since` (for accounting and budgets), oldest first."""
        if tool_id is None:
            return self._select_allocations("WHERE released_at >= ? ORDER BY released_at", (since,))
        return self._select_allocations("WHERE tool_id = ? AND released_at >= ? ORDER BY released_at",
                                        (tool_id, since))

    def recent_runs(self, tool_id: str, limit: int, owner_uid: int | None = None) -> list[Allocation]:
        """The newest released allocations of a tool that carry measurements, newest first; only `owner_uid`'s
        if given."""
        owned, args = ("", (tool_id, limit)) if owner_uid is None else \
            (" AND owner_uid = ?", (tool_id, owner_uid, limit))
        return self._select_allocations(
            "WHERE tool_id = ? AND state = 'released' AND measured IS NOT NULL AND granted_at IS NOT NULL" + owned +
            " ORDER BY released_at DESC LIMIT ?", args)

    # -- pools and budgets ----------------------------------------------------

    def load_pools(self) -> list[tuple[Any, ...]]:
        return self.conn.execute(
            "SELECT name, spec, state, source, created_at, last_scaled_at, failures, paused_until, next_index"
            " FROM pools ORDER BY created_at, name").fetchall()

    def save_pool(self, row: tuple[Any, ...]) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO pools (name, spec, state, source, created_at, last_scaled_at, failures,"
            " paused_until, next_index) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)

    def delete_pool(self, name: str) -> None:
        self.conn.execute("DELETE FROM pool_members WHERE pool = ?", (name,))
        self.conn.execute("DELETE FROM pools WHERE name = ?", (name,))

    def load_members(self) -> list[tuple[Any, ...]]:
        return self.conn.execute(
            "SELECT resource, pool, parent, parent_amount, handle, draining, created_at FROM pool_members"
            " ORDER BY created_at, resource").fetchall()

    def save_member(self, row: tuple[Any, ...]) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO pool_members (resource, pool, parent, parent_amount, handle, draining, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)", row)

    def delete_member(self, resource: str) -> None:
        self.conn.execute("DELETE FROM pool_members WHERE resource = ?", (resource,))

    def load_budgets(self) -> list[tuple[Any, ...]]:
        return self.conn.execute('SELECT scope, subject, period, "limit", soft FROM budgets'
                                 " ORDER BY scope, subject, period").fetchall()

    def save_budget(self, row: tuple[Any, ...], now: float) -> None:
        self.conn.execute('INSERT OR REPLACE INTO budgets (scope, subject, period, "limit", soft, created_at)'
                          " VALUES (?, ?, ?, ?, ?, ?)", (*row, now))

    def delete_budget(self, scope: str, subject: str, period: str) -> bool:
        cursor = self.conn.execute("DELETE FROM budgets WHERE scope = ? AND subject = ? AND period = ?",
                                   (scope, subject, period))
        return cursor.rowcount > 0

    def set_cost(self, name: str, cost: float | None) -> None:
        self.conn.execute("UPDATE resources SET cost_per_unit_hour = ? WHERE name = ?", (cost, name))

    # -- events -----------------------------------------------------------

    def insert_event(
        self,
        now: float,
        kind: str,
        *,
        allocation_id: str | None = None,
        resource: str | None = None,
        uid: int | None = None,
        detail: dict[str, Any] | None = None,
    ) -> int:
        cursor = self.conn.execute(
            "INSERT INTO events (ts, kind, allocation_id, resource, uid, detail) VALUES (?, ?, ?, ?, ?, ?)",
            (now, kind, allocation_id, resource, uid, _compact(detail) if detail else "{}"),
        )
        self._newest_event = int(cursor.lastrowid or 0)
        return self._newest_event

    def insert_events(self, now: float, kind: str, rows: list[tuple[str | None, dict[str, Any]]],
                      uid: int | None = None) -> range:
        """Events of one kind at one time, one per (resource, detail) row in order, none for an allocation; their
        ids. Rows that share one detail object share its JSON, encoded once, and a run of them goes in one
        statement (see RUN_BY_NAME)."""
        columns = "INSERT INTO events (ts, kind, resource, uid, detail)"
        by_name = ("INSERT INTO events (id, ts, kind, resource, uid, detail)"
                   " SELECT ? + key, ?, ?, value, ?, ? FROM json_each(?)")
        values: list[tuple[Any, ...]] = []
        texts: dict[int, str] = {}  # by id(): the rows hold each detail alive meanwhile
        for key, run in itertools.groupby(rows, lambda row: id(row[1])):
            alike = list(run)
            text = texts.get(key)
            if text is None:
                detail = alike[0][1]
                text = texts[key] = _compact(detail) if detail else "{}"
            if len(alike) < RUN_BY_NAME:
                values.extend((now, kind, resource, uid, text) for resource, _ in alike)
            else:
                _insert_rows(self.conn, columns, values)
                values = []
                self.conn.execute(by_name, (self._next_rowid("events"), now, kind, uid, text,
                                            _names([resource for resource, _ in alike])))
        _insert_rows(self.conn, columns, values)
        # This transaction wrote them all in order, each with the next rowid: the last is the newest.
        last = int(self.conn.execute("SELECT max(id) FROM events").fetchone()[0] or 0)
        self._newest_event = last
        return range(last - len(rows) + 1, last + 1)

    def prune_events(self, before: float, limit: int) -> int:
        """Delete those of the `limit` oldest events that happened before `before`, never the newest: event ids
        are rowids, and an emptied table would number the next event 1 again (subscribers resume by id, and
        the lock file's high-water mark would take the restart for lost commits)."""
        return int(self.conn.execute(
            "DELETE FROM events WHERE id IN (SELECT id FROM events ORDER BY id LIMIT ?) AND ts < ?"
            " AND id < (SELECT max(id) FROM events)",
            (limit, before)).rowcount)

    def last_event_id(self) -> int:
        row = self.conn.execute("SELECT max(id) FROM events").fetchone()
        return int(row[0] or 0)

    def list_events(self, after_id: int, limit: int, allocation_id: str | None = None,
                    pool: str | None = None) -> list[dict[str, Any]]:
        where = "WHERE id > ?"
        args: list[Any] = [after_id]
        if allocation_id is not None:
            where += " AND allocation_id = ?"
            args.append(allocation_id)
        if pool is not None:
            where += " AND kind LIKE 'pool.%' AND resource = ?"
            args.append(POOL_PREFIX + pool)
        # From a cursor: the oldest events after it (so a reader can page forward); else the newest ones.
        order = "ASC" if after_id else "DESC"
        rows = self.conn.execute(
            f"SELECT id, ts, kind, allocation_id, resource, uid, detail FROM events {where} ORDER BY id {order} LIMIT ?",
            (*args, limit),
        ).fetchall()
        if order == "ASC":
            rows.reverse()
        return [
            {
                "id": row[0],
                "ts": row[1],
                "kind": row[2],
                "allocation_id": row[3],
                "resource": row[4],
                "uid": row[5],
                "detail": json.loads(row[6]),
            }
            for row in reversed(rows)
        ]

    def backup(self, target: str, *, overwrite: bool = False) -> tuple[int, int]:
        """Copy the committed database to `target`; return its size in bytes and pages.

        Read through a second connection: this one may be inside a transaction whose writes are not committed
        (and may yet roll back). The copy is written to a temporary file beside `target`, synced, then renamed,
        so `target` is never a partial copy. Without `overwrite` an existing `target` is refused
        (FileExistsError), even one created while the copy was made.
        """
        directory = os.path.dirname(target) or "."
        if not overwrite and os.path.lexists(target):
            raise FileExistsError(f"{target} exists")
        handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=directory)
        os.close(handle)
        try:
            source = sqlite3.connect(self.path)
            try:
                copy = sqlite3.connect(temporary)
                try:
                    source.backup(copy)
                    copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
                    pages = int(copy.execute("PRAGMA page_count").fetchone()[0])
                finally:
                    copy.close()
            finally:
                source.close()
            _fsync(temporary)
            if overwrite:
                os.replace(temporary, target)
            else:
                _rename_no_replace(temporary, target)
            _fsync(directory)
        except BaseException:
            try:
                os.unlink(temporary)
            except FileNotFoundError:
                pass
            raise
        return os.stat(target).st_size, pages

    def integrity_ok(self) -> bool:
        try:
            return bool(self.conn.execute("PRAGMA quick_check").fetchone()[0] == "ok")
        except sqlite3.DatabaseError:
            return False


WAL_MAGIC = (0x377F0682, 0x377F0683)


def wal_frames(path: str) -> list[tuple[int, bool]]:
    """The frames of a -wal file's current generation (their salts match its header): (number from 1, is it a
    commit). Empty for no file, an empty or unrecognised one. Only the frame headers are read, no checksums."""
    try:
        handle = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return []
    try:
        size = os.fstat(handle).st_size
        header = os.pread(handle, 32, 0)
        if len(header) < 32:
            return []
        magic, _, page_size, _, salt1, salt2 = struct.unpack_from(">6I", header)
        if magic not in WAL_MAGIC or not 512 <= page_size <= 65536:
            return []
        frame = 24 + page_size
        frames = []
        for number, offset in enumerate(range(32, size - frame + 1, frame), start=1):
            _, commit, frame_salt1, frame_salt2 = struct.unpack(">4I", os.pread(handle, 16, offset))
            if (frame_salt1, frame_salt2) == (salt1, salt2):
                frames.append((number, commit != 0))
        return frames
    except (OSError, struct.error):
        return []
    finally:
        os.close(handle)


def _fsync(path: str) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _rename_no_replace(source: str, target: str) -> None:
    """Rename, failing with FileExistsError if `target` exists (a hard link is atomic about that)."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError:
        # No hard links on this file system: check, then rename (a narrow race, on an unusual setup).
        if os.path.lexists(target):
            raise FileExistsError(f"{target} exists") from None
        os.rename(source, target)
        return
    os.unlink(source)


_FIELDS = (
    "id", "state", "priority", "tool_id", "execution_id", "idempotency_key", "owner_uid", "requester_pid",
    "holder_pid", "holder_start", "created_at", "released_at", "release_reason", "request", "holder_kind",
    "granted_at", "wait_until", "ttl_s", "expires_at", "preemptible", "signal_holder", "preempt_at", "charges",
    "measured",
)
_COLUMNS = ", ".join(_FIELDS)
_MARKS = ", ".join("?" * len(_FIELDS))


def _row(a: Allocation) -> tuple[Any, ...]:
    return (
        a.id, a.state.value, a.priority.value, a.tool_id, a.execution_id, a.idempotency_key, a.owner_uid,
        a.requester_pid, a.holder_pid, a.holder_start, a.created_at, a.released_at, a.release_reason,
        None if a.request is None else _request_json(a.request), a.holder_kind.value, a.granted_at, a.wait_until,
        a.ttl_s, a.expires_at, int(a.preemptible), int(a.signal_holder), a.preempt_at,
        _charges_json(a.charges) if a.charges else None, None if a.measured is None else _compact(dict(a.measured)),
    )


def _allocation(row: tuple[Any, ...], items: tuple[AllocationItem, ...]) -> Allocation:
    return Allocation(
        id=row[0], state=AllocationState(row[1]), items=items, priority=Priority(row[2]), owner_uid=row[6],
        created_at=row[10], tool_id=row[3], execution_id=row[4], idempotency_key=row[5], requester_pid=row[7],
        holder_pid=row[8], holder_start=row[9], released_at=row[11], release_reason=row[12],
        request=None if row[13] is None else _request_from_json(row[13]), holder_kind=HolderKind(row[14]),
        granted_at=row[15], wait_until=row[16], ttl_s=row[17], expires_at=row[18], preemptible=bool(row[19]),
        signal_holder=bool(row[20]), preempt_at=row[21], charges=_charges_from_json(row[22]),
        measured=None if row[23] is None else json.loads(row[23]),
    )


_compact = compact_json_encoder(allow_nan=True)


def _charges_json(charges: tuple[Charge, ...]) -> str:
    return _compact([[c.resource, c.kind, c.amount, c.rate, c.pool] for c in charges])


def _charges_from_json(text: str | None) -> tuple[Charge, ...]:
    if text is None:
        return ()
    return tuple(Charge(resource, kind, amount, rate, pool) for resource, kind, amount, rate, pool in json.loads(text))


def _request_json(request: Request) -> str:
    return _compact({
        "demands": [[d.selector, d.amount, d.most] for d in request.demands],
        "strategy": request.strategy,
        "where": list(request.where),
        "max_cost": request.max_cost,
        **({"objective": request.objective} if request.objective else {}),
        **({"enforce": request.enforce} if request.enforce else {}),
        **({"keep_processes": True} if request.keep_processes else {}),
        **({"confine_holder": True} if request.confine_holder else {}),
    })


def _request_from_json(text: str) -> Request:
    data = json.loads(text)
    return Request(
        demands=tuple(Demand(selector, amount, most) for selector, amount, most in data["demands"]),
        strategy=data["strategy"],
        where=tuple(data["where"]),
        max_cost=data["max_cost"],
        objective=data.get("objective"),
        enforce=data.get("enforce"),
        keep_processes=data.get("keep_processes", False),
        confine_holder=data.get("confine_holder", False),
    )


ROWS_PER_INSERT = 100
"""Rows one INSERT statement carries in its VALUES list (see _insert_rows)."""
RUN_BY_NAME = 100
"""Consecutive rows alike but for their names, this many or more, go in one statement. A resources.add list's
rows differ by name alone (same type, capacity and unit, no labels), and so do their resource.added events:
one INSERT ... SELECT over json_each() of a JSON array of the names, the other values bound as parameters
(the numbers exactly, where json_each would parse them from text). Each row's rowid (an event's id) is given,
the next one plus its place in the list, as SQLite would number them inserted one by one: the list's order
whatever order json_each yields them in, without ORDER BY key's sort. 100,000 resources and their events: 466 ms
of CPU a hundred rows a statement, 275 by name with ORDER BY, about 200 with the rowids given."""
_names = json.JSONEncoder(ensure_ascii=False, check_circular=False, allow_nan=False).encode


def _shape(resource: Resource) -> tuple[str, float, str, float | None, str] | None:
    """What a resource's row holds besides its name and time, where that is the same for a run of them: no
    labels and no UUID (a GPU's)."""
    if resource.labels or resource.uuid is not None:
        return None
    return (resource.type.value, resource.capacity, resource.unit, resource.cost_per_unit_hour, resource.source)


def _insert_rows(conn: sqlite3.Connection, insert: str, rows: list[tuple[Any, ...]]) -> None:
    """`insert` ("INSERT INTO t (a, b)") of `rows` in order: ROWS_PER_INSERT rows a statement, the rest one by
    one. One statement a row (executemany) pays a statement's start, step and reset for each: 100,000
    resources and their events took 0.78 s of CPU that way, 0.40 a hundred rows a statement. A list's last
    rows (under a hundred) take the one-row statement, so that odd lengths fill no cache with statements."""
    if not rows:
        return
    one = "(" + ", ".join("?" * len(rows[0])) + ")"
    whole = len(rows) - len(rows) % ROWS_PER_INSERT
    if whole:
        many = f"{insert} VALUES {', '.join([one] * ROWS_PER_INSERT)}"
        chain = itertools.chain.from_iterable
        for start in range(0, whole, ROWS_PER_INSERT):
            conn.execute(many, list(chain(rows[start:start + ROWS_PER_INSERT])))
    if whole < len(rows):
        conn.executemany(f"{insert} VALUES {one}", rows[whole:])


def _resource_row(resource: Resource) -> tuple[Any, ...]:
    return (
        resource.name,
        resource.type.value,
        resource.capacity,
        resource.unit,
        _compact(dict(resource.labels)) if resource.labels else "{}",
        resource.uuid,
        resource.cost_per_unit_hour,
        resource.source,
    )



class MetricStore:
    """Metric samples, their 1-minute roll-ups and alerts, on the broker's connection (same thread, same transaction)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def insert_samples(self, rows: Iterable[tuple[str, str, float, float | None, str]]) -> None:
        self.conn.executemany("INSERT INTO samples (resource, metric, ts, value, status) VALUES (?, ?, ?, ?, ?)", rows)

    def samples(self, resource: str, metric: str, since: float) -> list[tuple[float, float | None, str]]:
        return self.conn.execute(
            "SELECT ts, value, status FROM samples WHERE resource = ? AND metric = ? AND ts >= ? ORDER BY ts",
            (resource, metric, since),
        ).fetchall()

    def newest_sample_ts(self) -> float | None:
        row = self.conn.execute("SELECT max(ts) FROM samples").fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def samples_between(self, start: float, end: float) -> list[tuple[str, str, float, float]]:
        return self.conn.execute(
            "SELECT resource, metric, ts, value FROM samples WHERE ts >= ? AND ts < ? AND status = 'ok'",
            (start, end),
        ).fetchall()

    def upsert_rollups(self, rows: Iterable[tuple[str, str, float, float, float, float, int]]) -> None:
        self.conn.executemany(
            "INSERT OR REPLACE INTO rollups (resource, metric, minute, min, max, avg, count) VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )

    def rollups(self, resource: str, metric: str, since: float) -> list[tuple[float, float, float, float, int]]:
        return self.conn.execute(
            "SELECT minute, min, max, avg, count FROM rollups WHERE resource = ? AND metric = ? AND minute >= ?"
            " ORDER BY minute",
            (resource, metric, since),
        ).fetchall()

    def metrics_of(self, resource: str) -> list[str]:
        return [row[0] for row in self.conn.execute(
            "SELECT DISTINCT metric FROM samples WHERE resource = ? ORDER BY metric", (resource,))]

    def retain(self, raw_cutoff: float, rollup_cutoff: float, points_per_metric: int) -> int:
        """Delete raw samples older than `raw_cutoff` or beyond the newest `points_per_metric`, and old roll-ups."""
        deleted = self.conn.execute("DELETE FROM samples WHERE ts < ?", (raw_cutoff,)).rowcount
        for resource, metric, count in self.conn.execute(
            "SELECT resource, metric, count(*) FROM samples GROUP BY resource, metric HAVING count(*) > ?",
            (points_per_metric,),
        ).fetchall():
            deleted += self.conn.execute(
                "DELETE FROM samples WHERE rowid IN (SELECT rowid FROM samples WHERE resource = ? AND metric = ?"
                " ORDER BY ts LIMIT ?)",
                (resource, metric, count - points_per_metric),
            ).rowcount
        deleted += self.conn.execute("DELETE FROM rollups WHERE minute < ?", (rollup_cutoff,)).rowcount
        return deleted

    def save_alert(self, row: dict[str, Any]) -> int:
        """Insert or update an alert; `row` carries its id once it has one."""
        columns = ("rule", "resource", "state", "level", "since", "fired_at", "resolved_at", "last_value", "min",
                   "max", "avg", "unknown", "allocations")
        values = [row[c] if c != "allocations" else json.dumps(row[c]) for c in columns]
        if row.get("id") is None:
            cursor = self.conn.execute(
                f"INSERT INTO alerts ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})", values)
            return int(cursor.lastrowid or 0)
        self.conn.execute(f"UPDATE alerts SET {', '.join(c + ' = ?' for c in columns)} WHERE id = ?",
                          (*values, row["id"]))
        return int(row["id"])

    def alerts(self, include_resolved: bool, limit: int = 1000) -> list[dict[str, Any]]:
        where = "" if include_resolved else "WHERE state != 'resolved'"
        cursor = self.conn.execute(f"SELECT * FROM alerts {where} ORDER BY id DESC LIMIT ?", (limit,))
        names = [d[0] for d in cursor.description]
        rows = []
        for row in cursor.fetchall():
            entry = dict(zip(names, row))
            entry["allocations"] = json.loads(entry["allocations"])
            entry["unknown"] = bool(entry["unknown"])
            rows.append(entry)
        return rows


def _main(argv: list[str]) -> int:
    """`python -m mcpresd.store DB`: apply pending migrations to DB (the daemon runs this in a child)."""
    if len(argv) != 1:
        print("usage: python -m mcpresd.store DATABASE", file=sys.stderr)
        return 2
    try:
        conn = sqlite3.connect(argv[0], isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            apply_migrations(conn)
        finally:
            conn.close()
    except sqlite3.Error as error:
        # One line for the daemon to pass on; the exit status is SQLite's primary result code.
        print(f"{error}", file=sys.stderr)
        return (getattr(error, "sqlite_errorcode", 0) & 0xFF) or 1
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))

