"""What each mcpctl command sends: options become exactly these params, and the daemon's parser accepts them.

No daemon and no socket: `call` is replaced by a recorder in every command module, and each recorded request is
handed to the parser the daemon would use for its method (`mcpresd.rpc.HANDLERS`).
"""

from __future__ import annotations

import os
import pwd
import sys
from typing import Any

import pytest

from mcpctl import exitcodes
from mcpctl.actions import AllocateOptions, UsageError, allocate_params, parse_measured
from mcpctl.launch import measured_of
from mcpresd.protocol import POOL_PREFIX, ErrorCode, Method
from mcpresd.rpc import HANDLERS


class Recorder:
    """Stands in for `mcpctl.output.call`: keeps each (method, params) and answers with an empty object."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any] | None]] = []

    def __call__(self, ctx: Any, method: str, params: dict[str, Any] | None = None, **_: Any) -> Any:
        self.calls.append((method, params))
        return [] if method in (Method.POOLS_LIST, Method.BUDGETS_LIST, Method.POOLS_EVENTS) else {}


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    from mcpctl.commands import budget, budgets, optimise, pool, pools, recommend, resource, usage

    recorder = Recorder()
    for module in (budget, budgets, optimise, pool, pools, recommend, resource, usage):
        monkeypatch.setattr(module, "call", recorder)
    return recorder


def mcpctl(*args: str) -> int:
    from mcpctl.app import run_app

    return run_app(["--socket", "/nowhere.sock", *args, "--json"])


def accepted_by_the_daemon(method: str, params: dict[str, Any] | None) -> None:
    HANDLERS[Method(method)].parse(params)


# -- pools --------------------------------------------------------------------

POOL_CASES = [
    (["pools"], Method.POOLS_LIST, None),
    (["pool", "create", "seats", "--factory", "slots", "--parent", "licence", "--slot-size", "1", "--min", "1",
      "--max", "2"],
     Method.POOLS_CREATE,
     {"name": "seats", "factory": "slots", "parent": "licence", "slot_size": 1.0, "min": 1, "max": 2}),
    (["pool", "create", "mem", "--factory", "slots", "--parent", "memory", "--slot-size", "4G", "--max", "3",
      "--strategy", "best-fit", "--cost", "0.5", "--scale-up-at", "0.9", "--scale-down-at", "0.2", "--target",
      "0.6", "--cooldown", "5m", "--label", "team=ml", "--label", "tier=2"],
     Method.POOLS_CREATE,
     {"name": "mem", "factory": "slots", "parent": "memory", "slot_size": float(4 << 30), "max": 3,
      "strategy": "best-fit", "cost_per_unit_hour": 0.5, "scale_up_at": 0.9, "scale_down_at": 0.2, "target": 0.6,
      "cooldown": 300.0, "labels": {"team": "ml", "tier": "2"}}),
    (["pool", "create", "gpus", "--factory", "static", "--member", "gpu:0", "--member", "gpu:1", "--select",
      "type=gpu"],
     Method.POOLS_CREATE, {"name": "gpus", "factory": "static", "members": ["gpu:0", "gpu:1"], "select": ["type=gpu"]}),
    (["pool", "create", "ci", "--factory", "command", "--create", "./make.sh", "--destroy", "./drop.sh", "--timeout",
      "2m", "--min", "0", "--max", "8"],
     Method.POOLS_CREATE,
     {"name": "ci", "factory": "command", "create": "./make.sh", "destroy": "./drop.sh", "timeout": 120.0, "min": 0,
      "max": 8}),
    (["pool", "show", "seats"], Method.POOLS_GET, {"name": "seats"}),
    (["pool", "drain", "seats"], Method.POOLS_DRAIN, {"name": "seats"}),
    (["pool", "undrain", "seats"], Method.POOLS_UNDRAIN, {"name": "seats"}),
    (["pool", "delete", "seats"], Method.POOLS_DELETE, {"name": "seats"}),
    (["pool", "events", "seats", "--limit", "5"], Method.POOLS_EVENTS, {"name": "seats", "limit": 5}),
    (["pool", "events", "seats"], Method.POOLS_EVENTS, {"name": "seats", "limit": 50}),
]

# -- cost, budgets, accounting ----------------------------------------------------

ME = pwd.getpwuid(os.getuid()).pw_name
COST_CASES = [
    (["resource", "set-cost", "gpu:0", "2.5"], Method.RESOURCES_SET_COST, {"name": "gpu:0", "cost_per_unit_hour": 2.5}),
    (["resource", "set-cost", "gpu:0", "0"], Method.RESOURCES_SET_COST, {"name": "gpu:0", "cost_per_unit_hour": 0.0}),
    (["resource", "set-cost", "licence", "none"], Method.RESOURCES_SET_COST,
     {"name": "licence", "cost_per_unit_hour": None}),
    (["budget", "set", "--tool", "train", "--limit", "200", "--period", "week"], Method.BUDGETS_SET,
     {"scope": "tool", "subject": "train", "limit": 200.0, "period": "week"}),
    (["budget", "set", "--owner", ME, "--limit", "5", "--period", "day", "--soft", "0.5"], Method.BUDGETS_SET,
     {"scope": "owner", "subject": str(os.getuid()), "limit": 5.0, "period": "day", "soft": 0.5}),
    (["budget", "set", "--owner", "0042", "--limit", "5", "--period", "month"], Method.BUDGETS_SET,
     {"scope": "owner", "subject": "42", "limit": 5.0, "period": "month"}),
    (["budget", "set", "--pool", "gpus", "--limit", "1000", "--period", "month", "--soft", "1"], Method.BUDGETS_SET,
     {"scope": "pool", "subject": "gpus", "limit": 1000.0, "period": "month", "soft": 1.0}),
    (["budget", "delete", "--tool", "train", "--period", "week"], Method.BUDGETS_DELETE,
     {"scope": "tool", "subject": "train", "period": "week"}),
    (["budget", "delete", "--owner", "0", "--period", "day"], Method.BUDGETS_DELETE,
     {"scope": "owner", "subject": "0", "period": "day"}),
    (["budgets"], Method.BUDGETS_LIST, None),
    (["usage"], Method.USAGE, {"by": "tool", "since": 7 * 86400.0}),
    (["usage", "--by", "owner", "--since", "30d"], Method.USAGE, {"by": "owner", "since": 30 * 86400.0}),
    (["usage", "--by", "resource", "--since", "90m"], Method.USAGE, {"by": "resource", "since": 5400.0}),
    (["recommend", "train"], Method.RECOMMEND, {"tool_id": "train"}),
    (["recommend", "train", "--runs", "7"], Method.RECOMMEND, {"tool_id": "train", "runs": 7}),
    (["optimise"], Method.OPTIMISE, {}),
    (["optimize"], Method.OPTIMISE, {}),
]


@pytest.mark.parametrize(("args", "method", "params"), POOL_CASES + COST_CASES, ids=lambda v: " ".join(v)
                         if isinstance(v, list) else None)
def test_each_command_sends_exactly_these_params(sent: Recorder, args: list[str], method: Method,
                                                 params: dict[str, Any] | None) -> None:
    assert mcpctl(*args) == 0

    assert sent.calls == [(method, params)]
    accepted_by_the_daemon(method, params)


@pytest.mark.parametrize("args", [
    pytest.param(["budget", "set", "--limit", "1", "--period", "day"], id="budget covers nothing"),
    pytest.param(["budget", "set", "--tool", "a", "--pool", "b", "--limit", "1", "--period", "day"],
                 id="budget covers two things"),
    pytest.param(["budget", "set", "--tool", "a", "--limit", "0", "--period", "day"], id="budget limit zero"),
    pytest.param(["budget", "set", "--tool", "a", "--limit", "nan", "--period", "day"], id="budget limit nan"),
    pytest.param(["budget", "set", "--tool", "a", "--limit", "1", "--period", "year"], id="budget period unknown"),
    pytest.param(["budget", "set", "--tool", "a", "--limit", "1", "--period", "day", "--soft", "1.5"],
                 id="budget soft above 1"),
    pytest.param(["budget", "set", "--owner", "no-such-user-here", "--limit", "1", "--period", "day"],
                 id="budget owner unknown"),
    pytest.param(["resource", "set-cost", "gpu:0", "cheap"], id="cost not a number"),
    pytest.param(["resource", "set-cost", "gpu:0", "inf"], id="cost infinite"),
    pytest.param(["usage", "--since", "0"], id="usage since zero"),
    pytest.param(["usage", "--since", "soon"], id="usage since not a duration"),
    pytest.param(["usage", "--by", "colour"], id="usage by unknown"),
    pytest.param(["recommend", "train", "--runs", "0"], id="recommend no runs"),
    pytest.param(["pool", "create", "p", "--factory", "slots", "--parent", "cpu", "--slot-size", "x", "--max", "2"],
                 id="pool slot size not an amount"),
    pytest.param(["pool", "create", "p", "--factory", "magic"], id="pool factory unknown"),
    pytest.param(["pool", "create", "p", "--factory", "command", "--create", "x", "--timeout", "soon"],
                 id="pool timeout not a duration"),
    pytest.param(["pool", "create", "p", "--factory", "command", "--create", "x", "--cooldown", "forever"],
                 id="pool cooldown forever"),
    pytest.param(["pool", "create", "p", "--factory", "static", "--member", "a", "--label", "novalue"],
                 id="pool label without value"),
    pytest.param(["pool", "create", "p", "--factory", "static", "--member", "a", "--strategy", "cheapest"],
                 id="pool strategy unknown"),
    pytest.param(["pool", "create", "p", "--factory", "slots", "--scale-up-at", "1.5"], id="pool threshold above 1"),
    pytest.param(["pool", "events", "p", "--limit", "0"], id="pool events limit zero"),
])
def test_bad_options_exit_2_and_send_nothing(sent: Recorder, args: list[str],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert mcpctl(*args) == exitcodes.USAGE

    assert sent.calls == []
    assert capsys.readouterr().out == ""


# -- allocate --pool, --members, --objective -----------------------------------------


def pool_request(**options: Any) -> dict[str, Any]:
    return allocate_params(AllocateOptions(holder_pid=1, key="k", **options))


@pytest.mark.parametrize(("options", "demands", "extra"), [
    ({"pool": "seats"}, [{"resource": "pool:seats", "amount": 1}], {}),
    ({"pool": "build-*,cost<1", "members": "3"}, [{"resource": "pool:build-*,cost<1", "amount": 3}], {}),
    ({"pool": "gpus", "objective": "cost"}, [{"resource": "pool:gpus", "amount": 1}], {"objective": "cost"}),
    ({"pool": "a,b", "members": "2", "objective": "balanced", "cpu": "1"},
     [{"resource": "cpu", "amount": 1.0}, {"resource": "pool:a,b", "amount": 2}], {"objective": "balanced"}),
])
def test_allocate_pool_asks_for_whole_members(options: dict[str, Any], demands: list[dict[str, Any]],
                                              extra: dict[str, Any]) -> None:
    params = pool_request(**options)

    assert params["resources"] == demands
    assert {k: params[k] for k in ("objective",) if k in params} == extra
    assert all(d["resource"].startswith(POOL_PREFIX) or d["resource"] == "cpu" for d in params["resources"])
    accepted_by_the_daemon(Method.ALLOCATE, params)


@pytest.mark.parametrize("options", [
    pytest.param({"members": "2", "cpu": "1"}, id="members without pool"),
    pytest.param({"objective": "cost", "cpu": "1"}, id="objective without pool"),
    pytest.param({"pool": "seats", "objective": "cheapest"}, id="objective unknown"),
    pytest.param({"pool": "seats", "members": "0"}, id="members zero"),
    pytest.param({"pool": "seats", "members": "1.5"}, id="members not whole"),
    pytest.param({"pool": "seats", "members": "two"}, id="members not a number"),
    pytest.param({"pool": ""}, id="pool empty"),
    pytest.param({"pool": "a,,b"}, id="pool with an empty name"),
])
def test_bad_pool_options_are_usage_errors(options: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        pool_request(**options)


def test_run_passes_the_pool_options_like_allocate(monkeypatch: pytest.MonkeyPatch) -> None:
    import mcpctl.commands.run
    from mcpctl.app import run_app

    seen: list[AllocateOptions] = []
    monkeypatch.setattr(mcpctl.commands.run, "run_command", lambda _s, options, _a, _r: seen.append(options) or 0)

    assert run_app(["run", "--pool", "seats", "--members", "2", "--objective", "latency", "--", "true"]) == 0

    [options] = seen
    assert (options.pool, options.members, options.objective) == ("seats", "2", "latency")


# -- what a release reports ---------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("cpu_seconds=12.5,memory_peak=2G", {"cpu_seconds": 12.5, "memory_peak": 2 << 30}),
    ("memory_peak=1048576", {"memory_peak": 1048576}),
    ("gpu_utilisation=0.75, gpu_memory_peak=40G", {"gpu_utilisation": 0.75, "gpu_memory_peak": 40 << 30}),
    ("cpu_seconds=0", {"cpu_seconds": 0.0}),
])
def test_measured_takes_key_value_pairs_with_sizes(text: str, expected: dict[str, float]) -> None:
    measured = parse_measured(text)

    assert measured == expected
    accepted_by_the_daemon(Method.RELEASE, {"id": "0123456789abcdef", "measured": measured})


@pytest.mark.parametrize("text", ["", "cpu_seconds", "cpu=1", "cpu_seconds=-1", "cpu_seconds=nan",
                                  "gpu_utilisation=1.5", "memory_peak=lots", "cpu_seconds=1,cpu_seconds=2",
                                  "cpu_seconds=2G"])
def test_bad_measurements_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        parse_measured(text)


def test_run_reports_cpu_seconds_and_peak_rss_in_bytes_from_wait4() -> None:
    pid = os.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-c", "sum(range(3_000_000)); b = bytearray(64 << 20)"])
    _, status, usage = os.wait4(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0

    measured = measured_of(usage)

    assert set(measured) == {"cpu_seconds", "memory_peak"}
    assert measured["cpu_seconds"] > 0
    assert measured["memory_peak"] >= 64 << 20
    accepted_by_the_daemon(Method.RELEASE, {"id": "0123456789abcdef", "measured": measured})


# -- exit codes of the new errors ----------------------------------------------------------


@pytest.mark.parametrize(("code", "like"), [
    (ErrorCode.BUDGET_EXCEEDED, ErrorCode.LIMIT_EXCEEDED),
    (ErrorCode.POOL_DRAINING, ErrorCode.NEVER_FITS),
    (ErrorCode.UNKNOWN_POOL, ErrorCode.UNKNOWN_RESOURCE),
    (ErrorCode.POOL_EXISTS, ErrorCode.RESOURCE_EXISTS),
])
def test_pool_and_budget_refusals_exit_like_their_resource_counterparts(code: ErrorCode, like: ErrorCode) -> None:
    assert exitcodes.for_error(code) == exitcodes.for_error(like) == exitcodes.ERROR
