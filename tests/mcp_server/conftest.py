"""The MCP server's test kit: an agent (an SDK client of either protocol era) talking to the server over stdio."""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final, Literal

import anyio
import pytest
from mcp import Client
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from tests.conftest import DaemonProcess

ROOT = Path(__file__).resolve().parents[2]
Era = Literal["2025-11-25", "2026-07-28"]
LEGACY: Final[Era] = "2025-11-25"
MODERN: Final[Era] = "2026-07-28"
ERAS = (LEGACY, MODERN)
Agent = ClientSession | Client
"""Both clients offer list_tools, call_tool, list_resources and read_resource alike."""


def server_command(socket_path: str) -> list[str]:
    """How an agent host starts the server: the installed `mcpctl --socket SOCK mcp-server`."""
    return [str(Path(sys.executable).parent / "mcpctl"), "--socket", socket_path, "mcp-server"]


def server_parameters(socket_path: str) -> StdioServerParameters:
    command, *args = server_command(socket_path)
    return StdioServerParameters(command=command, args=args, cwd=str(ROOT))


@asynccontextmanager
async def agent(socket_path: str, era: Era) -> AsyncIterator[Agent]:
    """An agent session: the 2025-11-25 handshake (ClientSession), or the 2026-07-28 Client in auto mode."""
    parameters = server_parameters(socket_path)
    if era == LEGACY:
        async with stdio_client(parameters) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            yield session
    else:
        async with Client(parameters, mode="auto") as client:
            assert client.protocol_version == MODERN
            yield client


async def eventually(check: Callable[[], Any], within: float = 1.0, every: float = 0.02) -> Any:
    """Poll `check` until it returns something truthy; fail after `within` seconds with its last value."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value or time.monotonic() >= deadline:
            assert value, f"not within {within}s: last saw {value!r}"
            return value
        await anyio.sleep(every)


async def first_sample(daemon: DaemonProcess, within: float = 10.0) -> None:
    """Return once the daemon has sampled the host (metrics.current has a `ts`)."""
    await eventually(lambda: daemon.call("metrics.current").get("ts") is not None, within, 0.1)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
