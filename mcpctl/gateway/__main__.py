"""`python -m mcpctl.gateway [--socket PATH] --tools FILE [--name NAME] -- CMD [ARGS]...`, without Typer."""

from __future__ import annotations

import sys

from mcpctl.gateway.cli import parse_and_run

raise SystemExit(parse_and_run(sys.argv[1:]))
