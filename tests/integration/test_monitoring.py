"""Monitoring as specified: samples, history, alerts, health gating and forecasts.

Two kinds of tests:
- In process, on a temporary database with a fake clock: a `Rig` records one sampling round per tick
  (each in its own transaction, as the daemon's group committer does) at exact fake times, so alert
  transitions, roll-ups, retention and forecasts are checked to the tick. GPU readings come from the
  H100 capture through the real `HostSampler` and `ReplayNvml`: idle, then its load trace
  (0 -> ~100 % utilisation), then the load ending.
- Through the real daemon sampling every 0.5 s: what a client sees over the socket. Every wait there
  polls against a deadline.
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import time
from dataclasses import replace
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mcpresd import params as p
from mcpresd.core.alerts import AlertRule, Level
from mcpresd.core.errors import InsufficientCapacity
from mcpresd.core.model import Resource
from mcpresd.monitor import MonitorPolicy
from mcpresd.protocol import Method, ResourceType
from mcpresd.samplers.metrics import HostSampler
from mcpresd.samplers.nvml import GpuError, ReplayNvml
from mcpresd.service import Broker, Caller
from mcpresd.store import Store
from tests.conftest import CONFIG, GPU_CAPTURE, H100_UUID, DaemonProcess

T0 = 1_000_000.0
"""Fake start time: 40 s into the minute that starts at 999_960, and exact in binary at every half second."""
STEP = 0.5
ME = Caller(uid=os.getuid(), gid=os.getgid(), pid=os.getpid())

GPU = Resource(
    name="gpu:0", type=ResourceType.GPU, capacity=1.0, unit="device",
    labels={"index": 0, "memory": 85520809984}, uuid=H100_UUID, source="discovered",
)
CPU = Resource(name="cpu", type=ResourceType.CPU, capacity=8.0, unit="cores", source="discovered")
LICENCE = Resource(name="licence", type=ResourceType.CUSTOM, capacity=4.0, unit="seats", source="config")

GPU_BUSY = AlertRule("gpu-busy", "gpu.utilisation", "gpu", ((Level.WARNING, 50.0), (Level.CRITICAL, 90.0)),
                     pending_for=1.0, keep_firing_for=0.0)


def at(tick: int) -> float:
    return T0 + STEP * tick


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Rig:
    """A broker on a temporary database driven by a fake clock; `record` is one sampling round."""

    def __init__(self, path: Path, policy: MonitorPolicy, resources: tuple[Resource, ...] = (GPU,),
                 clock: FakeClock | None = None) -> None:
        self.path = path
        self.policy = policy
        self.clock = clock or FakeClock()
        self.events: list[dict[str, Any]] = []
        self._open()
        with self.store.transaction():
            self.broker.reconcile_resources([r for r in resources if r.source == "discovered"],
                                            [r for r in resources if r.source == "config"])
        self.broker.take_outbox()

    def _open(self) -> None:
        self.store = Store(self.path)
        self.broker = Broker(self.store, clock=self.clock, monitor=self.policy)

    def restart(self) -> None:
        self.store.close()
        self._open()

    def record(self, now: float, readings: dict[str, dict[str, Any]]) -> None:
        self.clock.now = now
        with self.store.transaction():
            self.broker.record_samples(readings, {})
        self.events += self.broker.take_outbox().events

    def feed(self, values: list[Any], metric: str = "utilisation", first_tick: int = 0) -> None:
        """One round per value, STEP apart, from tick `first_tick`; a dict is a whole GPU reading."""
        for offset, value in enumerate(values):
            reading = value if isinstance(value, dict) else {metric: value}
            self.record(at(first_tick + offset), {"gpu:0": reading})

    def allocate(self, resource: str, amount: float) -> dict[str, Any]:
        command = p.allocate({"resources": [{"resource": resource, "amount": amount}], "holder_pid": os.getpid()})
        with self.store.transaction():
            granted = self.broker.allocate(ME, command)
        self.events += self.broker.take_outbox().events
        return dict(granted)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["kind"] == kind]

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        return self.store.conn.execute(sql, args).fetchall()

    def history(self, metric: str, since: float = 3600.0, resource: str = "gpu:0") -> dict[str, Any]:
        return self.broker.metrics_history(ME, p.HistoryCommand(resource, metric, since))

    def predict(self, horizon: float, metric: str = "utilisation") -> dict[str, Any]:
        return self.broker.predict(ME, p.PredictCommand("gpu:0", metric, horizon))

    def alerts(self) -> list[dict[str, Any]]:
        return self.broker.alerts_list(ME, p.AlertsCommand(all=True))


@pytest.fixture
def capture() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(GPU_CAPTURE.read_text())
    return data


def replayed_gpu(nvml: ReplayNvml | None = None, rounds: int = 1) -> Iterator[dict[str, Any]]:
    """`rounds` GPU readings as the daemon's sampler makes them from the capture, one per round."""
    monotonic = FakeClock(0.0)
    sampler = HostSampler(nvml or ReplayNvml(GPU_CAPTURE), clock=monotonic)
    for _ in range(rounds):
        monotonic.now += STEP
        yield sampler.read([], [])["gpu:0"]


