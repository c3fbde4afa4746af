"""An MCP server built with the official SDK (`MCPServer`), for wrapping in the gateway's tests.

Tools: sleep, progress, crash, hang, big (a result of about 1 MiB), unicode
(non-ASCII text and escaped newlines), noise (writes to stderr).
"""

from __future__ import annotations

import os
import sys
import time

import anyio
from mcp.server.mcpserver import Context, MCPServer

app = MCPServer("fixture")

UNICODE_TEXT = ("naïve café — ✓ 日本語 🚀\nsecond line\twith a tab, a \"quote\", "
                "a backslash \\ and \u2028 U+2028")


@app.tool()
async def sleep(seconds: float) -> str:
    """Sleep, then say so."""
    await anyio.sleep(seconds)
    return f"slept {seconds}"


@app.tool()
async def progress(steps: int, ctx: Context, delay: float = 0.0) -> str:
    """Report progress 1..steps of steps, then finish."""
    for step in range(1, steps + 1):
        await ctx.report_progress(step, steps, f"step {step}")
        if delay:
            await anyio.sleep(delay)
    return f"{steps} steps"


@app.tool()
async def crash(code: int = 3) -> str:
    """Exit the whole server at once, without answering."""
    sys.stderr.flush()
    os._exit(code)


@app.tool()
async def hang() -> str:
    """Block the server's event loop for an hour: it answers nothing, not even cancellation."""
    time.sleep(3600)
    return "unreachable"


@app.tool()
async def big(size: int = 1024 * 1024) -> str:
    """A text result of `size` characters."""
    return ("0123456789abcdef" * (size // 16 + 1))[:size]


@app.tool()
async def unicode() -> str:
    """Non-ASCII text, newlines and escapes that JSON must carry."""
    return UNICODE_TEXT


@app.tool()
async def noise(lines: int = 20) -> str:
    """Write lines to stderr, which the gateway leaves to its host."""
    for number in range(lines):
        print(f"noise {number}: {{\"jsonrpc\": \"2.0\", \"not\": \"a message\"}}", file=sys.stderr, flush=True)
    return f"{lines} lines of noise"


if __name__ == "__main__":
    app.run("stdio")
