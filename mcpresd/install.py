"""`mcpresd install` / `mcpresd uninstall`: mcpresd as a systemd service, for this user or the whole machine.

Rules:
- The units and the sample config come from the package (mcpresd/share, links to systemd/ and config/ in a
  checkout); only the program of each ExecStart= is changed, to the `mcpresd` of the interpreter running this
  (a venv's, pipx's or uv's), never a guessed ~/.local/bin.
- An existing config file is kept; a missing one is written from the sample. Uninstalling keeps it too.
- With --root DIR every path is written under DIR and systemctl is not run (packaging, tests).
- Bad input changes nothing: everything is checked before the first file is written.
- A unit file is replaced, never written through: a symlink found in its place (planted, or a dotfiles
  manager's) is replaced by the file, not followed. The config is created only where nothing is, not even
  a dangling symlink. ExecStart= quotes the program as systemd reads it back (spaces, quotes, % and $).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

SYSTEM_UNITS = Path("/etc/systemd/system")
SYSTEM_CONFIG = Path("/etc/mcpres/mcpresd.toml")
SOCKET_GROUP = "mcpres"
SYSTEMCTL_TIMEOUT_S = 60.0

EPILOG = """\
examples:
  mcpresd install --user                 your own daemon: ~/.config/systemd/user/mcpresd.service, started now
  sudo mcpresd install --system          the machine's: /etc/systemd/system/mcpresd.{service,socket}
  mcpresd install --user --no-start      write and enable, start later (systemctl --user start mcpresd)
  mcpresd install --system --root /tmp/img --json   write into an image; no systemctl
  mcpresd uninstall --user               stop, disable and remove the unit (the config file stays)

Without --user or --system: --system for root, --user for anyone else.
"""


class InstallError(Exception):
    """The service cannot be installed or removed as asked."""


@dataclass(frozen=True)
class Target:
    """Where the service's files go for one mode, and what systemctl is told."""

    mode: str  # "user" or "system"
    units: dict[str, str]  # file name -> packaged unit (relative to share/systemd)
    unit_dir: Path
    config: Path
    config_in_unit: str  # the --config path as the unit names it (%E is the user's config home)
    started: str  # the unit enabled and started: the socket for the system, the service for a user
    systemctl: tuple[str, ...]


def target(mode: str) -> Target:
    if mode == "system":
        return Target("system", {"mcpresd.service": "mcpresd.service", "mcpresd.socket": "mcpresd.socket"},
                      SYSTEM_UNITS, SYSTEM_CONFIG, str(SYSTEM_CONFIG), "mcpresd.socket", ("systemctl",))
    given = os.environ.get("XDG_CONFIG_HOME", "")
    config_home = Path(given) if os.path.isabs(given) else Path.home() / ".config"  # the spec ignores a relative one
    return Target("user", {"mcpresd.service": "user/mcpresd.service"}, config_home / "systemd" / "user",
                  config_home / "mcpres" / "mcpresd.toml", "%E/mcpres/mcpresd.toml", "mcpresd.service",
                  ("systemctl", "--user"))