def trace_utilisation(capture: dict[str, Any]) -> list[float]:
    """The GPU utilisation of each replayed sample: the load trace, then the load ending."""
    return [float(entry["utilization"]["gpu"]) for entry in capture["load_trace"] + capture["after"]]


# -- alerts over the replayed H100 trace ------------------------------------------------


def test_a_gpu_utilisation_alert_goes_pending_firing_resolved_at_the_ticks_the_trace_dictates(
        tmp_path: Path, capture: dict[str, Any]) -> None:
    utilisation = trace_utilisation(capture)
    crossed = next(i for i, u in enumerate(utilisation) if u >= 50)
    fires = crossed + round(GPU_BUSY.pending_for / STEP)  # crossed for `for` = 1 s, two ticks later
    resolves = next(i for i in range(fires, len(utilisation)) if utilisation[i] < 50)
    assert all(u >= 50 for u in utilisation[crossed:resolves])  # the load never dips while it runs
    life = utilisation[crossed:resolves]  # pending and firing; the resolving value is not part of it

    rig = Rig(tmp_path / "db", MonitorPolicy(rules=(GPU_BUSY,)))
    rig.feed(list(replayed_gpu(rounds=len(utilisation) + 10)))

    assert [e["ts"] for e in rig.of("alert.firing")] == [at(fires)]
    assert [e["ts"] for e in rig.of("alert.resolved")] == [at(resolves)]
    assert rig.of("alert.level") == []  # the trace jumps from idle straight past critical
    (firing,) = rig.of("alert.firing")
    assert firing["resource"] == "gpu:0"
    assert firing["detail"]["level"] == Level.CRITICAL
    assert firing["detail"]["value"] == utilisation[fires]
    (resolved,) = rig.of("alert.resolved")
    assert resolved["detail"]["value"] == utilisation[resolves]
    assert resolved["detail"]["duration_s"] == STEP * (resolves - fires)
    assert resolved["detail"]["min"] == min(life)
    assert resolved["detail"]["max"] == max(life)
    assert resolved["detail"]["avg"] == pytest.approx(statistics.fmean(life), abs=1e-9)

    (stored,) = rig.alerts()
    assert stored["state"] == "resolved"
    assert (stored["since"], stored["fired_at"], stored["resolved_at"]) == (at(crossed), at(fires), at(resolves))
    assert stored["duration_s"] == STEP * (resolves - fires)
    assert stored["id"] == firing["detail"]["alert_id"]


def test_an_alert_is_pending_and_silent_until_its_for_has_passed(tmp_path: Path, capture: dict[str, Any]) -> None:
    utilisation = trace_utilisation(capture)
    crossed = next(i for i, u in enumerate(utilisation) if u >= 50)
    rig = Rig(tmp_path / "db", MonitorPolicy(rules=(GPU_BUSY,)))
    readings = replayed_gpu(rounds=crossed + 2)
    rig.feed([next(readings) for _ in range(crossed + 1)])  # up to and including the crossing sample

    (pending,) = rig.alerts()
    assert (pending["state"], pending["since"], pending["fired_at"]) == ("pending", at(crossed), None)
    assert not [e for e in rig.events if e["kind"].startswith("alert.")]
    rig.feed([next(readings)], first_tick=crossed + 1)  # half of `for` later: still pending
    assert rig.alerts()[0]["state"] == "pending"
    assert rig.of("alert.firing") == []


def test_a_firing_alert_names_the_allocations_holding_the_resource_largest_first(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "db", MonitorPolicy(rules=(GPU_BUSY,)))
    small = rig.allocate("gpu:0", 0.25)
    large = rig.allocate("gpu:0", 0.5)
    rig.feed([95.0, 95.0, 95.0])

    (firing,) = rig.of("alert.firing")
    named = firing["detail"]["allocations"]
    assert [(a["id"], a["amount"]) for a in named] == [(large["id"], 0.5), (small["id"], 0.25)]
    assert {a["holder_pid"] for a in named} == {os.getpid()}
    assert [a["id"] for a in rig.alerts()[0]["allocations"]] == [large["id"], small["id"]]


# -- what is stored ---------------------------------------------------------------------


