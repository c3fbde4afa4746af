"""Man pages for mcpctl, written from the Typer app itself, so they say what `--help` says.

`python -m mcpctl.man docs/man` writes mcpctl.1 and one mcpctl-COMMAND.1 per command (and subcommand);
tests/e2e/test_cli_scripts.py fails when the committed pages differ from what this writes. No date in the
pages (only the version), so they change only when the CLI does.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from mcpctl.app import cli_command
from mcpresd.protocol import VERSION


def pages() -> dict[str, str]:
    """File name -> roff text, for mcpctl and every command under it."""
    root = cli_command()
    found: dict[str, str] = {}

    def walk(command: Any, parent: typer.Context | None, path: tuple[str, ...]) -> None:
        ctx = typer.Context(command, info_name=path[-1], parent=parent)
        found["-".join(path) + ".1"] = page(command, ctx, path)
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            if not getattr(sub, "hidden", False):
                walk(sub, ctx, (*path, name))

    walk(root, None, ("mcpctl",))
    return found


def page(command: Any, ctx: typer.Context, path: tuple[str, ...]) -> str:
    title = "-".join(path)
    summary = (command.help or "").split("\n\n", 1)[0].replace("\n", " ").strip()
    lines = [f'.TH {_escape(title.upper())} 1 "" "mcpres {VERSION}" "mcpres"',
             ".SH NAME", f"{_escape(title)} \\- {_escape(summary)}",
             ".SH SYNOPSIS", f".B {_escape(' '.join(path))}", _escape(" ".join(command.collect_usage_pieces(ctx)))]
    lines += [".SH DESCRIPTION", *_text(command.help or "")]
    options = [record for param in command.get_params(ctx) if (record := param.get_help_record(ctx))]
    if options:
        lines.append(".SH OPTIONS")
        for names, help_text in options:
            lines += [".TP", f".B {_escape(names)}", _escape(" ".join(help_text.split()))]
    subcommands = sorted(getattr(command, "commands", {}).items())
    if subcommands:
        lines.append(".SH COMMANDS")
        for name, sub in subcommands:
            lines += [".TP", f".B {_escape(name)}", _escape(sub.get_short_help_str(limit=300))]
    if command.epilog:
        lines += [".SH EXIT STATUS", *_text(command.epilog.removeprefix("Exit codes:").strip())]
    related = ["mcpctl(1)"] if len(path) > 1 else []
    related += [f"{'-'.join((*path, name))}(1)" for name, _ in subcommands]
    if related:
        lines += [".SH SEE ALSO", _escape(", ".join(related))]
    return "\n".join(lines) + "\n"


def _text(help_text: str) -> list[str]:
    """Paragraphs as .PP; a `\\b` block (examples) kept line by line in .nf/.fi."""
    out: list[str] = []
    for paragraph in help_text.split("\n\n"):
        if not paragraph.strip():
            continue
        if paragraph.startswith("\b"):
            out += [".PP", ".nf", *(_escape(line) for line in paragraph.removeprefix("\b\n").splitlines()), ".fi"]
        else:
            out += [".PP", _escape(" ".join(paragraph.split()))]
    return out


def _escape(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def main(argv: list[str]) -> int:
    """Write the pages into the directory given (default docs/man)."""
    target = Path(argv[0] if argv else "docs/man")
    target.mkdir(parents=True, exist_ok=True)
    written = pages()
    for stale in target.glob("mcpctl*.1"):
        if stale.name not in written:
            stale.unlink()
    for name, text in written.items():
        (target / name).write_text(text)
    print(f"wrote {len(written)} pages to {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