def mcpresd_program() -> str:
    """The `mcpresd` beside the running interpreter (a venv's, pipx's, uv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "mcpresd"
    if beside.is_file() and os.access(beside, os.X_OK):
        program = str(beside.absolute())
    else:
        found = shutil.which("mcpresd")
        if found is None:
            raise InstallError(f"no mcpresd program beside {sys.executable} nor on PATH: install the package "
                               "(pipx install mcpres, uv tool install mcpres, or pip install into a venv) first")
        program = str(Path(found).absolute())
    if not program.isprintable():
        raise InstallError(f"the mcpresd program's path {program!r} has a control character a unit cannot hold")
    return program


def exec_program(word: str) -> str:
    """A program's path as systemd's Exec*= reads it back as one word: % doubled (a specifier otherwise; $ is
    not expanded in the program), quoted where it has a blank, a quote, a backslash or a ';'."""
    text = word.replace("%", "%%")
    if any(c in text for c in " \t\"'\\;"):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def unit_text(packaged: str, program: str, config_in_unit: str) -> str:
    """The packaged unit with each ExecStart= running `program`, and its --config naming `config_in_unit`."""
    lines = []
    for line in packaged.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ExecStart" and value.strip():
            words = value.split()
            words[0] = exec_program(program)
            if "--config" in words[:-1]:
                words[words.index("--config") + 1] = config_in_unit
            line = "ExecStart=" + " ".join(words)
        lines.append(line)
    return "\n".join(lines) + "\n"


def packaged(name: str) -> str:
    return (resources.files("mcpresd") / "share" / name).read_text(encoding="utf-8")


def under(root: Path | None, path: Path) -> Path:
    return path if root is None else root / path.relative_to("/")


def install(mode: str, root: Path | None, start: bool) -> dict[str, object]:
    place = target(mode)
    program = mcpresd_program()
    texts = {name: unit_text(packaged("systemd/" + source), program, place.config_in_unit)
             for name, source in place.units.items()}
    sample = packaged("mcpresd.toml")
    unit_dir = under(root, place.unit_dir)
    unit_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in texts.items():
        path = unit_dir / name
        replace_file(path, text)
        written.append(str(path))
    config = under(root, place.config)
    config_written = not (config.exists() or config.is_symlink())
    if config_written:
        config.parent.mkdir(parents=True, exist_ok=True)
        config_written = create_file(config, sample)
    ran = []
    group_created = False
    if root is None:
        if mode == "system":
            group_created = ensure_group(SOCKET_GROUP)
        for command in ([*place.systemctl, "daemon-reload"],
                        [*place.systemctl, "enable", *(["--now"] if start else []), place.started]):
            systemctl(command)
            ran.append(" ".join(command))
    return {"mode": mode, "root": None if root is None else str(root), "exec": program, "units": written,
            "config": str(config), "config_written": config_written, "group_created": group_created,
            "systemctl": ran}


def create_file(path: Path, text: str) -> bool:
    """Write `path` only where nothing is (O_EXCL, so not through a symlink); whether it was written."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        os.fchmod(out.fileno(), 0o644)
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    return True