def test_a_value_the_gpu_does_not_offer_is_stored_as_unsupported_never_as_a_number(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "db", MonitorPolicy(rules=()))
    rig.feed(list(replayed_gpu(rounds=3)))

    assert rig.broker.metrics_current(ME, p.MetricsCommand("gpu:0"))["resources"]["gpu:0"]["fan_speed_pct"] \
        == "unsupported"
    assert rig.rows("SELECT ts, value, status FROM samples WHERE resource = 'gpu:0' AND metric = 'fan_speed_pct'"
                    " ORDER BY ts") == [(at(0), None, "unsupported"), (at(1), None, "unsupported"),
                                        (at(2), None, "unsupported")]
    assert [pt["status"] for pt in rig.history("fan_speed_pct")["points"]] == ["unsupported"] * 3


class LostGpu(ReplayNvml):
    """The capture's GPU, fallen off the bus: every sample fails."""

    def sample(self, index: int) -> dict[str, object]:
        raise GpuError(f"GPU {index}: GPU is lost")


def _recorded_error_on_utilisation(capture: dict[str, Any], tmp_path: Path) -> ReplayNvml:
    broken = json.loads(json.dumps(capture))
    broken["load_trace"][0]["utilization"] = {"error": "NVMLError_Unknown", "msg": "Unknown Error"}
    path = tmp_path / "broken-capture.json"
    path.write_text(json.dumps(broken))
    return ReplayNvml(path)


@pytest.mark.parametrize("failure", ["recorded NVML error", "GPU lost"])
def test_a_failed_read_is_stored_as_unknown_never_as_0(tmp_path: Path, capture: dict[str, Any],
                                                       failure: str) -> None:
    nvml = _recorded_error_on_utilisation(capture, tmp_path) if failure == "recorded NVML error" \
        else LostGpu(GPU_CAPTURE)
    rig = Rig(tmp_path / "db", MonitorPolicy(rules=()))
    (reading,) = replayed_gpu(nvml, rounds=1)
    assert reading["utilisation"] is None
    rig.feed([reading])

    assert rig.rows("SELECT value, status FROM samples WHERE resource = 'gpu:0' AND metric = 'utilisation'") \
        == [(None, "unknown")]
    assert rig.broker.metrics_current(ME, p.MetricsCommand("gpu:0"))["resources"]["gpu:0"]["utilisation"] is None


def test_utilisation_rate_is_the_allocated_share_of_capacity_in_percent(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "db", MonitorPolicy(rules=()), resources=(GPU, CPU, LICENCE))
    rig.allocate("gpu:0", 0.25)
    rig.allocate("gpu:0", 0.5)
    rig.allocate("cpu", 2)
    rig.record(at(0), {"gpu:0": {"utilisation": 10.0}})

    current = rig.broker.metrics_current(ME, p.MetricsCommand(None))["resources"]
    assert {name: current[name]["utilisation_rate"] for name in ("gpu:0", "cpu", "licence")} \
        == {"gpu:0": 75.0, "cpu": 25.0, "licence": 0.0}
    # Stored: the sampled host resource every round, and what is held; licence was never held, so no history.
    assert sorted(rig.rows("SELECT resource, value FROM samples WHERE metric = 'utilisation_rate'")) \
        == [("cpu", 25.0), ("gpu:0", 75.0)]


def rate_rows(rig: Rig, resource: str) -> list[tuple[float, float]]:
    return rig.rows("SELECT ts, value FROM samples WHERE metric = 'utilisation_rate' AND resource = ? ORDER BY ts",
                    resource)


def test_utilisation_rate_of_a_custom_resource_is_stored_when_it_changes(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "db", MonitorPolicy(rules=()), resources=(GPU, LICENCE))
    rig.record(at(0), {"gpu:0": {"utilisation": 1.0}})
    held = rig.allocate("licence", 2)
    rig.record(at(1), {"gpu:0": {"utilisation": 1.0}})
    rig.record(at(2), {"gpu:0": {"utilisation": 1.0}})
    with rig.store.transaction():
        rig.broker.release(ME, p.release({"id": held["id"]}))
    for tick in (3, 4, 5):
        rig.record(at(tick), {"gpu:0": {"utilisation": 1.0}})

    assert rate_rows(rig, "licence") == [(at(1), 50.0), (at(3), 0.0)]  # held from 1, idle from 3
    assert [ts for ts, _ in rate_rows(rig, "gpu:0")] == [at(tick) for tick in range(6)]  # sampled: every round
    current = rig.broker.metrics_current(ME, p.MetricsCommand("licence"))["resources"]
    assert current == {"licence": {"utilisation_rate": 0.0}}


