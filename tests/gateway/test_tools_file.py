"""The tools file, the gateway's wire helpers and its command line: pure checks, no daemon."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from mcpctl.commands import gateway as gateway_command
from mcpctl.gateway import default_name, wire
from mcpctl.gateway.tools import GatewayConfig, ToolsFileError, load, parse

EXAMPLE = """
[server]
name = "render"
on_broker_down = "closed"
progress_interval = "250ms"
cancel_grace = "2m"

[[tool]]
match = "render_preview"

[[tool]]
match = "render_*"
gpu = 1
mem = "8G"
cpu = "2"
res = ["licence=1"]
priority = "high"
wait = "forever"
ttl = "2h"
strategy = "best-fit"

[[tool]]
match = "encode"
gpu = "0.5"
res = { slot = 2 }
pool = "build-*"
members = 2
where = ["memory>=40G"]
"""


def config(text: str) -> GatewayConfig:
    return parse(tomllib.loads(text), "tools.toml")


def test_the_first_matching_entry_decides_and_an_entry_that_asks_for_nothing_leaves_tools_ungated() -> None:
    example = config(EXAMPLE)
    assert example.server == "render" and example.on_broker_down == "closed"
    assert example.progress_interval == 0.25 and example.cancel_grace == 120
    assert example.rule_for("render_preview") is None
    assert example.rule_for("list_scenes") is None
    rule = example.rule_for("render_frame")
    assert rule is not None
    assert rule.allocate_params("render/render_frame", "abc/1") == {
        "resources": [{"resource": "gpu", "amount": 1.0}, {"resource": "cpu", "amount": 2.0},
                      {"resource": "memory", "amount": 8.0 * 2**30}, {"resource": "licence", "amount": 1.0}],
        "priority": "high", "tool_id": "render/render_frame", "execution_id": "abc/1", "wait": "forever",
        "detach": True, "ttl": 7200.0, "strategy": "best-fit",
    }
    assert rule.summary == "gpu 1, cpu 2, mem 8G, licence 1"


def test_defaults_wait_ten_minutes_at_normal_priority_and_never_name_a_holder() -> None:
    rule = config('[[tool]]\nmatch = "*"\ngpu = 1\n').rule_for("anything")
    assert rule is not None
    params = rule.allocate_params("s/anything", "x/1")
    assert params["wait"] == 600.0 and params["priority"] == "normal"
    assert "holder_pid" not in params and "idempotency_key" not in params
    defaults = config("")
    assert (defaults.on_broker_down, defaults.progress_interval, defaults.stop_grace, defaults.cancel_grace) == (
        "open", 1.0, 1.5, 30.0)


def test_pools_shares_and_resource_tables() -> None:
    rule = config(EXAMPLE).rule_for("encode")
    assert rule is not None
    assert rule.resources == ({"resource": "gpu", "amount": 0.5}, {"resource": "slot", "amount": 2.0},
                              {"resource": "pool:build-*", "amount": 2})
    assert rule.where == ("memory>=40G",)


@pytest.mark.parametrize(("text", "message"), [
    ('[[tool]]\nmatch = "x"\ngpus = 1\n', "tools.toml: [[tool]] #1 (match = 'x'): unknown key 'gpus'"),
    ('[[tool]]\nmatch = "x"\ngpu = 1.5\n', "gpu: ask for a whole number of GPUs or a share below 1"),
    ('[[tool]]\nmatch = "x"\ngpu = 0\n', "gpu: a positive finite number"),
    ('[[tool]]\nmatch = "x"\ngpu = true\n', "gpu: a positive number"),
    ('[[tool]]\nmatch = "x"\nmem = "8Q"\n', "mem: not a size: '8Q'"),
    ('[[tool]]\nmatch = "x"\ncpu = 1\npriority = "urgent"\n', "priority: one of low, normal, high, critical"),
    ('[[tool]]\nmatch = "x"\ncpu = 1\nwait = "soon"\n', "wait: not a duration: 'soon'"),
    ('[[tool]]\nmatch = "x"\ncpu = 1\nwait = "400d"\n', "wait: between 0 and 365 days"),
    ('[[tool]]\nmatch = "x"\ncpu = 1\nttl = "forever"\n', "ttl: a finite duration"),
    ('[[tool]]\nmatch = "x"\ncpu = 1\nstrategy = "fastest"\n', "strategy: one of first-fit"),
    ('[[tool]]\nmatch = "x"\nres = ["licence"]\n', "res: entries are \"NAME=AMOUNT\""),
    ('[[tool]]\nmatch = "x"\nres = { licence = -1 }\n', "res licence: a positive finite number"),
    ('[[tool]]\nmatch = "x"\ncpu = 1\nmembers = 2\n', "members: goes with pool"),
    ('[[tool]]\nmatch = "x"\nwait = "1m"\n', "asks for nothing"),
    ('[[tool]]\ngpu = 1\n', "[[tool]] #1: match: every entry needs a tool name or glob"),
    ("[tools]\n", "unknown key 'tools'"),
    ('[server]\non_broker_down = "maybe"\n', "[server] on_broker_down: must be \"open\" or \"closed\""),
    ('[server]\nname = "a/b"\n', "[server] name: at most 100 characters, no '/'"),
    ('[server]\nprogress_interval = "0s"\n', "[server] progress_interval: a duration greater than zero"),
    ('[server]\ncolour = 1\n', "[server]: unknown key 'colour'"),
])
def test_a_bad_tools_file_is_refused_naming_the_file_the_entry_and_the_key(text: str, message: str) -> None:
    with pytest.raises(ToolsFileError) as refused:
        config(text)
    assert message in str(refused.value)
    assert str(refused.value).startswith("tools.toml: ")


def test_a_file_that_is_missing_or_not_toml_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ToolsFileError, match="no such file"):
        load(str(tmp_path / "missing.toml"))
    broken = tmp_path / "broken.toml"
    broken.write_text("[[tool]\nmatch = 1\n")
    with pytest.raises(ToolsFileError, match=r"broken.toml: not valid TOML: .*line 1"):
        load(str(broken))


@pytest.mark.parametrize(("command", "name"), [
    (["uvx", "mcp-server-time"], "mcp-server-time"),
    (["npx", "-y", "@modelcontextprotocol/server-filesystem@1.2", "/srv"], "server-filesystem"),
    (["/usr/bin/python3", "-m", "render_server"], "render_server"),
    (["docker", "run", "-i", "--rm", "mcp/git"], "git"),
    (["./bin/my server"], "my_server"),
    (["python3"], "mcp"),
])
def test_a_server_is_named_after_its_command_unless_the_file_or_name_says(command: list[str], name: str) -> None:
    assert default_name(command) == name


def test_server_progress_is_moved_up_total_and_all() -> None:
    message = {"jsonrpc": "2.0", "method": "notifications/progress",
               "params": {"progressToken": "t", "progress": 0, "total": 3, "message": "é"}}
    assert wire.shift_progress(message, 5) == \
        '{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":"t","progress":5,"total":8,' \
        '"message":"é"}}\n'.encode()
    assert wire.shift_progress({"params": {"progress": "x"}}, 1) is None


@pytest.mark.parametrize(("result", "task"), [
    ({"task": {"taskId": "a", "status": "working", "ttl": 60000}}, ("a", 60000.0, "working")),
    ({"resultType": "task", "task": {"taskId": "b", "status": "working", "ttl": None}}, ("b", None, "working")),
    ({"resultType": "task", "taskId": "c", "status": "working"}, ("c", None, "working")),
    ({"resultType": "complete", "task": {"taskId": "d"}}, None),
    ({"resultType": "input_required"}, None),
    ({"content": [], "isError": True}, None),
    ("not a result", None),
])
def test_results_that_start_a_task(result: Any, task: Any) -> None:
    assert wire.task_of(result) == task


def test_the_gateways_own_answers_have_the_documented_shapes() -> None:
    assert wire.tool_error(4, "no") == \
        b'{"jsonrpc":"2.0","id":4,"result":{"content":[{"type":"text","text":"mcpres: no"}],"isError":true}}\n'
    assert wire.error_response("a", wire.GatewayErrorCode.BROKER_UNREACHABLE, "down") == \
        b'{"jsonrpc":"2.0","id":"a","error":{"code":1101,"message":"mcpres: down"}}\n'
    for code in wire.GatewayErrorCode:
        assert not -32768 <= code <= -32000
        assert code.__doc__
    assert wire.id_key(1) != wire.id_key("1")


def test_a_bad_tools_file_exits_2_with_the_file_and_key_on_stderr(tmp_path: Path) -> None:
    tools = tmp_path / "tools.toml"
    tools.write_text('[[tool]]\nmatch = "render_*"\ngpu = "lots"\n')
    done = subprocess.run([sys.executable, "-m", "mcpctl.gateway", "--tools", str(tools), "--", "true"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"mcpctl gateway: {tools}: [[tool]] #1 (match = 'render_*') gpu: ")


def test_a_server_that_cannot_be_started_exits_127(tmp_path: Path) -> None:
    tools = tmp_path / "tools.toml"
    tools.write_text("")
    done = subprocess.run([sys.executable, "-m", "mcpctl.gateway", "--socket", str(tmp_path / "none.sock"),
                           "--tools", str(tools), "--", str(tmp_path / "no-such-server")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 127 and "command not found" in done.stderr


def test_the_typer_command_takes_the_same_options(tmp_path: Path) -> None:
    app = typer.Typer()

    @app.callback()
    def main(ctx: typer.Context) -> None:
        ctx.obj = {"socket": str(tmp_path / "none.sock"), "retry_for": 0.0}

    gateway_command.register(app)
    tools = tmp_path / "tools.toml"
    tools.write_text("[server]\nname = 'x'\nfoo = 1\n")
    result = CliRunner().invoke(app, ["gateway", "--tools", str(tools), "--", "true"])
    assert result.exit_code == 2
    assert "[server]: unknown key 'foo'" in result.output
    assert CliRunner().invoke(app, ["gateway", "--", "true"]).exit_code == 2  # --tools is required
    help_text = CliRunner().invoke(app, ["gateway", "--help"]).output
    assert "--tools" in help_text and "--name" in help_text


def test_the_gateway_starts_without_typer_rich_or_the_sdk_and_the_command_module_without_asyncio() -> None:
    probe = ("import sys, mcpctl.gateway.cli, mcpctl.gateway.proxy; "
             "print(sorted(m for m in ('typer', 'click', 'rich', 'mcp', 'pydantic') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    probe = "import sys, mcpctl.commands.gateway; print('asyncio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
