"""The Typer application: global options in the callback, one module per command."""

from __future__ import annotations

import copy
import re
import sys
from typing import Annotated, Any

import typer

from mcpctl import exitcodes
from mcpctl.actions import RETRY_FOR, RETRY_FOR_ENV, UsageError, configure_retry, fail, quiet_stdout
from mcpctl.commands import (
    alerts,
    allocate,
    allocations,
    budget,
    budgets,
    completion,
    db,
    events,
    explain,
    gateway,
    mcp_server,
    metrics,
    optimise,
    pool,
    pools,
    predict,
    recommend,
    release,
    renew,
    resource,
    resources,
    run,
    status,
    top,
    usage,
    wait,
)
from mcpresd.protocol import VERSION, resolve_socket

EXIT_CODES = "\n\n".join(f"{code}  {meaning}" for code, meaning in exitcodes.TABLE)

app = typer.Typer(
    name="mcpctl",
    help="Allocate, release and inspect this machine's resources through mcpresd.",
    epilog=f"Exit codes:\n\n{EXIT_CODES}\n\n{exitcodes.RUN_NOTE}",
    no_args_is_help=True,
    suggest_commands=False,  # Click 8.2+ says "Did you mean" itself: Typer's own made it twice
    add_completion=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"mcpctl {VERSION}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    socket: Annotated[
        str | None,
        typer.Option(
            "--socket",
            metavar="PATH",
            help="Daemon socket. Default: $MCPRES_SOCKET, else your daemon's socket "
                 "($XDG_RUNTIME_DIR/mcpres/mcpresd.sock, else /run/user/UID/mcpres/, else /tmp/mcpres-UID/) if it "
                 "exists, else the system daemon's (/run/mcpres/mcpresd.sock) if it exists; `mcpctl status` says "
                 "which and why.",
        ),
    ] = None,
    retry_for: Annotated[
        str | None,
        typer.Option(
            "--retry-for",
            envvar=RETRY_FOR_ENV,
            metavar="DURATION",
            help=f"While the daemon is unreachable, keep retrying this long before exit 5, saying so on stderr "
                 f"(0: do not retry; forever). Default {RETRY_FOR} for a connection that broke once it was up "
                 "(a daemon restarting); with no daemon at the first contact (no socket, or a refused one), exit 5 "
                 "at once unless this is given.",
        ),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    try:
        seconds = configure_retry(retry_for)
    except UsageError as error:
        raise typer.BadParameter(str(error).removeprefix("--retry-for: "), param_hint="'--retry-for'") from None
    choice = resolve_socket(socket)
    ctx.obj = {"socket": choice.path, "socket_choice": choice, "retry_for": seconds}


for module in (status, resources, allocations, allocate, run, wait, explain, renew, release, events, top, alerts,
               metrics, predict, pools, budgets, usage, recommend, optimise, mcp_server, gateway, completion):
    module.register(app)
app.add_typer(resource.app, name="resource")
app.add_typer(pool.app, name="pool")
app.add_typer(budget.app, name="budget")
app.add_typer(db.app, name="db")


class OutputClosed(BrokenPipeError):
    """Stdout's reader went away; unlike a plain EPIPE, Click lets it through (it would exit 1 on one)."""


class OutputFailed(OSError):
    """Stdout could not be written (a full disk, /dev/full): the output is lost, which is a failure."""


class _GuardedStdout:
    """sys.stdout whose EPIPE is an OutputClosed (the command stops printing, and `run_app` gives its status) and
    whose other write errors are an OutputFailed."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            written: int = self._stream.write(text)
        except BrokenPipeError:
            raise OutputClosed() from None
        except OSError as error:
            raise OutputFailed(error.errno, error.strerror) from None
        return written

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise OutputClosed() from None
        except OSError as error:
            raise OutputFailed(error.errno, error.strerror) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def example_blocks(text: str) -> str:
    """Help text whose examples are never re-wrapped mid-command: an indented paragraph (a block of command
    lines) gets Click's `\\b` (keep as is), and `Examples: a; b` on one line becomes such a block."""
    paragraphs = []
    for paragraph in text.split("\n\n"):
        head, sep, rest = paragraph.partition(":")
        if head in ("Example", "Examples") and sep and rest.strip():
            commands = re.split(r";\s+(?=mcpctl\b)", " ".join(rest.split()).rstrip(";"))
            paragraphs += [f"{head}:", "\b\n" + "\n".join(f"  {command}" for command in commands)]
        elif paragraph.strip() and all(line.startswith(" ") for line in paragraph.splitlines()):
            paragraphs.append("\b\n" + paragraph)
        else:
            paragraphs.append(paragraph)
    return "\n\n".join(paragraphs)


def _keep_examples(command: Any) -> None:
    if command.help:
        command.help = example_blocks(command.help)
    for sub in getattr(command, "commands", {}).values():
        _keep_examples(sub)


_commands: dict[str | None, Any] = {}
GLOBAL_VALUES = ("--socket", "--retry-for")
"""The callback's options that take a value (skipped to find the command a command line names)."""


def cli_command(args: list[str] | None = None) -> Any:
    """The Click command Typer builds from `app`, its help examples kept as written (built once).

    Given a command line that names a command, only that command is built: Typer reads every command's
    signature (its type hints) to make its Click options, ~70 ms for all of them against a few for one, and
    that was most of a `mcpctl status`. Anything else (no command, `--help` first, a misspelt name that Click
    answers with the names it knows, completion, the man pages) gets the whole app."""
    target = None if args is None else _named_command(args)
    command = _commands.get(target)
    if command is None:
        command = _commands[target] = typer.main.get_command(app if target is None else _only(target))
        _keep_examples(command)
    return command


def _named_command(args: list[str]) -> str | None:
    """The command `args` names after the global options, if it is one of the app's; else None."""
    index = 0
    while index < len(args):
        arg = args[index]
        if arg in GLOBAL_VALUES:
            index += 2
        elif arg.startswith(tuple(f"{name}=" for name in GLOBAL_VALUES)):
            index += 1
        elif arg.startswith("-"):
            return None  # --help, --version, or something Click should judge with the whole app
        else:
            return arg if arg in _names() else None
    return None


def _names() -> set[str]:
    return ({info.name or typer.main.get_command_name(info.callback.__name__)
             for info in app.registered_commands if info.callback is not None}
            | {info.name for info in app.registered_groups if info.name})


def _only(name: str) -> typer.Typer:
    """`app` with its callback and the one command (or group of commands) called `name`."""
    lean = copy.copy(app)
    lean.registered_commands = [info for info in app.registered_commands if info.callback is not None
                                and (info.name or typer.main.get_command_name(info.callback.__name__)) == name]
    lean.registered_groups = [info for info in app.registered_groups if info.name == name]
    return lean


def run_app(args: list[str]) -> int:
    """Run the Typer app; a reader that stopped reading what a command printed (`| head`) is no failure of the
    command: no traceback, exit 0 (a command that failed said so on stderr before printing anything)."""
    from mcpctl import complete

    if complete.completing():
        complete.prepare()
    real = sys.stdout
    if real is not None:
        sys.stdout = _GuardedStdout(real)
    try:
        cli_command(args)(args=args, prog_name="mcpctl", standalone_mode=True)
    except SystemExit as exit:
        code = exit.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except OutputClosed:
        quiet_stdout()
        return exitcodes.OK
    except OutputFailed as error:
        quiet_stdout()
        return fail(f"could not write to stdout: {error.strerror}", exitcodes.ERROR)
    finally:
        if real is not None:
            sys.stdout = real
    return 0