def test_a_round_stores_nothing_for_idle_resources_however_many_there_are(tmp_path: Path) -> None:
    many = tuple(Resource(name=f"seat-{i}", type=ResourceType.CUSTOM, capacity=1.0, unit="seats", source="config")
                 for i in range(2000))
    rig = Rig(tmp_path / "db", MonitorPolicy(rules=()), resources=(CPU, *many))
    for tick in range(3):
        rig.record(at(tick), {"cpu": {"utilisation": 5.0}})

    per_round = rig.rows("SELECT ts, count(*) FROM samples GROUP BY ts ORDER BY ts")
    assert per_round == [(at(0), 2), (at(1), 2), (at(2), 2)]  # cpu's utilisation and utilisation_rate
    current = rig.broker.metrics_current(ME, p.MetricsCommand(None))["resources"]
    assert current["seat-1999"] == {"utilisation_rate": 0.0} and len(current) == 2001


def test_a_below_rule_fires_for_an_idle_resource_that_was_never_held(tmp_path: Path) -> None:
    underused = AlertRule("licence-unused", "custom.utilisation_rate", "licence", ((Level.WARNING, 10.0),),
                          above=False, pending_for=1.0)
    rig = Rig(tmp_path / "db", MonitorPolicy(rules=(underused,)), resources=(GPU, LICENCE))
    for tick in range(4):  # 0.5 s apart: pending at 0, firing once 1 s has passed
        rig.record(at(tick), {"gpu:0": {"utilisation": 1.0}})

    assert [(e["kind"], e["resource"]) for e in rig.events if e["kind"].startswith("alert.")] \
        == [("alert.firing", "licence")]


def test_a_rule_added_by_a_reload_meets_every_idle_resource(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "db", MonitorPolicy(rules=()), resources=(GPU, LICENCE))
    rig.record(at(0), {"gpu:0": {"utilisation": 1.0}})
    underused = AlertRule("licence-unused", "custom.utilisation_rate", "licence", ((Level.WARNING, 10.0),),
                          above=False)
    with rig.store.transaction():
        rig.broker.monitor.reconfigure(MonitorPolicy(rules=(underused,)), at(1))
    rig.record(at(1), {"gpu:0": {"utilisation": 1.0}})

    assert [(e["kind"], e["resource"]) for e in rig.events if e["kind"].startswith("alert.")] \
        == [("alert.firing", "licence")]


# -- history: roll-ups, retention, restarts ------------------------------------------------


def test_a_finished_minute_is_rolled_up_exactly_and_a_failed_read_is_not_counted(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "db", MonitorPolicy(rules=()))
    first_minute, second_minute, third_minute = 999_960.0, 1_000_020.0, 1_000_080.0
    ticks = int((third_minute - T0) / STEP)  # ticks 0..39 lie in the first minute, 40..159 in the second
    watts: list[float | None] = [float(i) for i in range(ticks + 1)]
    watts[0] = None  # a failed read: not a 0 in the roll-up
    rig.feed(watts, metric="power_w")

    rows = rig.rows("SELECT minute, min, max, avg, count FROM rollups WHERE resource = 'gpu:0'"
                    " AND metric = 'power_w' ORDER BY minute")
    assert rows == [(first_minute, 1.0, 39.0, 20.0, 39), (second_minute, 40.0, 159.0, 99.5, 120)]
    assert at(ticks) == third_minute  # the minute just begun is not rolled up yet
    assert rig.history("power_w")["rollups"] == [
        {"minute": first_minute, "min": 1.0, "max": 39.0, "avg": 20.0, "count": 39},
        {"minute": second_minute, "min": 40.0, "max": 159.0, "avg": 99.5, "count": 120},
    ]


def test_raw_samples_older_than_raw_max_age_are_deleted(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "db", MonitorPolicy(rules=(), raw_max_age=30.0))
    last = int(120 / STEP)  # retention runs every 60 s from the first round: at T0, T0+60 and T0+120
    rig.feed([10.0] * (last + 1))

    kept = [ts for (ts,) in rig.rows("SELECT ts FROM samples WHERE resource = 'gpu:0' AND metric = 'utilisation'"
                                     " ORDER BY ts")]
    assert kept == [at(i) for i in range(last - int(30 / STEP), last + 1)]  # T0+90 (exactly 30 s old) to T0+120


def test_at_most_raw_points_per_metric_are_kept_the_newest(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "db", MonitorPolicy(rules=(), raw_points=25))
    last = int(120 / STEP)
    rig.feed([float(i % 100) for i in range(last + 1)])

    for metric in ("utilisation", "utilisation_rate"):
        kept = [ts for (ts,) in rig.rows("SELECT ts FROM samples WHERE resource = 'gpu:0' AND metric = ?"
                                         " ORDER BY ts", metric)]
        assert kept == [at(i) for i in range(last - 24, last + 1)]


