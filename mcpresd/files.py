"""The files the daemon owns: the directories of its socket and database, and the database's lock.

Rules:
- A directory the daemon creates files in is owned by it or root and writable by nobody else (unless it
  has the sticky bit, as /tmp). A symbolic link there is followed only if it belongs to the daemon's user or
  root (systemd's DynamicUser state directory is root's link into /var/lib/private); one that another user
  planted is refused, so it cannot point the daemon at /etc.
- The database's files are opened with O_NOFOLLOW before SQLite opens them: a planted link is refused, never
  turned into a database. In a directory others may write to (sticky), they must also be ours and single-linked.
- A daemon holds an exclusive flock(2) on `<db>.lock` for its whole life, taken before it reads anything.
  A separate file, because SQLite's own locks on the database are POSIX locks, which a process loses when it
  closes any descriptor of that file; flock belongs to the lock file's open description and survives that.
  The lock file is never removed (removing it would let two daemons lock two different files).
- The lock file also remembers the database's commit high-water mark (its newest event id), rewritten in
  place after each commit that added events, without fsync: it survives the daemon's crash (the page
  cache), not the host's, so after a host crash it can only be behind the database, never ahead of it.
  A database found behind it on start lost transactions that were acknowledged.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time

from mcpresd.protocol import socket_directory_problem

EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_IN_USE = 3
EXIT_PATH = 4
_MARK_WIDTH = 64


class StartupError(RuntimeError):
    """The daemon cannot start; its message says why and what to do."""

    exit_status = EXIT_FAILURE


class StartupConfigError(StartupError):
    """The configuration names something this host does not have."""

    exit_status = EXIT_CONFIG


class AlreadyServed(StartupError):
    """Another daemon holds the database or serves the socket."""

    exit_status = EXIT_IN_USE


class DatabaseInUse(AlreadyServed):
    """Another daemon holds the database's lock."""


class UnusablePath(StartupError):
    """A path the daemon needs cannot be used: unsafe, unwritable, on a full or read-only file system."""

    exit_status = EXIT_PATH


class UnsafeDirectory(UnusablePath):
    """A directory another user owns or may write to, or reached through their symbolic link."""


def restore_recipe(database: str) -> str:
    """The one way to put a backup in place of `database`, while no daemon runs on it: its -wal would be replayed
    onto the copy, and its lock's high-water mark would take the copy for lost commits."""
    return f"rm -f {database}-wal {database}-shm {database}.lock && cp BACKUP {database}"


def check_directory(directory: str, option: str) -> os.stat_result:
    """Refuse a directory another user owns or may write to (they could swap our files for theirs).

    The rule is `protocol.socket_directory_problem`, the one mcpctl applies to the daemon's socket; here a
    directory that cannot be read is an error (OSError), and the refusal says what to do.
    """
    problem = socket_directory_problem(directory, (os.geteuid(), 0))
    if problem is None:
        return os.stat(directory)
    if "writable by other users" in problem:
        fix = f"run `chmod go-w {directory}` or choose another {option}"
    elif "symbolic link" in problem:
        fix = f"it is not yours or root's: remove it or choose another {option}"
    elif "belongs to uid" in problem:
        fix = f"not to you: choose another {option}"
    else:
        fix = f"choose another {option}"
    raise UnsafeDirectory(f"{problem}; {fix}")


def shared(info: os.stat_result) -> bool:
    """Whether other users may create files in the directory (a sticky one such as /tmp)."""
    return bool(info.st_mode & 0o022)


def path_error(path: str, error: OSError, what: str, option: str) -> UnusablePath:
    """One line: what failed on which path, and what to do about it."""
    reason = error.strerror or str(error)
    if error.errno in (errno.EACCES, errno.EPERM):
        fix = f"make it writable by uid {os.geteuid()}, or choose another {option}"
    elif error.errno == errno.EROFS:
        fix = f"remount it read-write, or choose another {option} on a writable file system"
    elif error.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"free some space there, or choose another {option}"
    elif error.errno == errno.ELOOP:
        reason = "it is a symbolic link"
        fix = f"remove the link, or give {option} the real path"
    else:
        fix = f"check the path, or choose another {option}"
    return UnusablePath(f"cannot {what} {path}: {reason}; {fix}")


def prepare_database_directory(database: str) -> os.stat_result:
    """Create the database's directory (0700) if missing, then check it like the socket's."""
    directory = os.path.dirname(os.path.abspath(database))
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as error:
        raise path_error(directory, error, "create the database directory", "--db (or `database =` in the config)") \
            from None
    return check_directory(directory, "--db")


