"""`mcpctl completion SHELL`: the shell completion script, to source."""

from __future__ import annotations

from typing import Annotated

import typer

from mcpctl import complete
from mcpctl.output import usage


def completion(
    shell: Annotated[str, typer.Argument(metavar="SHELL", help="bash, zsh or fish.",
                                         autocompletion=lambda: list(complete.SHELLS))],
) -> None:
    """Print the completion script for a shell: commands, options, choices, and allocation ids, resource and
    pool names from the daemon (silent when none answers in half a second).

    Examples:

      source <(mcpctl completion bash)        # in ~/.bashrc

      mcpctl completion zsh > "${fpath[1]}/_mcpctl"

      mcpctl completion fish > ~/.config/fish/completions/mcpctl.fish
    """
    if shell not in complete.SHELLS:
        usage(f"completion takes one of {', '.join(complete.SHELLS)}; got {shell!r}")
    print(complete.script(shell))


def register(app: typer.Typer) -> None:
    app.command()(completion)