def test_rollups_older_than_rollup_max_age_are_deleted(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "db", MonitorPolicy(rules=(), rollup_max_age=160.0))
    last = int(240 / STEP)  # the last round, at T0+240 = 1_000_240, retains with the cutoff 1_000_080
    rig.feed([10.0] * (last + 1))

    minutes = [m for (m,) in rig.rows("SELECT minute FROM rollups WHERE resource = 'gpu:0'"
                                      " AND metric = 'utilisation' ORDER BY minute")]
    assert minutes == [1_000_080.0, 1_000_140.0]  # 999_960 and 1_000_020 dropped; 1_000_200 is not over yet


def test_history_survives_a_restart(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "db", MonitorPolicy(rules=()))
    rig.feed([5.0, 15.0, 25.0, 35.0])
    before = rig.history("utilisation")

    rig.restart()
    rig.clock.now = at(10)
    after = rig.history("utilisation")
    assert after["points"] == before["points"] == [
        {"ts": at(i), "value": v, "status": "ok"} for i, v in enumerate([5.0, 15.0, 25.0, 35.0])]
    assert {"utilisation", "utilisation_rate"} <= set(after["metrics"])


def test_the_minute_in_progress_at_shutdown_is_rolled_up_after_a_restart(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "db", MonitorPolicy(rules=()))
    rig.feed([10.0, 20.0, 30.0])  # in the minute starting at 999_960

    rig.restart()
    later = 1_000_200.0  # down across two minute boundaries
    for i, value in enumerate([50.0] * int(61 / STEP)):
        rig.record(later + STEP * i, {"gpu:0": {"utilisation": value}})

    rows = rig.rows("SELECT minute, min, max, avg, count FROM rollups WHERE resource = 'gpu:0'"
                    " AND metric = 'utilisation' ORDER BY minute")
    assert rows == [(999_960.0, 10.0, 30.0, 20.0, 3), (1_000_200.0, 50.0, 50.0, 50.0, 120)]


# -- missing data --------------------------------------------------------------------


@pytest.mark.parametrize(("missing", "stored"), [
    pytest.param({"utilisation": None}, {"unknown"}, id="failed read"),
    pytest.param({"utilisation": math.nan}, {"unknown"}, id="NaN"),
    pytest.param({}, set(), id="no reading at all"),
])
def test_missing_data_makes_a_rule_unknown_and_never_resolves_a_firing_alert(
        tmp_path: Path, missing: dict[str, Any], stored: set[str]) -> None:
    rig = Rig(tmp_path / "db", MonitorPolicy(rules=(GPU_BUSY,)))
    rig.feed([95.0, 95.0, 95.0])
    assert [e["ts"] for e in rig.of("alert.firing")] == [at(2)]

    rig.feed([dict(missing) for _ in range(20)], first_tick=3)
    assert rig.of("alert.resolved") == []
    (alert,) = rig.alerts()
    assert (alert["state"], alert["unknown"], alert["resolved_at"]) == ("firing", True, None)
    assert {(value, status) for value, status in rig.rows(
        "SELECT value, status FROM samples WHERE resource = 'gpu:0' AND metric = 'utilisation' AND ts > ?", at(2)
    )} == {(None, status) for status in stored}

    rig.feed([10.0], first_tick=23)
    assert [e["ts"] for e in rig.of("alert.resolved")] == [at(23)]
    assert rig.alerts()[0]["unknown"] is False


def test_missing_data_never_fires_a_pending_alert(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "db", MonitorPolicy(rules=(GPU_BUSY,)))
    rig.feed([95.0, None, None, None])  # `for` has passed, but nobody saw the value stay high

    assert rig.of("alert.firing") == []
    (alert,) = rig.alerts()
    assert (alert["state"], alert["unknown"]) == ("pending", True)
    rig.feed([95.0], first_tick=4)
    assert [e["ts"] for e in rig.of("alert.firing")] == [at(4)]


# -- health ---------------------------------------------------------------------------


def test_a_firing_critical_alert_makes_the_gpu_unhealthy_and_ungranted_until_it_recovers(tmp_path: Path) -> None:
    policy = MonitorPolicy(rules=(GPU_BUSY,), health_interval=STEP, health_threshold=80)
    rig = Rig(tmp_path / "db", policy)
    rig.feed([0.0, 0.0, 99.0, 99.0])
    assert rig.of("resource.unhealthy") == []
    assert rig.broker.resource_dict(GPU)["health"] == {"score": 100, "reasons": [], "granted": True}

    rig.feed([99.0], first_tick=4)  # crossed at tick 2, so firing now, at critical
    (unhealthy,) = rig.of("resource.unhealthy")
    assert (unhealthy["ts"], unhealthy["resource"]) == (at(4), "gpu:0")
    assert unhealthy["detail"] == {"score": 60, "reasons": ["critical alert firing (-40)"]}
    assert rig.broker.resource_dict(GPU)["health"] == {"score": 60, "reasons": ["critical alert firing (-40)"],
                                                       "granted": False}
    with pytest.raises(InsufficientCapacity):
        rig.allocate("gpu:0", 0.25)
    with pytest.raises(InsufficientCapacity):
        rig.allocate("gpu", 1)

    rig.feed([10.0], first_tick=5)  # the alert resolves: back to 100, past threshold + margin
    (healthy,) = rig.of("resource.healthy")
    assert (healthy["ts"], healthy["detail"]) == (at(5), {"score": 100, "reasons": []})
    assert rig.allocate("gpu:0", 0.25)["state"] == "active"