def open_own_file(path: str, directory: os.stat_result, what: str) -> int:
    """Open (creating it 0600) a regular file without following a link; in a shared directory it must be ours."""
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):  # O_NOFOLLOW refuses it too; this says so more clearly
            raise path_error(path, OSError(errno.ELOOP, os.strerror(errno.ELOOP)), f"open the {what}", "--db")
    except FileNotFoundError:
        pass
    try:
        handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
    except OSError as error:
        raise path_error(path, error, f"open the {what}", "--db") from None
    info = os.fstat(handle)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = "is not a regular file"
    elif shared(directory) and info.st_uid != os.geteuid():
        problem = f"belongs to uid {info.st_uid} in a directory other users may write to"
    elif shared(directory) and info.st_nlink != 1:
        problem = "has other hard links in a directory other users may write to"
    if problem is not None:
        os.close(handle)
        raise UnusablePath(f"the {what} {path} {problem}; remove it or choose another --db")
    return handle


def prepare_database_files(database: str, directory: os.stat_result) -> tuple[int, int]:
    """Create the database, its -wal and -shm as our own regular files before SQLite opens them by name.

    Returns the database file's (st_dev, st_ino): what its path must keep naming. The descriptors are closed
    at once, before SQLite takes its POSIX locks (closing one later would drop them).
    """
    identity = (0, 0)
    for suffix in ("", "-wal", "-shm"):
        handle = open_own_file(database + suffix, directory, "database file")
        try:
            if suffix == "":
                info = os.fstat(handle)
                identity = (info.st_dev, info.st_ino)
        finally:
            os.close(handle)
    try:
        journal = os.lstat(database + "-journal")
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISREG(journal.st_mode):
            raise UnusablePath(f"{database}-journal is not a regular file; remove it or choose another --db")
    return identity


class DatabaseLock:
    """The exclusive lock on a database for one daemon's life; it also keeps the commit high-water mark."""

    def __init__(self, database: str, directory: os.stat_result) -> None:
        self.path = database + ".lock"
        self.database = database
        self._handle = open_own_file(self.path, directory, "lock file")
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = self._holder() if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else 0
            os.close(self._handle)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                by = f"pid {holder}" if holder else "another process"
                raise DatabaseInUse(
                    f"database {database} in use by {by} (another mcpresd holds {self.path}); "
                    f"stop it, or give this daemon another --db") from None
            raise path_error(self.path, error, "lock", "--db") from None
        self.previous_mark = self._read()[1]
        """The high-water mark the last daemon on this database left (0 if none)."""
        self.mark = self.previous_mark
        try:
            self._write(self.mark)
        except OSError as error:
            os.close(self._handle)
            raise path_error(self.path, error, "write", "--db") from None
        info = os.fstat(self._handle)
        self.identity = (info.st_dev, info.st_ino)

    def _holder(self, patience_s: float = 1.0) -> int:
        """The pid of the daemon that holds the lock, or 0. It writes its pid just after taking the lock, so a
        daemon started at the same moment may find the file empty, or still naming the last (dead) holder."""
        deadline = time.monotonic() + patience_s
        while True:
            pid = self._read()[0]
            if pid and os.path.exists(f"/proc/{pid}"):
                return pid
            if time.monotonic() >= deadline:
                return 0
            time.sleep(0.01)

    def _read(self) -> tuple[int, int]:
        """(pid, high-water mark) as written by the holder; zeros where unreadable."""
        try:
            text = os.pread(self._handle, _MARK_WIDTH, 0).decode("ascii", "replace")
        except OSError:
            return 0, 0
        values = dict(part.split("=", 1) for part in text.split() if "=" in part)
        try:
            return int(values.get("pid", 0)), int(values.get("mark", 0))
        except ValueError:
            return 0, 0

    def _write(self, mark: int) -> None:
        line = f"pid={os.getpid()} mark={mark}".ljust(_MARK_WIDTH - 1) + "\n"
        os.pwrite(self._handle, line.encode("ascii"), 0)

    def record(self, mark: int) -> None:
        """Remember the newest committed event id (a pwrite into the page cache; no fsync)."""
        if mark != self.mark:
            self.mark = mark
            try:
                self._write(mark)
            except OSError:
                pass  # a full disk cannot lose a write into an existing block; anything else only weakens a check

    def still_named(self) -> bool:
        """Whether the lock file's path still names the file this daemon locked."""
        try:
            info = os.lstat(self.path)
        except OSError:
            return False
        return (info.st_dev, info.st_ino) == self.identity

    def close(self) -> None:
        if self._handle >= 0:
            os.close(self._handle)
            self._handle = -1


def read_small(path: str) -> bytes:
    """A small kernel file (/proc, cgroupfs: at most 4 KiB) in one read. os.open, os.read and os.close cost half
    of open()'s file object and a fraction of pathlib's read_text, which counts where every process or cgroup is
    read each sampling round."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)
