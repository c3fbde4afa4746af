"""`mcpresd`: parse options, load the config, run the daemon."""

from __future__ import annotations

import argparse
import sys
from functools import partial

from mcpresd import __version__

EPILOG = """\
examples:
  mcpresd                              run (per-user socket and database; the config file below if it exists)
  mcpresd --config config/mcpresd.toml
  mcpresd --socket /tmp/m.sock --db /tmp/m.db --gpu-replay tests/fixtures/h100-nvml-capture.json
  mcpresd --check-config /etc/mcpres/mcpresd.toml     validate a file and exit (0: valid, 2: the error)
  mcpresd config show > mcpresd.toml   the effective configuration, defaults included, as TOML
  mcpresd install --user               install, enable and start it as your systemd user service
  mcpresd uninstall --user             stop, disable and remove that service (see mcpresd install --help)

Options given here override the config file, which overrides the embedded defaults.
Without --config the file is /etc/mcpres/mcpresd.toml for root and
$XDG_CONFIG_HOME/mcpres/mcpresd.toml (else ~/.config/mcpres/) for anyone else, if
it exists; the first log line and `mcpctl status` say which was read.
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
    cli.add_argument("--config", metavar="PATH", help="TOML config file (see config/mcpresd.toml; default: "
                     "/etc/mcpres/mcpresd.toml for root, else $XDG_CONFIG_HOME/mcpres/mcpresd.toml, if it exists)")
    cli.add_argument("--check-config", nargs="?", const="", metavar="FILE",
                     help="validate FILE (default: the file --config or the default path names) with the other "
                          "options, and exit: 0 and `FILE: valid`, or 2 and the error")
    cli.add_argument(
        "--socket",
        metavar="PATH",
        help="Unix socket to serve (default: $MCPRES_SOCKET, else $XDG_RUNTIME_DIR/mcpres/mcpresd.sock, else "
        "/run/user/UID/mcpres/, else /tmp/mcpres-UID/)",
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


def config_parser() -> argparse.ArgumentParser:
    examples = ("examples:\n  mcpresd config show\n  mcpresd config show --config /etc/mcpres/mcpresd.toml > full.toml\n"
                "  mcpresd --check-config full.toml     (it loads to the same configuration)")
    cli = argparse.ArgumentParser(prog="mcpresd config", description="The daemon's configuration.", epilog=examples,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = cli.add_subparsers(dest="action", required=True, metavar="show")
    show = actions.add_parser("show", help="print the effective configuration, defaults included, as TOML",
                              description="Print the configuration the daemon would run with, every key and "
                                          "default included, as TOML that loads back to the same configuration.",
                              epilog=examples, formatter_class=argparse.RawDescriptionHelpFormatter)
    show.add_argument("--config", metavar="PATH", help="TOML config file (default: as mcpresd finds it)")
    return cli


def config_command(argv: list[str]) -> int:
    from mcpresd.config import ConfigError, as_toml, find_config, load

    args = config_parser().parse_args(argv)
    path, source = find_config(args.config)
    try:
        config = load(path)
    except ConfigError as error:
        print(f"mcpresd: {error}", file=sys.stderr)
        return 2
    origin = f"# the effective configuration of mcpresd {__version__}: {path or 'no file'} ({source})\n"
    sys.stdout.write(origin + "# durations in seconds, sizes in bytes\n\n" + as_toml(config))
    return 0


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["config"]:
        return config_command(arguments[1:])
    if arguments[:1] in (["install"], ["uninstall"]):
        from mcpresd.install import main as install

        return install(arguments)
    args = parser().parse_args(arguments)
    # The daemon serves a Unix socket and never speaks TLS: keep asyncio from loading OpenSSL (~4 MiB of RSS).
    # Before anything imports asyncio, hence the imports below.
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]
    from mcpresd.config import ConfigError, find_config, load

    given = args.check_config or args.config
    path, source = find_config(given)
    # SIGHUP reloads with the same file and the same command-line overrides.
    reload = partial(
        load,
        path,
        config_source=source,
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
    if config.gpu_replay:
        from mcpresd.samplers.nvml import ReplayError, ReplayNvml

        try:  # a capture that cannot be replayed is a bad option, as a bad config file is: exit 2, before anything
            ReplayNvml(config.gpu_replay).close()
        except ReplayError as error:
            print(f"mcpresd: --gpu-replay (gpu_replay): {error}", file=sys.stderr)
            return 2
    if args.check_config is not None:
        print(f"{path}: valid" if path else f"no config file ({source}): the embedded defaults are valid")
        return 0
    from mcpresd.daemon import run

    return run(config, reload)
