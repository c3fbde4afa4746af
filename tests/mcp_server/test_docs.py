"""docs/mcp-server.md cannot drift from the server: every tool, argument and resource it serves is documented."""

from __future__ import annotations

import re

import pytest

from mcpctl.commands.mcp_server import MISSING_SDK
from mcpctl.mcp_server import build_server
from tests.mcp_server.conftest import ROOT

DOC = (ROOT / "docs" / "mcp-server.md").read_text()


def section(tool: str) -> str:
    start = DOC.index(f"### `{tool}`")
    end = DOC.find("\n## ", start)
    following = DOC.find("\n### ", start + 1)
    return DOC[start:min(i for i in (end, following, len(DOC)) if i != -1)]


@pytest.mark.anyio
async def test_every_tool_and_argument_is_documented_in_its_section() -> None:
    tools = await build_server("/nonexistent.sock").list_tools()
    assert [f"### `{t.name}`" in DOC for t in tools] == [True] * len(tools)
    for tool in tools:
        documented = set(re.findall(r"^\| `(\w+)` \|", section(tool.name), re.MULTILINE))
        assert documented == set(tool.input_schema.get("properties", {})), tool.name


@pytest.mark.anyio
async def test_every_resource_is_documented() -> None:
    resources = await build_server("/nonexistent.sock").list_resources()
    assert resources and all(f"| `{r.uri}` |" in DOC for r in resources)


def test_the_missing_sdk_message_is_the_documented_one() -> None:
    assert f"`{MISSING_SDK}`" in DOC