def replace_file(path: Path, text: str) -> None:
    """Put `text` at `path` by renaming a new file over it: whatever was there (a symlink too) is replaced,
    never written through, and a reader sees the old file or the new one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.new")
    temporary.unlink(missing_ok=True)
    if not create_file(temporary, text):
        raise InstallError(f"cannot create {temporary}: something is in the way")
    os.replace(temporary, path)


def uninstall(mode: str, root: Path | None, stop: bool) -> dict[str, object]:
    place = target(mode)
    ran = []
    if root is None:
        units = [place.started, *(["mcpresd.service"] if place.started != "mcpresd.service" else [])]
        command = [*place.systemctl, "disable", *(["--now"] if stop else []), *units]
        systemctl(command, missing_ok=True)
        ran.append(" ".join(command))
    removed = []
    for name in place.units:
        path = under(root, place.unit_dir) / name
        if path.exists():
            path.unlink()
            removed.append(str(path))
    if root is None:
        systemctl([*place.systemctl, "daemon-reload"])
        ran.append(" ".join([*place.systemctl, "daemon-reload"]))
    return {"mode": mode, "root": None if root is None else str(root), "removed": removed,
            "config_kept": str(under(root, place.config)), "systemctl": ran}


def systemctl(command: list[str], missing_ok: bool = False) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT_S)
    except FileNotFoundError:
        raise InstallError("systemctl is not installed: this system does not run systemd (use --root DIR to "
                           "write the files only)") from None
    except subprocess.TimeoutExpired:
        raise InstallError(f"`{' '.join(command)}` did not finish in {SYSTEMCTL_TIMEOUT_S:g}s") from None
    if done.returncode != 0 and not (missing_ok and "not loaded" in done.stderr + done.stdout):
        raise InstallError(f"`{' '.join(command)}` failed (exit {done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()}")


def ensure_group(name: str) -> bool:
    """Create the socket's group (SocketGroup=) if the host has none; whether it was created."""
    import grp

    try:
        grp.getgrnam(name)
        return False
    except KeyError:
        pass
    done = subprocess.run(["groupadd", "--system", name], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise InstallError(f"cannot create the group {name} the socket admits: {done.stderr.strip()}")
    return True


def parser(command: str) -> argparse.ArgumentParser:
    installing = command == "install"
    cli = argparse.ArgumentParser(
        prog=f"mcpresd {command}",
        description=("Install mcpresd as a systemd service: write its units (ExecStart= runs this mcpresd), "
                     "write the sample config if there is none, reload systemd, enable and start it."
                     if installing else
                     "Stop and disable the mcpresd service and remove its units; the config file stays."),
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = cli.add_mutually_exclusive_group()
    modes.add_argument("--user", dest="mode", action="store_const", const="user",
                       help="your own daemon, under your systemd user manager (default unless root)")
    modes.add_argument("--system", dest="mode", action="store_const", const="system",
                       help="the machine's daemon, socket-activated on /run/mcpres/mcpresd.sock (default for root)")
    cli.add_argument("--root", metavar="DIR", type=Path,
                     help="write under DIR (an image, a test) and run no systemctl")
    if installing:
        cli.add_argument("--no-start", action="store_true", help="enable it, but do not start it now")
    else:
        cli.add_argument("--no-stop", action="store_true", help="disable it, but leave a running daemon running")
    cli.add_argument("--json", action="store_true", help="report what was done as JSON")
    return cli


def _elevated_from() -> str:
    """The user who became root through sudo (or run0: SUDO_USER), doas (DOAS_USER) or pkexec (PKEXEC_UID), or
    ''."""
    named = os.environ.get("SUDO_USER") or os.environ.get("DOAS_USER")
    if named:
        return named
    uid = os.environ.get("PKEXEC_UID", "")
    if not uid.isdigit():
        return ""
    import pwd

    try:
        return pwd.getpwuid(int(uid)).pw_name
    except KeyError:
        return f"uid {uid}"


def main(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    args = parser(command).parse_args(rest)
    mode = args.mode or ("system" if os.geteuid() == 0 else "user")
    root: Path | None = args.root
    if root is not None and not root.is_dir():
        print(f"mcpresd {command}: --root {root} is not a directory", file=sys.stderr)
        return 2
    if root is not None:
        root = root.absolute()
    sudo_user = _elevated_from()
    if mode == "user" and root is None and os.geteuid() == 0 and sudo_user not in ("", "root"):
        # sudo keeps the caller's HOME on some systems and not on others: either way the units would be root's
        # (or root-owned files in the caller's home), and root's user manager would run them, not the caller's.
        print(f"mcpresd {command}: --user under sudo means root's own user daemon (units in {target(mode).unit_dir}), not "
              f"{sudo_user}'s; as {sudo_user}, run `mcpresd {command} --user` without sudo, or for the machine's "
              f"daemon `sudo mcpresd {command} --system`", file=sys.stderr)
        return 2
    try:
        if command == "install":
            report = install(mode, root, start=not args.no_start)
        else:
            report = uninstall(mode, root, stop=not args.no_stop)
    except InstallError as error:
        print(f"mcpresd {command}: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"mcpresd {command}: {error.strerror}: {error.filename}", file=sys.stderr)
        return 4
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(describe(command, report))
    return 0


def describe(command: str, report: dict[str, object]) -> str:
    def strings(key: str) -> list[str]:
        value = report[key]
        return [str(item) for item in value] if isinstance(value, list) else []

    if command == "install":
        lines = [f"wrote {unit}" for unit in strings("units")]
        lines.append(f"ExecStart runs {report['exec']}")
        lines.append(f"{'wrote the sample config to' if report['config_written'] else 'kept the config'} "
                     f"{report['config']}")
        if report.get("group_created"):
            lines.append(f"created the group {SOCKET_GROUP}: add the users who may allocate (usermod -aG)")
    else:
        lines = [f"removed {unit}" for unit in strings("removed")] or ["no unit files to remove"]
        lines.append(f"kept the config {report['config_kept']} (remove it yourself if you wish)")
    lines += [f"ran {command_line}" for command_line in strings("systemctl")]
    if report.get("root") is not None:
        lines.append(f"under {report['root']}: systemctl not run")
    return "\n".join(lines)
