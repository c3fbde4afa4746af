"""The store: migrations are registered, applied once, and recorded by sqlite-utils."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from mcpresd.core.model import Resource
from mcpresd.protocol import ResourceType
from mcpresd.store import (MIGRATIONS, MIGRATIONS_NAME, WAL_CHECKPOINT_PAGES, WAL_SIZE_LIMIT, Store,
                           m009_metric_counters, m012_metric_counters_in_memory, m013_live_and_withdrawn_by_id)


def test_migrations_are_applied_once_and_recorded(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    Store(path).close()
    Store(path).close()
    rows = sqlite3.connect(path).execute(
        "SELECT name FROM _sqlite_migrations WHERE migration_set = ?", (MIGRATIONS_NAME,)).fetchall()
    assert [r[0] for r in rows] == [m.__name__ for m in MIGRATIONS]


def test_the_database_is_durable_wal_with_full_sync(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    store.close()


def test_the_wal_is_checkpointed_rarely_enough_to_stay_out_of_the_p99(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    assert store.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == WAL_CHECKPOINT_PAGES >= 4096
    assert store.conn.execute("PRAGMA journal_size_limit").fetchone()[0] == WAL_SIZE_LIMIT
    store.close()


def test_check_constraints_back_the_rules(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    for statement in (
        "INSERT INTO resources VALUES ('x', 'custom', 0, 'u', '{}', NULL, NULL, 'api', 0)",
        "INSERT INTO resources VALUES ('x', 'bogus', 1, 'u', '{}', NULL, NULL, 'api', 0)",
        "INSERT INTO resources VALUES ('x', 'custom', 1, 'u', '{}', NULL, NULL, 'elsewhere', 0)",
        "INSERT INTO resources VALUES ('x', 'custom', 1, 'u', 'not json', NULL, NULL, 'api', 0)",
        "INSERT INTO resources VALUES ('', 'custom', 1, 'u', '{}', NULL, NULL, 'api', 0)",
        "INSERT INTO resources VALUES ('x', 'custom', 1, 'u', '{}', NULL, -1, 'api', 0)",
        "INSERT INTO allocations (id, state, priority, owner_uid, created_at) VALUES ('a', 'active', 'urgent', 0, 0)",
        "INSERT INTO allocations (id, state, priority, owner_uid, created_at, released_at)"
        " VALUES ('a', 'active', 'low', 0, 0, 1)",
    ):
        try:
            store.conn.execute(statement)
        except sqlite3.IntegrityError:
            continue
        raise AssertionError(f"accepted: {statement}")
    store.close()


def _copy_while_open(store: Store, target: Path) -> Path:
    """The database and its -wal as a crash would leave them: copied while the store still has them open."""
    target.mkdir()
    copy = target / "state.db"
    for suffix in ("", "-wal"):
        copy.with_name(copy.name + suffix).write_bytes(Path(store.path + suffix).read_bytes())
    return copy


def test_commits_that_wal_recovery_drops_are_counted_but_not_an_intact_wal_or_a_torn_last_commit(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    commits = 200  # enough that the WAL's middle frame is an event commit, past the migrations' frames
    for n in range(commits):
        with store.transaction():
            store.insert_event(float(n), "test")
    intact = _copy_while_open(store, tmp_path / "intact")
    damaged = _copy_while_open(store, tmp_path / "damaged")
    torn = _copy_while_open(store, tmp_path / "torn")
    store.close()
    for copy, which in ((damaged, "middle"), (torn, "last")):
        wal = Path(f"{copy}-wal")
        data = bytearray(wal.read_bytes())
        page_size = int.from_bytes(data[8:12], "big")
        frames = (len(data) - 32) // (24 + page_size)
        frame = 32 + (frames // 2 if which == "middle" else frames - 1) * (24 + page_size)
        data[frame + 24 + 100] ^= 0xFF  # a byte of that frame's page: its checksum no longer matches
        wal.write_bytes(bytes(data))

    kept = Store(intact)
    assert (kept.wal_commits_dropped, kept.mark) == (0, commits)
    kept.close()
    lost = Store(damaged)
    assert lost.mark < commits  # SQLite dropped the damaged frame's transaction and every later one, silently
    assert lost.wal_commits_dropped == commits - lost.mark
    lost.close()
    # Only the last commit, in the file's last frame: what a host crash during a COMMIT leaves (never acknowledged).
    cut = Store(torn)
    assert (cut.wal_commits_dropped, cut.mark) == (0, commits - 1)
    cut.close()


def test_the_metric_counters_start_from_the_allocations_an_upgraded_database_holds(tmp_path: Path) -> None:
    from sqlite_utils import Database
    from sqlite_utils.migrations import Migrations

    path = tmp_path / "state.db"
    earlier = Migrations(MIGRATIONS_NAME)
    for migration in MIGRATIONS[:MIGRATIONS.index(m009_metric_counters)]:
        earlier()(migration)
    conn = sqlite3.connect(path)
    earlier.apply(Database(conn))
    rows = [  # id, state, created, granted, released, reason
        ("a", "active", 100.0, 100.0, None, None),  # granted at once
        ("b", "released", 100.0, 105.0, 200.0, "released"),  # waited 5 s
        ("c", "withdrawn", 100.0, None, 110.0, "timeout"),
        ("d", "withdrawn", 100.0, None, 120.0, "withdrawn"),
        ("e", "queued", 100.0, None, None, None),
    ]
    with conn:
        conn.executemany("INSERT INTO allocations (id, state, priority, owner_uid, created_at, granted_at, released_at,"
                         " release_reason) VALUES (?, ?, 'normal', 0, ?, ?, ?, ?)", rows)
    conn.close()

    store = Store(path)
    counters, buckets = store.metric_counters()
    store.close()

    assert counters == {"grants": 2, "releases": 1, "withdrawals": 2, "timeouts": 1, "wait_sum": 5.0}
    assert buckets[:4] == [(0.01, 1), (0.1, 1), (1.0, 1), (10.0, 2)]  # the one granted at once, then the 5 s wait
    assert buckets[-1] == (float("inf"), 2)
def test_the_resource_checks_rebuilt_as_ors_keep_every_row_and_rule(tmp_path: Path) -> None:
    from sqlite_utils import Database, Migrations

    path = tmp_path / "state.db"
    before = Migrations(MIGRATIONS_NAME)
    for migration in MIGRATIONS[:7]:
        before()(migration)
    conn = sqlite3.connect(path)
    before.apply(Database(conn))
    conn.execute("INSERT INTO resources VALUES ('licence', 'custom', 2, 'seats', '{\"a\":1}', NULL, 1.5, 'config', 7)")
    conn.execute("INSERT INTO resources VALUES ('gpu0', 'gpu', 1, 'gpus', '{}', 'GPU-1', NULL, 'discovered', 8)")
    conn.commit()
    conn.close()

    store = Store(path)
    rows = store.conn.execute("SELECT * FROM resources ORDER BY name").fetchall()
    assert rows == [("gpu0", "gpu", 1.0, "gpus", "{}", "GPU-1", None, "discovered", 8.0),
                    ("licence", "custom", 2.0, "seats", '{"a":1}', None, 1.5, "config", 7.0)]
    sql = store.conn.execute("SELECT sql FROM sqlite_master WHERE name = 'resources'").fetchone()[0]
    assert " IN (" not in sql
    for statement in ("INSERT INTO resources VALUES ('x', 'bogus', 1, 'u', '{}', NULL, NULL, 'api', 0)",
                      "INSERT INTO resources VALUES ('gpu1', 'gpu', 1, 'u', '{}', 'GPU-1', NULL, 'api', 0)"):
        try:
            store.conn.execute(statement)
        except sqlite3.IntegrityError:
            continue
        raise AssertionError(f"accepted: {statement}")
    store.close()


def test_an_upgrade_from_the_counting_triggers_counts_each_allocation_once(tmp_path: Path) -> None:
    """m012 drops m009's triggers: metric_totals keeps what the flushed ended allocations add, and a start adds the
    live ones and those ended since the last flush (usage_unflushed) from their rows."""
    from sqlite_utils import Database
    from sqlite_utils.migrations import Migrations

    path = tmp_path / "state.db"
    earlier = Migrations(MIGRATIONS_NAME)
    for migration in MIGRATIONS[:MIGRATIONS.index(m012_metric_counters_in_memory)]:
        earlier()(migration)
    conn = sqlite3.connect(path)
    earlier.apply(Database(conn))
    with conn:  # as the daemon wrote them, with the triggers counting
        conn.executemany("INSERT INTO allocations (id, state, priority, owner_uid, created_at, granted_at)"
                         " VALUES (?, ?, 'normal', 0, 100.0, ?)",
                         [("a", "active", 100.0), ("b", "active", 130.0), ("c", "queued", None),
                          ("d", "queued", None)])
        conn.execute("UPDATE allocations SET state = 'released', released_at = 200.0, release_reason = 'released'"
                     " WHERE id = 'b'")
        conn.execute("UPDATE allocations SET state = 'withdrawn', released_at = 200.0, release_reason = 'timeout'"
                     " WHERE id = 'c'")
        conn.execute("INSERT INTO usage_unflushed VALUES ('c')")  # b was flushed, c not yet
    conn.close()

    store = Store(path)
    counters, buckets = store.metric_counters()
    written = store.conn.execute("SELECT grants, releases, withdrawals, timeouts, wait_sum FROM metric_totals"
                                 ).fetchone()
    triggers = store.conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'trigger'").fetchone()[0]
    store.close()
    again = Store(path)
    assert again.metric_counters() == (counters, buckets)
    again.close()

    assert counters == {"grants": 2, "releases": 1, "withdrawals": 1, "timeouts": 1, "wait_sum": 30.0}
    assert buckets[:4] == [(0.01, 1), (0.1, 1), (1.0, 1), (10.0, 1)] and buckets[-1] == (float("inf"), 2)
    assert written == (1, 1, 0, 0, 30.0) and triggers == 0  # b only; the rest from the rows at each start


@pytest.mark.parametrize("count", [1, 99, 100, 101, 250, 1000])
def test_resources_and_events_inserted_in_bulk_land_whole_in_order_with_consecutive_ids(tmp_path: Path,
                                                                                        count: int) -> None:
    store = Store(tmp_path / "state.db")
    store.begin()
    store.insert_event(1.0, "resource.added", resource="before")
    resources = [Resource(name=f"r{i}", type=ResourceType.CUSTOM, capacity=i + 0.5, unit="seats",
                          labels={"rack": "a"} if i % 7 == 0 else {}, cost_per_unit_hour=None if i % 3 else 2.0)
                 for i in range(count)]
    store.insert_resources(resources, 2.0)
    details = [{"capacity": 1.0, "unit": "seats"}, {"capacity": 2.0, "unit": "GiB"}]
    ids = store.insert_events(3.0, "resource.added", [(r.name, details[i % 2]) for i, r in enumerate(resources)],
                              uid=7)
    store.commit()
    assert store.conn.execute("SELECT count(*) FROM resources").fetchone()[0] == count
    assert sorted(store.load_resources(), key=lambda r: int(r.name[1:])) == resources
    rows = store.conn.execute("SELECT id, ts, kind, allocation_id, resource, uid, detail FROM events"
                              " WHERE resource != 'before' ORDER BY id").fetchall()
    assert [row[0] for row in rows] == list(ids) == list(range(2, count + 2))
    assert [(row[4], json.loads(row[6])) for row in rows] == [(r.name, details[i % 2]) for i, r in enumerate(resources)]
    assert {(row[1], row[2], row[3], row[5]) for row in rows} == {(3.0, "resource.added", None, 7)}
    store.close()


TRICKY = ['qu"ote', "back\\slash", "emoji-\U0001F600", "cjk-資源", "sep-\u2028", "nbsp\u00a0x", "tab-like-\u0085",
          "[1]", "null", "{}", "é-combining-e\u0301"]


def test_runs_alike_but_for_their_names_land_exact_in_order(tmp_path: Path) -> None:
    """Runs of resources and events that differ only by name go in one statement each: the same rows as one by one."""
    def run(prefix: str, count: int, capacity: float, **fields: Any) -> list[Resource]:
        return [Resource(name=f"{prefix}{i}", type=ResourceType.CUSTOM, capacity=capacity, unit="seats", **fields)
                for i in range(count)]
    resources = (run("a", 150, 0.1 + 0.2)
                 + [Resource(name=f"{n}-{i}", type=ResourceType.CUSTOM, capacity=2.0 ** 63, unit="u",
                             cost_per_unit_hour=1 / 3) for i in range(10) for n in TRICKY]
                 + run("l", 3, 1.0, labels={"index": 2}) + run("b", 99, 1e-9) + run("c", 250, 7.0, source="pool")
                 + [Resource(name="gpu", type=ResourceType.GPU, capacity=1.0, unit="gpus", uuid="GPU-1")]
                 + run("d", 100, 4.0))
    store = Store(tmp_path / "state.db")
    store.begin()
    store.insert_resources(resources, 2.5)
    one, other = {"capacity": 1.0, "unit": "seats"}, {"why": 'a "quoted" \\ detail'}
    rows: list[tuple[str | None, dict[str, Any]]] = [(r.name, one if i < 300 or i > 400 else other)
                                                     for i, r in enumerate(resources)]
    rows[350] = (None, other)
    ids = store.insert_events(3.0, "resource.added", rows, uid=None)
    store.commit()

    stored = store.conn.execute("SELECT name, type, capacity, unit, labels, uuid, cost_per_unit_hour, source,"
                                " created_at FROM resources ORDER BY rowid").fetchall()
    assert stored == [(r.name, r.type.value, r.capacity, r.unit, json.dumps(dict(r.labels), separators=(",", ":"))
                       if r.labels else "{}", r.uuid, r.cost_per_unit_hour, r.source, 2.5) for r in resources]
    assert store.load_resources() == resources
    events = store.conn.execute("SELECT id, ts, kind, allocation_id, resource, uid, detail FROM events"
                                " ORDER BY id").fetchall()
    assert [e[0] for e in events] == list(ids) == list(range(1, len(resources) + 1))
    assert [(e[4], json.loads(e[6])) for e in events] == rows
    assert {(e[1], e[2], e[3], e[5]) for e in events} == {(3.0, "resource.added", None, None)}
    store.close()


def test_a_list_of_one_state_reads_that_states_rows_only_after_m013_dropped_the_index_every_release_moved(
        tmp_path: Path) -> None:
    """m007's (state, id) index cost every release a b-tree move (and each COMMIT a page); m013 keeps indexes
    for the rare states only. A list of the few live or withdrawn allocations among 20,000 released ones
    still reads those few (SQLite's VM steps counted, not time), newest first, paged by before_id."""
    from sqlite_utils import Database
    from sqlite_utils.migrations import Migrations

    path = tmp_path / "state.db"
    earlier = Migrations(MIGRATIONS_NAME)
    for migration in MIGRATIONS[:MIGRATIONS.index(m013_live_and_withdrawn_by_id)]:
        earlier()(migration)
    conn = sqlite3.connect(path)
    earlier.apply(Database(conn))
    released = [(f"{n:016x}", "released", 100.0, 100.0, 200.0, "released") for n in range(0, 40_000, 2)]
    rare = [(f"{n:016x}", state, 100.0, granted, ended, reason) for n, (state, granted, ended, reason) in
            zip(range(10_001, 10_031, 2), [("queued", None, None, None), ("active", 100.0, None, None),
                                           ("withdrawn", None, 150.0, "cancelled")] * 5)]
    with conn:
        conn.executemany("INSERT INTO allocations (id, state, priority, owner_uid, created_at, granted_at, released_at,"
                         " release_reason) VALUES (?, ?, 'normal', 0, ?, ?, ?, ?)", released + rare)
    conn.close()

    store = Store(path)  # applies m013 to a database that has rows
    indexes = {row[0] for row in store.conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "allocations_by_state" not in indexes and {"allocations_live", "allocations_withdrawn"} <= indexes
    steps = [0]

    def counted() -> int:
        steps[0] += 1
        return 0

    store.conn.set_progress_handler(counted, 100)
    for state in ("queued", "active", "withdrawn"):
        steps[0] = 0
        listed = store.list_allocations(state, 3)
        assert steps[0] < 20, f"{state}: {steps[0] * 100} VM steps, a read of the released rows"
        expected = sorted((row[0] for row in rare if row[1] == state), reverse=True)
        assert [a.id for a in listed] == expected[:3] and all(a.state == state for a in listed)
        assert [a.id for a in store.list_allocations(state, 10, before_id=expected[1])] == expected[2:]
    newest = store.list_allocations("released", 2)
    assert [a.id for a in newest] == [f"{n:016x}" for n in (39_998, 39_996)]
    assert [a.id for a in store.list_allocations(None, 1)] == [f"{39_998:016x}"]
    store.close()
