"""`mcpctl mcp-server` the command: the SDK only when it runs, a clear message without it, and it serves."""

from __future__ import annotations

import subprocess
import sys

import anyio
import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from mcpctl.commands.mcp_server import MISSING_SDK
from tests.conftest import DaemonProcess
from tests.mcp_server.conftest import ROOT

APP_WITH_THE_COMMAND = """
import sys
{before}
from mcpctl.app import app, run_app
from mcpctl.commands import mcp_server
if not any(c.name == "mcp-server" for c in app.registered_commands):
    mcp_server.register(app)
{after}
"""
"""mcpctl's own Typer app, with the command registered if app.py does not register it yet."""


def python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, timeout=30)


def test_the_cli_and_its_help_never_import_the_sdk() -> None:
    probe = APP_WITH_THE_COMMAND.format(before="", after=(
        "code = run_app(['--help']) + run_app(['mcp-server', '--help'])\n"
        "print(code, sorted(m for m in ('mcp', 'mcp_types', 'pydantic', 'anyio') if m in sys.modules))"))
    done = python(probe)
    assert done.returncode == 0, done.stderr
    assert "mcp-server" in done.stdout and "Serve the broker to an AI agent over MCP" in done.stdout
    assert done.stdout.splitlines()[-1] == "0 []"


def test_without_the_sdk_it_says_what_to_install_and_exits_2() -> None:
    done = python(APP_WITH_THE_COMMAND.format(before="sys.modules['mcp'] = None",
                                              after="sys.exit(run_app(['mcp-server']))"))
    assert (done.returncode, done.stdout, done.stderr) == (2, "", MISSING_SDK + "\n")


@pytest.mark.anyio
async def test_the_command_serves_the_daemon_named_by_the_global_socket_option(daemon: DaemonProcess) -> None:
    bootstrap = APP_WITH_THE_COMMAND.format(before="", after="sys.exit(run_app(sys.argv[1:]))")
    parameters = StdioServerParameters(command=sys.executable, cwd=str(ROOT),
                                       args=["-c", bootstrap, "--socket", daemon.socket, "mcp-server"])
    with anyio.fail_after(30):
        async with stdio_client(parameters) as (read, write), ClientSession(read, write) as session:
            initialized = await session.initialize()
            result = await session.call_tool("host_status", {})
    assert initialized.server_info.name == "mcpres"
    assert not result.is_error and result.structured_content is not None
    assert result.structured_content["daemon"]["socket"] == daemon.socket