def test_a_warning_alert_alone_costs_less_than_the_threshold_and_keeps_the_gpu_granted(tmp_path: Path) -> None:
    policy = MonitorPolicy(rules=(GPU_BUSY,), health_interval=STEP, health_threshold=80)
    rig = Rig(tmp_path / "db", policy)
    rig.feed([60.0, 60.0, 60.0])

    assert rig.of("alert.firing")[0]["detail"]["level"] == Level.WARNING
    assert rig.broker.resource_dict(GPU)["health"] == {"score": 90, "reasons": ["warning alert firing (-10)"],
                                                       "granted": True}
    assert rig.of("resource.unhealthy") == []
    assert rig.allocate("gpu:0", 0.25)["state"] == "active"


# -- forecasts ------------------------------------------------------------------------


def line(start: float, slope: float, ticks: int) -> list[float]:
    return [start + slope * STEP * i for i in range(ticks)]


@pytest.mark.parametrize(("start", "slope", "horizon", "predicted", "until"), [
    pytest.param(20.0, 2.0, 15.0, 70.0, 30.0, id="rising, on the line"),
    pytest.param(20.0, 2.0, 100.0, 100.0, 30.0, id="rising, clamped to 100"),
    pytest.param(80.0, -2.0, 10.0, 40.0, None, id="falling, on the line"),
    pytest.param(80.0, -2.0, 100.0, 0.0, None, id="falling, clamped to 0"),
])
def test_a_forecast_of_a_straight_line_is_the_line(tmp_path: Path, start: float, slope: float, horizon: float,
                                                   predicted: float, until: float | None) -> None:
    rig = Rig(tmp_path / "db", MonitorPolicy(rules=()))
    values = line(start, slope, 21)  # T0 .. T0+10 s
    rig.feed(values)

    forecast = rig.predict(horizon)
    assert forecast["now"] == at(20)
    assert forecast["current"] == values[-1]
    assert forecast["samples"] == 21
    assert forecast["predicted"] == pytest.approx(predicted, abs=1e-9)
    assert forecast["threshold"] == 100.0
    if until is None:
        assert forecast["seconds_until_threshold"] is None
    else:
        assert forecast["seconds_until_threshold"] == pytest.approx(until, abs=1e-9)


def test_a_forecast_of_a_metric_that_is_not_a_percentage_is_not_clamped(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "db", MonitorPolicy(rules=()))
    rig.feed(line(100.0, 50.0, 21), metric="power_w")  # 100 W rising by 50 W/s, 600 W at T0+10

    forecast = rig.predict(10.0, metric="power_w")
    assert forecast["predicted"] == pytest.approx(1100.0, abs=1e-9)
    assert forecast["threshold"] is None and forecast["seconds_until_threshold"] is None


@pytest.mark.parametrize(("actual", "mape"), [
    pytest.param(None, 0.0, id="the line went on: perfect"),
    pytest.param(64.0, 50.0, id="actual twice the forecast"),
    pytest.param(16.0, 100.0, id="actual half the forecast"),
])
def test_forecasts_are_scored_by_mape_once_their_horizon_has_passed(tmp_path: Path, actual: float | None,
                                                                    mape: float) -> None:
    rig = Rig(tmp_path / "db", MonitorPolicy(rules=(), forecast_horizon=5.0))
    values = line(20.0, 2.0, 13)  # the first forecast needs 3 points: made at T0+1 for T0+6 = tick 12 (32 %)
    if actual is not None:
        values[-1] = actual
    rig.feed(values[:12])
    assert rig.predict(60.0)["accuracy"] == {"mape_pct": None, "scored": 0, "horizon_s": 5.0}

    rig.feed(values[12:], first_tick=12)
    accuracy = rig.predict(60.0)["accuracy"]
    assert accuracy["scored"] == 1
    assert accuracy["mape_pct"] == pytest.approx(mape, abs=1e-9)


# -- through the real daemon -----------------------------------------------------------

