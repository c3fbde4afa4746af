"""`mcpresd`: parse options, load the config, run the daemon."""

from __future__ import annotations

import argparse
import sys
from functools import partial

from mcpresd import __version__

EPILOG = """\
examples:
  mcpresd                              run on embedded defaults (per-user socket and database)
  mcpresd --config config/mcpresd.toml
  mcpresd --socket /tmp/m.sock --db /tmp/m.db --gpu-replay tests/fixtures/h100-nvml-capture.json

Options given here override the config file, which overrides the embedded defaults.
SIGHUP re-reads the config file (resources, log level, scheduler and monitor
settings) without dropping allocations; a file that does not load is ignored.
Under systemd it speaks sd_notify (Type=notify, watchdog) and accepts a socket
passed by socket activation (mcpresd.socket).

One daemon per database: it holds <db>.lock for its whole life.

exit status:
  0  stopped by SIGTERM or SIGINT
  1  failed (a damaged database, a store failure, the database deleted while serving)
  2  bad options or config file
  3  another daemon holds the database or serves the socket
  4  a path cannot be used (unsafe directory or link, permission, read-only or full file system)
"""


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(
        prog="mcpresd",
        description="mcpres daemon: brokers CPU, memory, disks, network, GPUs and custom resources "
        "on this machine over JSON-RPC 2.0 on a Unix socket.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cli.add_argument("--config", metavar="PATH", help="TOML config file (see config/mcpresd.toml)")
    cli.add_argument(
        "--socket",
        metavar="PATH",
        help="Unix socket to serve (default: $XDG_RUNTIME_DIR/mcpres/mcpresd.sock, else /tmp/mcpres-UID/)",
    )
    cli.add_argument(
        "--db",
        metavar="PATH",
        help="SQLite database (default: $XDG_STATE_HOME/mcpresd/mcpresd.db, else ~/.local/state/mcpresd/)",
    )
    cli.add_argument(
        "--gpu-replay",
        metavar="PATH",
        help="take GPUs from a recorded NVML capture (JSON) instead of the NVIDIA driver",
    )
    cli.add_argument("--socket-mode", metavar="MODE", help="octal mode of the socket (default 0600)")
    cli.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="default info")
    cli.add_argument("--version", action="version", version=f"mcpresd {__version__}")
    return cli


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # The daemon serves a Unix socket and never speaks TLS: keep asyncio from loading OpenSSL (~4 MiB of RSS).
    # Before anything imports asyncio, hence the imports below.
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]
    from mcpresd.config import ConfigError, load

    # SIGHUP reloads with the same file and the same command-line overrides.
    reload = partial(
        load,
        args.config,
        socket=args.socket,
        database=args.db,
        gpu_replay=args.gpu_replay,
        socket_mode=args.socket_mode,
        log_level=args.log_level,
    )
    try:
        config = reload()
    except ConfigError as error:
        print(f"mcpresd: {error}", file=sys.stderr)
        return 2
    from mcpresd.daemon import run

    return run(config, reload)
