"""`mcpctl` as a user and a shell script run it: output, exit codes, help, and the fast path."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer

from mcpctl import exitcodes, fast
from tests.conftest import DaemonProcess, H100_UUID, as_json, cli, ok, run_cli

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
ALLOCATION_FIELDS = {"id", "state", "items", "priority", "owner_uid", "holder_pid", "created_at"}
ANSI = re.compile(r"\x1b\[")
BOX_DRAWING = re.compile(r"[\u2500-\u257f]")
TYPER_PATH = "import sys; from mcpctl.app import run_app; raise SystemExit(run_app(sys.argv[1:]))"


def allocated(daemon: DaemonProcess) -> dict[str, float]:
    return {r["name"]: r["allocated"] for r in as_json(daemon, "resources")}


def active_ids(daemon: DaemonProcess) -> list[str]:
    return [a["id"] for a in as_json(daemon, "allocations")]


def run_typer_path(*args: str, socket_path: str) -> subprocess.CompletedProcess[str]:
    """mcpctl through the Typer app only, never the fast path."""
    env = dict(os.environ, MCPRES_SOCKET=socket_path)
    return subprocess.run([sys.executable, "-c", TYPER_PATH, *args], capture_output=True, text=True, env=env,
                          timeout=30)


# -- allocate, list, release ------------------------------------------------


def test_allocate_prints_the_id_alone_and_release_makes_it_inactive(daemon: DaemonProcess) -> None:
    result = cli(daemon, "allocate", "--cpu", "1", "--mem", "64M")

    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"[0-9a-f]+\n", result.stdout), repr(result.stdout)
    allocation_id = result.stdout.strip()

    [listed] = as_json(daemon, "allocations")
    assert ALLOCATION_FIELDS <= listed.keys()
    assert listed["id"] == allocation_id
    assert listed["state"] == "active"
    assert listed["priority"] == "normal"
    assert listed["owner_uid"] == os.getuid()
    assert listed["holder_pid"] == os.getpid()  # the caller's parent: this test process
    assert {(i["resource"], i["amount"]) for i in listed["items"]} == {("cpu", 1), ("memory", 64 << 20)}

    released = cli(daemon, "release", allocation_id)
    assert released.returncode == 0, released.stderr
    assert active_ids(daemon) == []
    [gone] = as_json(daemon, "allocations", "--all")
    assert (gone["id"], gone["state"]) == (allocation_id, "released")


def test_allocate_json_prints_the_allocation_object(daemon: DaemonProcess) -> None:
    allocation = as_json(daemon, "allocate", "--cpu", "0.5", "--priority", "high", "--tool", "build")

    assert ALLOCATION_FIELDS <= allocation.keys()
    assert allocation["state"] == "active"
    assert allocation["priority"] == "high"
    assert allocation["tool_id"] == "build"
    assert allocation["owner_uid"] == os.getuid()
    assert active_ids(daemon) == [allocation["id"]]


def test_allocate_env_prints_export_lines_with_the_gpu_uuid(daemon: DaemonProcess) -> None:
    lines = ok(daemon, "allocate", "--gpu", "1", "--env").splitlines()

    assert all(line.startswith("export ") for line in lines), lines
    assert f"export CUDA_VISIBLE_DEVICES={H100_UUID}" in lines
    [id_line] = [line for line in lines if line.startswith("export MCPRES_ALLOCATION_ID=")]
    assert id_line.split("=", 1)[1] in active_ids(daemon)


def test_allocate_env_output_can_be_evaluated_by_bash(daemon: DaemonProcess) -> None:
    """The holder is the bash that ran mcpctl: the allocation is active inside the script, released after it."""
    env = dict(os.environ, MCPRES_SOCKET=daemon.socket, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    script = ('eval "$(mcpctl allocate --gpu 1 --env)"; echo "$CUDA_VISIBLE_DEVICES"; echo "$MCPRES_ALLOCATION_ID";'
              ' mcpctl allocations --json')

    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=30)

    assert result.returncode == 0, result.stderr
    visible, allocation_id, listed = result.stdout.split("\n", 2)
    assert visible == H100_UUID
    assert allocation_id in [a["id"] for a in json.loads(listed)]


# -- sharing and all-or-nothing ---------------------------------------------


def test_two_half_gpus_share_one_device_and_a_third_does_not_fit(daemon: DaemonProcess) -> None:
    first = as_json(daemon, "allocate", "--gpu", "0.5")
    second = as_json(daemon, "allocate", "--gpu", "0.5")

    assert [i["resource"] for i in first["items"]] == ["gpu:0"]
    assert [i["resource"] for i in second["items"]] == ["gpu:0"]
    assert first["items"][0]["uuid"] == H100_UUID

    third = cli(daemon, "allocate", "--gpu", "0.5")
    assert third.returncode == exitcodes.UNAVAILABLE
    assert third.stdout == ""
    assert third.stderr.strip()
    assert sorted(active_ids(daemon)) == sorted([first["id"], second["id"]])


def test_a_request_that_can_never_fit_holds_nothing(daemon: DaemonProcess) -> None:
    result = cli(daemon, "allocate", "--res", "licence=1", "--res", "slot=11")

    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.strip()
    assert set(allocated(daemon).values()) == {0}
    assert as_json(daemon, "allocations", "--all") == []


def test_a_request_that_does_not_fit_now_holds_none_of_its_parts(daemon: DaemonProcess) -> None:
    ok(daemon, "allocate", "--res", "slot=5")

    result = cli(daemon, "allocate", "--res", "licence=1", "--res", "slot=6")

    assert result.returncode == exitcodes.UNAVAILABLE
    assert result.stdout == ""
    held = allocated(daemon)
    assert (held["licence"], held["slot"]) == (0, 5)
    assert len(active_ids(daemon)) == 1


# -- exit codes -------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["allocate"], id="nothing-asked"),
        pytest.param(["allocate", "--cpu", "abc"], id="cpu-not-a-number"),
        pytest.param(["allocate", "--cpu", "0"], id="cpu-zero"),
        pytest.param(["allocate", "--mem", "12Q"], id="mem-bad-suffix"),
        pytest.param(["allocate", "--cpu", "1", "--bogus", "1"], id="unknown-option"),
        pytest.param(["allocate", "--cpu", "1", "--priority", "urgent"], id="unknown-priority"),
        pytest.param(["allocate", "--cpu", "1", "--json", "--env"], id="json-and-env"),
        pytest.param(["allocate", "--res", "licence"], id="res-without-amount"),
        pytest.param(["release"], id="release-without-id"),
        pytest.param(["no-such-command"], id="unknown-command"),
    ],
)
def test_usage_errors_exit_2_and_print_nothing_on_stdout(daemon: DaemonProcess, args: list[str]) -> None:
    result = cli(daemon, *args)

    assert result.returncode == exitcodes.USAGE, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert result.stderr.strip()
    assert active_ids(daemon) == []


def test_a_request_that_does_not_fit_now_exits_3(daemon: DaemonProcess) -> None:
    ok(daemon, "allocate", "--res", "licence=2")

    result = cli(daemon, "allocate", "--res", "licence=1")

    assert result.returncode == exitcodes.UNAVAILABLE
    assert result.stdout == ""
    assert "licence" in result.stderr


def test_releasing_an_unknown_id_exits_1(daemon: DaemonProcess) -> None:
    result = cli(daemon, "release", "0123456789abcdef")

    assert result.returncode == exitcodes.ERROR
    assert "0123456789abcdef" in result.stderr


def test_releasing_twice_exits_1_the_second_time(daemon: DaemonProcess) -> None:
    allocation_id = ok(daemon, "allocate", "--cpu", "0.1").strip()

    assert cli(daemon, "release", allocation_id).returncode == exitcodes.OK
    again = cli(daemon, "release", allocation_id)

    assert again.returncode == exitcodes.ERROR
    assert "already released" in again.stderr


def test_asking_for_an_unknown_resource_exits_1_with_one_hint(daemon: DaemonProcess) -> None:
    result = cli(daemon, "allocate", "--res", "nosuch=1")

    assert result.returncode == exitcodes.ERROR
    assert result.stdout == ""
    assert "nosuch" in result.stderr
    assert result.stderr.count("mcpctl resources") == 1, result.stderr


@pytest.mark.parametrize(
    "args",
    [["status"], ["resources"], ["allocations"], ["events"], ["allocate", "--cpu", "1"], ["release", "abc"]],
    ids=lambda args: args[0],
)
@pytest.mark.parametrize("how", ["env", "option"])
def test_no_daemon_listening_exits_5_and_says_how_to_start_it(tmp_path: Path, args: list[str], how: str) -> None:
    path = str(tmp_path / "nobody.sock")
    if how == "env":
        result = run_cli(*args, socket_path=path, env={"MCPRES_RETRY_FOR": "0.2s"})
    else:
        result = run_cli("--socket", path, "--retry-for", "0.2s", *args)

    assert result.returncode == exitcodes.UNREACHABLE
    assert result.stdout == ""
    assert path in result.stderr
    assert "start it with `mcpresd`" in result.stderr


def test_a_stale_socket_with_no_daemon_exits_5(tmp_path: Path) -> None:
    path = str(tmp_path / "stale.sock")
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(path)

    result = run_cli("allocate", "--cpu", "1", socket_path=path, env={"MCPRES_RETRY_FOR": "0"})

    assert result.returncode == exitcodes.UNREACHABLE
    assert "mcpresd" in result.stderr


@pytest.mark.parametrize("args", [["status"], ["allocate", "--res", "slot=1"], ["release", "abc"]], ids=" ".join)
def test_an_absent_daemon_exits_5_only_after_the_retry_time(tmp_path: Path, args: list[str]) -> None:
    import time

    path = str(tmp_path / "nobody.sock")
    started = time.monotonic()
    result = run_cli("--retry-for", "700ms", *args, socket_path=path)
    took = time.monotonic() - started

    assert result.returncode == exitcodes.UNREACHABLE
    assert "gave up after retrying for 0.7s" in result.stderr
    assert took >= 0.7


def test_retry_for_takes_a_duration(tmp_path: Path) -> None:
    for args in (["--retry-for", "soon", "status"], ["--retry-for", "-1s", "release", "a"]):
        result = run_cli(*args, socket_path=str(tmp_path / "nobody.sock"))
        assert result.returncode == exitcodes.USAGE, result.stderr
        assert "--retry-for" in result.stderr


@pytest.mark.parametrize("args", [
    ("usage", "--since", "{}"),
    ("metrics", "memory", "--since", "{}"),
    ("predict", "memory", "--in", "{}"),
    ("renew", "0123456789abcdef", "--ttl", "{}"),
    ("allocate", "--cpu", "1", "--ttl", "{}"),
    ("top", "--once", "--interval", "{}"),
    ("pool", "create", "p", "--factory", "slots", "--parent", "cpu", "--slot-size", "1", "--cooldown", "{}"),
])
def test_an_option_that_needs_a_finite_duration_does_not_offer_forever(daemon: DaemonProcess,
                                                                         args: tuple[str, ...]) -> None:
    option = args[-2]
    for value in ("soon", "forever"):
        result = cli(daemon, *(a.format(value) for a in args))

        assert result.returncode == exitcodes.USAGE, result.stderr
        assert option in result.stderr and repr(value) in result.stderr
        assert "forever" not in result.stderr.replace(repr(value), ""), result.stderr
    assert daemon.call("allocations.list", {"state": "active"}) == []
    assert daemon.call("pools.list") == []


@pytest.mark.parametrize("option", ["--wait", "--ttl"])
def test_a_wait_or_lease_past_a_year_is_refused_in_days_not_exponents(daemon: DaemonProcess, option: str) -> None:
    result = cli(daemon, "allocate", "--cpu", "1", option, "400d")

    assert result.returncode == exitcodes.USAGE
    assert "31536000 (365 days)" in result.stderr and "e+07" not in result.stderr
    assert daemon.call("allocations.list") == []


def test_an_option_that_takes_forever_still_offers_it(daemon: DaemonProcess) -> None:
    result = cli(daemon, "allocate", "--cpu", "1", "--wait", "soon")

    assert result.returncode == exitcodes.USAGE
    assert "'forever'" in result.stderr


def test_the_event_table_shows_amounts_and_times_in_full(daemon: DaemonProcess) -> None:
    held = ok(daemon, "allocate", "--mem", "64M").strip()
    renewed = as_json(daemon, "renew", held, "--ttl", "20m")["expires_at"]

    table = ok(daemon, "events", "--allocation", held)

    assert "items={memory=67108864}" in table
    assert f"expires_at={renewed:.0f}" in table
    assert "e+" not in table


@pytest.mark.parametrize("args", [["allocate", "--cluster", "--res", "licence=1"],
                                  ["allocate", "--where", "site=cluster", "--res", "licence=1"],
                                  ["run", "--cluster", "--res", "licence=1", "--", "touch", "{marker}"]])
def test_a_cluster_request_to_a_daemon_without_a_cluster_is_refused_not_served_here(
        daemon: DaemonProcess, tmp_path: Path, args: list[str]) -> None:
    marker = tmp_path / "ran"
    result = cli(daemon, *(a.format(marker=marker) for a in args))

    assert result.returncode == exitcodes.ERROR, result.stdout
    assert "this daemon has no cluster" in result.stderr and result.stdout == ""
    assert daemon.call("allocations.list", {"state": "all"}) == []
    assert not marker.exists()


def test_spill_to_a_daemon_without_a_cluster_is_served_by_the_host(daemon: DaemonProcess) -> None:
    assert ok(daemon, "run", "--spill", "--res", "licence=1", "--", "echo", "here") == "here\n"


def test_the_release_everything_example_of_allocations_help_works_with_none_and_with_some(
        daemon: DaemonProcess) -> None:
    [example] = [line.strip() for line in run_cli("allocations", "--help").stdout.splitlines()
                 if line.strip().startswith("mcpctl") and "release" in line]
    env = dict(os.environ, MCPRES_SOCKET=daemon.socket,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for held in (0, 2):
        for _ in range(held):
            daemon.call("allocate", {"resources": [{"resource": "slot", "amount": 1}], "holder_pid": os.getpid()})
        done = subprocess.run(["bash", "-o", "pipefail", "-c", example], env=env, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, (example, done.stderr)
        assert daemon.call("allocations.list") == []


def test_help_documents_every_exit_code() -> None:
    result = run_cli("--help")

    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for code, meaning in exitcodes.TABLE:
        assert f"{code} {' '.join(meaning.split())}" in text, (code, meaning)


# -- sizes and idempotency --------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ("512M", 536870912),
        ("512m", 536870912),
        ("1G", 1 << 30),
        ("1.5G", 3 << 29),
        ("256MiB", 256 << 20),
        ("64K", 64 << 10),
        ("1048576", 1048576),
    ],
)
def test_mem_accepts_suffixed_sizes_and_plain_bytes(daemon: DaemonProcess, size: str, expected: int) -> None:
    allocation = as_json(daemon, "allocate", "--mem", size)

    assert [(i["resource"], i["amount"]) for i in allocation["items"]] == [("memory", expected)]


def test_the_same_key_twice_gives_the_same_allocation(daemon: DaemonProcess) -> None:
    first = ok(daemon, "allocate", "--res", "slot=1", "--key", "job-42").strip()
    second = ok(daemon, "allocate", "--res", "slot=1", "--key", "job-42").strip()

    assert first == second
    assert active_ids(daemon) == [first]
    assert allocated(daemon)["slot"] == 1


def test_the_same_key_for_a_different_request_is_refused(daemon: DaemonProcess) -> None:
    first = ok(daemon, "allocate", "--res", "slot=1", "--key", "job-42").strip()

    other = cli(daemon, "allocate", "--res", "slot=2", "--key", "job-42")

    assert other.returncode != 0
    assert other.stdout == ""
    assert active_ids(daemon) == [first]


# -- custom resources -------------------------------------------------------


def test_resource_add_registers_a_custom_resource_once(daemon: DaemonProcess) -> None:
    added = cli(daemon, "resource", "add", "licence:x", "--capacity", "3", "--unit", "seats")
    assert added.returncode == 0, added.stderr

    [resource] = [r for r in as_json(daemon, "resources") if r["name"] == "licence:x"]
    assert (resource["type"], resource["capacity"], resource["unit"]) == ("custom", 3, "seats")
    assert (resource["allocated"], resource["free"]) == (0, 3)

    again = cli(daemon, "resource", "add", "licence:x", "--capacity", "3", "--unit", "seats")
    assert again.returncode == exitcodes.ERROR
    assert "licence:x" in again.stderr


def test_a_resource_in_use_cannot_be_removed_until_released(daemon: DaemonProcess) -> None:
    ok(daemon, "resource", "add", "licence:x", "--capacity", "3", "--unit", "seats")
    allocation_id = ok(daemon, "allocate", "--res", "licence:x=1").strip()

    refused = cli(daemon, "resource", "remove", "licence:x")
    assert refused.returncode == exitcodes.ERROR
    assert "licence:x" in [r["name"] for r in as_json(daemon, "resources")]

    ok(daemon, "release", allocation_id)
    removed = cli(daemon, "resource", "remove", "licence:x")
    assert removed.returncode == 0, removed.stderr
    assert "licence:x" not in [r["name"] for r in as_json(daemon, "resources")]


def test_removing_an_unknown_resource_exits_1(daemon: DaemonProcess) -> None:
    result = cli(daemon, "resource", "remove", "licence:nosuch")

    assert result.returncode == exitcodes.ERROR
    assert "licence:nosuch" in result.stderr


# -- output on pipes --------------------------------------------------------


@pytest.mark.parametrize("command", ["status", "resources", "allocations", "events"])
def test_commands_on_a_pipe_print_plain_text_without_escape_codes(daemon: DaemonProcess, command: str) -> None:
    ok(daemon, "allocate", "--gpu", "0.5", "--res", "licence=1")

    result = cli(daemon, command, env={"TERM": "xterm-256color", "COLUMNS": "200"})

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert not ANSI.search(result.stdout), repr(result.stdout)
    assert not BOX_DRAWING.search(result.stdout), result.stdout


def _shows_the_allocation(command: str, data: Any, allocation_id: str) -> bool:
    """Whether `command --json` shows the allocation of gpu=0.5 + licence=1 with this id."""
    if command == "status":
        return bool(data["allocations"]["active"] == 1)
    if command == "resources":
        return {r["name"]: r["allocated"] for r in data}["licence"] == 1.0
    if command == "allocations":
        return [(a["id"], a["state"], {i["resource"]: i["amount"] for i in a["items"]}["licence"]) for a in data] \
            == [(allocation_id, "active", 1.0)]
    return any(e["kind"] == "allocated" and e["allocation_id"] == allocation_id
               and e["detail"]["items"]["licence"] == 1.0 for e in data)


@pytest.mark.parametrize("command", ["status", "resources", "allocations", "events"])
def test_commands_with_json_print_valid_json(daemon: DaemonProcess, command: str) -> None:
    allocation_id = ok(daemon, "allocate", "--gpu", "0.5", "--res", "licence=1").strip()

    data = as_json(daemon, command)

    assert _shows_the_allocation(command, data, allocation_id), data


# -- help -------------------------------------------------------------------


def _command_paths() -> list[tuple[str, ...]]:
    """Every command and subcommand of the Typer app, found by walking it (new ones included)."""
    from mcpctl.app import app

    paths: list[tuple[str, ...]] = []

    def walk(command: Any, path: tuple[str, ...]) -> None:
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            paths.append((*path, name))
            walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return paths


def _command(path: tuple[str, ...]) -> Any:
    from mcpctl.app import app

    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return command


def test_the_walk_finds_every_documented_command() -> None:
    paths = _command_paths()

    for expected in ["status", "resources", "allocations", "allocate", "release", "events", "resource",
                     "resource add", "resource remove", "resource refresh"]:
        assert tuple(expected.split()) in paths


def test_mcpctl_help_lists_every_command() -> None:
    result = run_cli("--help")

    assert result.returncode == 0
    assert "Allocate, release and inspect" in result.stdout
    for path in _command_paths():
        if len(path) == 1 and not _command(path).hidden:  # hidden: aliases, e.g. optimize
            assert re.search(rf"^\s+{re.escape(path[0])}\s+\S", result.stdout, re.MULTILINE), path


@pytest.mark.parametrize("path", _command_paths(), ids=" ".join)
def test_every_command_has_help_text(path: tuple[str, ...]) -> None:
    command = _command(path)
    description = (command.help or "").strip()
    assert description, f"mcpctl {' '.join(path)} has no help text"

    result = run_cli(*path, "--help")

    assert result.returncode == 0, result.stderr
    first_paragraph = description.split("\n\n")[0]
    assert " ".join(first_paragraph.split()) in " ".join(result.stdout.split())


@pytest.mark.parametrize("path", [p for p in _command_paths() if not _command(p).hidden], ids=" ".join)
def test_every_command_help_shows_an_example(path: tuple[str, ...]) -> None:
    result = run_cli(*path, "--help")

    assert result.returncode == 0, result.stderr
    lines = [line.strip() for line in result.stdout.splitlines()]
    assert any(line.startswith(("mcpctl ", "source <(mcpctl ", "id=$(mcpctl ")) for line in lines), result.stdout


@pytest.mark.parametrize("path", _command_paths(), ids=" ".join)
def test_every_option_and_argument_has_help_text(path: tuple[str, ...]) -> None:
    command = _command(path)

    for param in command.params:
        if param.name == "help":
            continue
        assert (getattr(param, "help", None) or "").strip(), f"mcpctl {' '.join(path)}: {param.name} has no help"


def test_mcpresd_help_documents_its_options() -> None:
    result = subprocess.run([str(BIN / "mcpresd"), "--help"], capture_output=True, text=True, timeout=30)

    assert result.returncode == 0, result.stderr
    for option in ("--config", "--socket", "--db", "--gpu-replay"):
        assert re.search(rf"^\s+{re.escape(option)}\b.*\S", result.stdout, re.MULTILINE), option


# -- the fast path and the Typer path agree ---------------------------------


def _typer_option_names(path: tuple[str, ...], kind: str) -> set[str]:
    names: set[str] = set()
    for param in _command(path).params:
        if param.param_type_name != "option" or param.name == "help":
            continue
        is_kind = {"flag": param.is_flag, "list": param.multiple, "value": not param.is_flag and not param.multiple}
        if is_kind[kind]:
            names.update(name for name in param.opts if name.startswith("--"))
    return names


@pytest.mark.parametrize(
    ("fast_names", "kind"),
    [(fast.ALLOCATE_VALUES, "value"), (fast.ALLOCATE_LISTS, "list"), (fast.ALLOCATE_FLAGS, "flag")],
    ids=["values", "lists", "flags"],
)
def test_the_fast_path_accepts_exactly_the_options_of_typer_allocate(fast_names: dict[str, str], kind: str) -> None:
    assert set(fast_names) == _typer_option_names(("allocate",), kind)


@pytest.mark.parametrize(
    ("fast_names", "kind"),
    [(fast.RUN_VALUES, "value"), (fast.RUN_LISTS, "list"), (fast.RUN_FLAGS, "flag")],
    ids=["values", "lists", "flags"],
)
def test_the_fast_path_accepts_exactly_the_options_of_typer_run(fast_names: dict[str, str], kind: str) -> None:
    assert set(fast_names) == _typer_option_names(("run",), kind)


def test_the_fast_path_accepts_exactly_the_options_of_typer_release() -> None:
    assert set(fast.RELEASE_FLAGS) == _typer_option_names(("release",), "flag")
    assert set(fast.RELEASE_VALUES) == _typer_option_names(("release",), "value")
    assert _typer_option_names(("release",), "list") == set()


def test_the_fast_paths_global_options_are_typer_global_options() -> None:
    from mcpctl.app import app

    names = {name for param in typer.main.get_command(app).params for name in getattr(param, "opts", [])}
    assert set(fast.GLOBAL_VALUES) <= names


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, *args: Any) -> int:
        self.calls.append(args)
        return 0


FAST_ALLOCATE_CASES = [
    ["--cpu", "1", "--mem", "64M"],
    ["--pool", "build-*,cost<1", "--members", "2", "--objective", "cost"],
    ["--pool=seats", "--res", "licence=1", "--json"],
    ["--cpu=0.5", "--gpu", "0.5", "--priority", "high"],
    ["--disk", "/=10G", "--disk", "/tmp=1G", "--res", "licence=1", "--res=slot=2"],
    ["--tool", "build", "--exec", "e-1", "--key", "k", "--holder-pid", "123", "--json"],
    ["--gpu", "1", "--env"],
    ["--mem", "512M", "--priority=low", "--json", "--json"],
]


@pytest.mark.parametrize("args", FAST_ALLOCATE_CASES, ids=" ".join)
def test_the_fast_path_and_typer_parse_allocate_alike(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    import mcpctl.commands.allocate
    from mcpctl.app import run_app

    monkeypatch.delenv("MCPRES_SOCKET", raising=False)
    via_fast, via_typer = Recorder(), Recorder()
    monkeypatch.setattr(fast, "run_allocate", via_fast)
    monkeypatch.setattr(mcpctl.commands.allocate, "run_allocate", via_typer)

    assert fast.try_fast(["--socket", "/x.sock", "allocate", *args]) == 0
    assert run_app(["--socket", "/x.sock", "allocate", *args]) == 0

    assert via_fast.calls == via_typer.calls
    assert len(via_fast.calls) == 1


def test_the_fast_path_and_typer_parse_release_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    import mcpctl.commands.release
    from mcpctl.app import run_app

    monkeypatch.delenv("MCPRES_SOCKET", raising=False)
    via_fast, via_typer = Recorder(), Recorder()
    monkeypatch.setattr(fast, "run_release", via_fast)
    monkeypatch.setattr(mcpctl.commands.release, "run_release", via_typer)

    cases = (["release", "a1", "b2"], ["release", "a1", "--json"],
             ["release", "a1", "--measured", "cpu_seconds=1.5,memory_peak=2G"],
             ["release", "--measured=gpu_utilisation=0.5", "a1", "b2", "--json"])
    for args in cases:
        assert fast.try_fast(["--socket", "/x.sock", *args]) == 0
        assert run_app(["--socket", "/x.sock", *args]) == 0

    assert via_fast.calls == via_typer.calls
    assert len(via_fast.calls) == len(cases)


@pytest.mark.parametrize(
    "args",
    [
        ["allocate", "--help"],
        ["allocate", "-h"],
        ["allocate", "--cpu", "1", "--bogus"],
        ["allocate", "--cpu", "1", "--cpu", "2"],
        ["allocate", "--json", "--env", "--cpu", "1"],
        ["allocate", "--cpu"],
        ["allocate", "--holder-pid", "abc", "--cpu", "1"],
        ["release"],
        ["release", "--all"],
        ["release", "a1", "--measured"],
        ["release", "a1", "--measured", "cpu_seconds=1", "--measured", "cpu_seconds=2"],
        ["allocate", "--pool", "p", "--objective", "cheapest"],
        ["status"],
    ],
    ids=" ".join,
)
def test_the_fast_path_hands_anything_unusual_to_typer(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    recorder = Recorder()
    monkeypatch.setattr(fast, "run_allocate", recorder)
    monkeypatch.setattr(fast, "run_release", recorder)

    assert fast.try_fast(args) is None
    assert recorder.calls == []


OUTCOME_CASES = [
    ["--res", "slot=1", "--json"],
    ["--res", "slot=1", "--gpu", "0.5", "--priority", "high", "--tool", "t", "--exec", "e", "--json"],
    ["--mem", "1M", "--key", "same", "--json"],
    ["--res", "slot=11"],
    ["--res", "nosuch=1"],
    ["--cpu", "abc"],
    ["--mem", "12Q"],
    ["--cpu", "1", "--priority", "urgent"],
    ["--cpu", "0.1", "--holder-pid", "0"],
    ["--cpu", "0.1", "--holder-pid", "999999999"],
    ["--res", "licence=1", "--key="],
]
VOLATILE = {"id", "idempotency_key", "requester_pid", "created_at", "granted_at", "released_at", "expires_at", "wait_until", "preempt_at"}
VOLATILE |= {f"{key}_iso" for key in VOLATILE}


@pytest.mark.parametrize("args", OUTCOME_CASES, ids=" ".join)
def test_the_fast_path_and_typer_give_the_same_outcome(daemon: DaemonProcess, args: list[str]) -> None:
    by_fast = cli(daemon, "allocate", *args)
    by_typer = run_typer_path("allocate", *args, socket_path=daemon.socket)

    assert by_fast.returncode == by_typer.returncode, (by_fast.stderr, by_typer.stderr)
    assert bool(by_fast.stdout) == bool(by_typer.stdout)
    assert bool(by_fast.stderr) == bool(by_typer.stderr)
    if by_fast.returncode == 0:
        fast_result, typer_result = json.loads(by_fast.stdout), json.loads(by_typer.stdout)
        assert {k: v for k, v in fast_result.items() if k not in VOLATILE} == {
            k: v for k, v in typer_result.items() if k not in VOLATILE
        }


@pytest.mark.parametrize("args, typo, suggestion", [(["statsu"], "statsu", "status"),
                                                    (["pool", "creat"], "creat", "create")])
def test_a_misspelt_command_is_refused_with_one_suggestion(args: list[str], typo: str, suggestion: str) -> None:
    done = run_cli(*args)

    assert done.returncode == 2
    assert f"No such command '{typo}'" in done.stderr
    assert done.stderr.count("Did you mean") == 1 and f"'{suggestion}'" in done.stderr


def test_the_command_a_line_names_is_built_alone_with_the_same_help_and_options() -> None:
    # run_app builds only the command its arguments name (Typer's reading of every signature was most of a
    # `mcpctl status`); that command must read exactly as in the whole app, global options before it included.
    import click

    from mcpctl.app import cli_command

    def help_of(group: click.Group, name: str) -> str:
        root = click.Context(group, info_name="mcpctl", **group.context_settings)  # as make_context does
        command = group.commands[name]
        return str(command.get_help(click.Context(command, info_name=name, parent=root)))

    full = cli_command()
    for name in full.commands:
        for args in ([name, "--help"], ["--socket", "/x", name], ["--retry-for=0", name], ["--socket=/x", name]):
            lean = cli_command(args)
            assert list(lean.commands) == [name], args
            assert help_of(lean, name) == help_of(full, name), name
            assert "-h, --help" in help_of(lean, name)
    for args in (["--help"], [], ["statsu"], ["--version"], ["--socket"]):
        assert cli_command(args) is full, args


@pytest.mark.parametrize("option, field", [("--tool", "tool_id"), ("--key", "idempotency_key")])
def test_a_refused_value_is_named_by_the_option_that_gave_it(daemon: DaemonProcess, option: str, field: str) -> None:
    done = cli(daemon, "allocate", "--res", "slot=1", option, "x" * 300)

    assert done.returncode == 2
    assert done.stderr == f"mcpctl: {option} ({field}) is longer than 200 characters\n"