MONITORED = """
memory_reserve = "0"

[monitor]
interval = "0.5s"

[[alerts]]
name = "gpu-busy"
metric = "gpu.utilisation"
selector = "gpu"
warning = 50
critical = 90
for = "1s"
"""


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 20.0, every: float = 0.1) -> Any:
    """Poll `probe` until it returns something truthy; fail, saying `what`, after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


class Subscriber:
    """A raw connection subscribed to events; reads notifications against a deadline."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(5.0)
        self.sock.connect(daemon.socket)
        self.buffer = b""
        self.sock.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": Method.EVENTS_SUBSCRIBE,
                                      "params": {}}).encode() + b"\n")
        reply = self._next(time.monotonic() + 5.0)
        assert reply is not None and reply["result"]["subscribed"] is True

    def _next(self, deadline: float) -> dict[str, Any] | None:
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return None
            if not chunk:
                raise EOFError("the daemon closed the subscription")
            self.buffer += chunk
        line_, _, self.buffer = self.buffer.partition(b"\n")
        message: dict[str, Any] = json.loads(line_)
        return message

    def event(self, kind: str, timeout: float, **match: Any) -> dict[str, Any]:
        """The next event notification of `kind` whose detail has `match`; fails after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while (message := self._next(deadline)) is not None:
            if message.get("method") != "event":
                continue
            event: dict[str, Any] = message["params"]
            if event["kind"] == kind and all(event["detail"].get(k) == v for k, v in match.items()):
                return event
        pytest.fail(f"no {kind} event within {timeout:g}s")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def monitored(tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(tmp_path, config=MONITORED)
    process.start()
    try:
        yield process
    finally:
        process.stop()


def gpu_history(daemon: DaemonProcess, metric: str = "utilisation") -> dict[str, Any]:
    result: dict[str, Any] = daemon.call(Method.METRICS_HISTORY, {"resource": "gpu:0", "metric": metric,
                                                                  "since": 600})
    return result


def history_of_3_points(daemon: DaemonProcess) -> dict[str, Any]:
    def enough() -> dict[str, Any] | None:
        history = gpu_history(daemon)
        return history if len(history["points"]) >= 3 else None

    found: dict[str, Any] = wait_for("3 points of gpu:0 history", enough)
    return found


def test_the_daemon_reports_current_gpu_metrics_with_unsupported_fields(monitored: DaemonProcess) -> None:
    def sampled() -> dict[str, Any] | None:
        current: dict[str, Any] = monitored.call(Method.METRICS_CURRENT, {"resource": "gpu:0"})
        return current if current["ts"] is not None else None

    current = wait_for("a first sample of gpu:0", sampled)
    assert current["interval_s"] == 0.5
    gpu = current["resources"]["gpu:0"]
    assert gpu["fan_speed_pct"] == "unsupported"
    assert gpu["memory_used"] > 0 and gpu["utilisation_rate"] == 0.0
    assert {"utilisation", "memory_utilisation", "temperature_c", "power_w", "clock_sm_mhz",
            "throttle_reasons", "processes"} <= set(gpu)


def test_a_subscriber_is_told_when_the_replayed_load_fires_the_alert_and_when_it_resolves(
        monitored: DaemonProcess) -> None:
    subscriber = Subscriber(monitored)
    try:
        firing = subscriber.event("alert.firing", timeout=30.0, rule="gpu-busy")
        resolved = subscriber.event("alert.resolved", timeout=30.0, rule="gpu-busy")
    finally:
        subscriber.close()
    assert firing["resource"] == resolved["resource"] == "gpu:0"
    assert firing["detail"]["level"] == "critical" and firing["detail"]["value"] >= 90
    assert resolved["detail"]["alert_id"] == firing["detail"]["alert_id"]
    assert resolved["detail"]["value"] < 50
    assert resolved["detail"]["duration_s"] == pytest.approx(resolved["ts"] - firing["ts"])
    assert resolved["detail"]["min"] >= 90 and resolved["detail"]["max"] <= 100

    (listed,) = [a for a in monitored.call(Method.ALERTS_LIST, {"all": True}) if a["rule"] == "gpu-busy"]
    assert listed["id"] == firing["detail"]["alert_id"]
    assert listed["state"] == "resolved"
    assert listed["fired_at"] - listed["since"] >= 1.0  # pending for `for` = 1s first
    assert listed["duration_s"] == pytest.approx(resolved["detail"]["duration_s"])
    assert [a for a in monitored.call(Method.ALERTS_LIST) if a["rule"] == "gpu-busy"] == []  # no longer open


def test_predict_returns_a_forecast_with_its_track_record(monitored: DaemonProcess) -> None:
    def forecast_made() -> dict[str, Any] | None:
        forecast: dict[str, Any] = monitored.call(Method.PREDICT, {"resource": "gpu:0", "metric": "utilisation",
                                                                   "in": 60})
        return forecast if forecast["predicted"] is not None else None

    forecast = wait_for("a forecast from 3 samples", forecast_made)
    assert forecast["resource"] == "gpu:0" and forecast["horizon_s"] == 60
    assert 0.0 <= forecast["predicted"] <= 100.0
    assert forecast["samples"] >= 3
    assert set(forecast["accuracy"]) == {"mape_pct", "scored", "horizon_s"}
    assert forecast["accuracy"]["horizon_s"] == 300.0


def test_history_has_points_and_lists_the_metrics(monitored: DaemonProcess) -> None:
    history = history_of_3_points(monitored)
    assert all(pt["status"] == "ok" and pt["value"] is not None for pt in history["points"])
    assert [pt["ts"] for pt in history["points"]] == sorted(pt["ts"] for pt in history["points"])
    assert {"utilisation", "utilisation_rate", "power_w", "fan_speed_pct"} <= set(history["metrics"])
    fan = gpu_history(monitored, "fan_speed_pct")
    assert fan["points"] and {(pt["value"], pt["status"]) for pt in fan["points"]} == {(None, "unsupported")}


def test_history_survives_a_kill_9_and_a_restart(monitored: DaemonProcess) -> None:
    before = history_of_3_points(monitored)
    monitored.kill()
    monitored.start()

    after = gpu_history(monitored)
    seen = {(pt["ts"], pt["value"]) for pt in after["points"]}
    assert {(pt["ts"], pt["value"]) for pt in before["points"]} <= seen
    newest = max(pt["ts"] for pt in before["points"])
    wait_for("a sample after the restart", lambda: max(pt["ts"] for pt in gpu_history(monitored)["points"]) > newest)


def test_the_prometheus_textfile_is_written_every_interval(tmp_path: Path) -> None:
    target = tmp_path / "textfile" / "mcpres.prom"
    target.parent.mkdir()
    daemon = DaemonProcess(tmp_path, config=CONFIG + f'\n[monitor]\ninterval = "0.5s"\nprometheus_file = "{target}"\n')
    daemon.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not target.exists():
            time.sleep(0.05)
        text = target.read_text()
        assert '# TYPE mcpres_cpu_busy_ratio gauge' in text
        assert 'mcpres_cpu_busy_ratio{resource="cpu"}' in text
        assert 'mcpres_gpu_temperature_celsius{resource="gpu:0",' in text
        assert "fan_speed" not in text  # unsupported values are left out, never written as 0
        assert not list(target.parent.glob("*.tmp"))  # written whole, then renamed into place
    finally:
        daemon.stop()


def test_a_resource_added_just_before_a_rebuild_of_the_ledger_is_still_met(tmp_path: Path) -> None:
    underused = AlertRule("seat-unused", "custom.utilisation_rate", "seat", ((Level.WARNING, 10.0),), above=False)
    rig = Rig(tmp_path / "db", MonitorPolicy(rules=(underused,)), resources=(GPU, LICENCE))
    with rig.store.transaction():  # a third change to the old ledger's resources: add, add, replace
        rig.broker.reconcile_resources([GPU], [replace(LICENCE, capacity=5.0)])
    rig.record(at(0), {"gpu:0": {"utilisation": 1.0}})
    seat = Resource(name="seat", type=ResourceType.CUSTOM, capacity=1.0, unit="seats", source="config")
    with rig.store.transaction():
        rig.broker.reconcile_resources([GPU], [replace(LICENCE, capacity=5.0), seat])
    rig.broker.reload()  # as after a failed commit: a new ledger, counting its three resources afresh
    rig.record(at(1), {"gpu:0": {"utilisation": 1.0}})

    assert rig.broker.metrics_current(ME, p.MetricsCommand("seat"))["resources"] == {"seat": {"utilisation_rate": 0.0}}
    assert [(e["kind"], e["resource"]) for e in rig.events if e["kind"].startswith("alert.")] \
        == [("alert.firing", "seat")]


def test_a_reload_between_a_release_and_the_next_round_keeps_the_idle_row(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "db", MonitorPolicy(rules=()), resources=(GPU, LICENCE))
    held = rig.allocate("licence", 2)
    rig.record(at(0), {"gpu:0": {"utilisation": 1.0}})
    with rig.store.transaction():
        rig.broker.release(ME, p.release({"id": held["id"]}))
        rig.broker.monitor.reconfigure(MonitorPolicy(rules=(GPU_BUSY,)), at(1))
    rig.record(at(1), {"gpu:0": {"utilisation": 1.0}})

    assert rate_rows(rig, "licence") == [(at(0), 50.0), (at(1), 0.0)]


def test_an_unhealthy_resource_stays_refused_after_the_ledger_is_rebuilt(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "db", MonitorPolicy(rules=(GPU_BUSY,), health_interval=STEP, health_threshold=80))
    rig.feed([99.0] * 5)  # a critical alert firing: 60 < 80
    assert rig.broker.resource_dict(GPU)["health"]["granted"] is False
    rig.broker.reload()

    with pytest.raises(InsufficientCapacity):
        rig.allocate("gpu:0", 1)
