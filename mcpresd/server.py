"""The Unix-socket server and the group committer.

Rules:
- The store (one SQLite connection and the broker over it) lives on the event
  loop's thread, in `GroupCommitter`. Requests that arrive together are run in
  one transaction (group commit); each caller's future resolves only after
  that COMMIT.
- A failed batch is rolled back, the ledger rebuilt, and its requests retried
  one per transaction, so one bad request never fails its neighbours.
- Groups are fair and short: jobs are taken one per submitter (a uid; the
  daemon's own jobs are one more) in turn, and a group stops taking jobs once
  it has run GROUP_BUDGET_S, so the loop serves I/O again and one user's
  thousand heavy reads never stall everyone else, nor the watchdog's job.
- The socket is created with a umask (never briefly world-accessible); a stale
  socket file is replaced only after a connect to it was refused; the socket is
  removed on exit if it is still ours.
- Under socket activation (LISTEN_PID is this process) the listening socket is
  fd 3, passed by systemd: it is used as it is and its file is left alone (the
  .socket unit owns it).
- Connections stay below the open-file limit (raised to its hard limit at
  start): `Limits.fitted` keeps FD_OVERHEAD descriptors for the daemon's own
  files, a quarter of the rest for holders' pidfds (`holder_fds`; past it
  holders are polled), and a reserve of connections only root and the admin
  group may use, so one user's connections or holders never lock root out; a
  refused connection is accepted, told why in one JSON-RPC error line, and
  closed.
- Every connection is identified by SO_PEERCRED. A line over the size limit gets
  an error and the connection is closed; other clients are never affected.
- What a connection queues is bounded (config [limits]): at most
  `max_pipelined` of its requests are in flight, and none is started while its
  unread replies exceed `reply_buffer` (the lines wait, and reading pauses;
  a client that closes meanwhile is still noticed, within HALF_CLOSED_CHECK_S,
  and its waiting requests withdrawn);
  a subscriber whose unread notifications exceed `subscriber_buffer` is
  unsubscribed with one last line saying so (it may subscribe again with
  `after_id`). What one uid's connections hold unread together is bounded too
  (`unread_per_uid`): past it, its subscribers are unsubscribed and its
  connections that are not reading (bytes waiting past the socket's own
  buffer) are closed, largest first, as Redis's hard output-buffer limit does (else one user's thousand
  connections that never read held a thousand buffers).
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import resource
import select
import socket
import sqlite3
import stat
import struct
import time
from collections import deque
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from mcpresd.core.errors import DomainError
from mcpresd.files import AlreadyServed, UnusablePath, check_directory, path_error
from mcpresd.protocol import EVENT_NOTIFICATION, JSONRPC, MAX_MESSAGE_BYTES, ErrorCode
from mcpresd.rpc import Dispatcher, StoreJob, encode, error_response
from mcpresd.service import Broker, Caller, Outbox, event_for
from mcpresd.store import StorageError

log = logging.getLogger("mcpresd.server")

MAX_GROUP = 512
GROUP_BUDGET_S = 0.05
"""How long one group's jobs may run before it commits; the jobs left wait for the next round of the loop."""
HALF_CLOSED_CHECK_S = 0.5
# asyncio re-listens with its own default of 100 unless told: a burst of clients would be refused.
BACKLOG = 4096
_Outcome = tuple["asyncio.Future[Any] | Then", bool, Any]
_Entry = tuple[StoreJob, "asyncio.Future[Any] | Then"]


class Then:
    """A store job's outcome handed straight to a callback once its transaction has committed.

    It answers what `rpc` asks of an asyncio future (`cancelled`, `exception`, `result`), without one: no
    future, no done-callback scheduled on the loop and run on a later round. The committer calls it after the
    commit's outbox has been handed on (`on_commit`), as the loop ran the futures' callbacks after it.
    """

    __slots__ = ("_callback", "_value", "_error", "_state")

    def __init__(self, callback: Callable[[Then], None]) -> None:
        self._callback = callback
        self._value: Any = None
        self._error: BaseException | None = None
        self._state = 0  # 0 pending, 1 done, 2 cancelled

    def done(self) -> bool:
        return self._state != 0

    def cancelled(self) -> bool:
        return self._state == 2

    def result(self) -> Any:
        return self._value

    def exception(self) -> BaseException | None:
        return self._error

    def set_result(self, value: Any) -> None:
        self._value, self._state = value, 1
        self._call()

    def set_exception(self, error: BaseException) -> None:
        self._error, self._state = error, 1
        self._call()

    def cancel(self) -> bool:
        if self._state:
            return False
        self._state = 2
        self._call()
        return True

    def _call(self) -> None:
        try:
            self._callback(self)
        except Exception:  # as the loop does with a callback's error: logged, and the group's other outcomes go on
            log.exception("a committed job's callback failed")


class GroupCommitter:
    """Owns the broker and its SQLite connection; runs store jobs in grouped transactions on the loop's thread.

    Jobs submitted while the loop handles one round of I/O run together in one transaction: a busy daemon
    commits (and fsyncs) once for many requests, an idle one at once for one. The loop waits during the
    COMMIT; what arrives meanwhile waits in its socket and joins the next group. There is no hand-off to
    another thread: a reply costs no thread wake-ups and no GIL contention, which measured faster at one
    client and at 200 (bench/bench_foundation.py) than a dedicated store thread.
    """

    def __init__(self, make_broker: Callable[[], Broker], on_commit: Callable[[Outbox], None],
                 on_broken: Callable[[BaseException], None] = lambda error: None) -> None:
        self._make_broker = make_broker
        self._on_commit = on_commit
        self._on_broken = on_broken
        self._queues: dict[object, deque[_Entry]] = {}
        """Pending jobs by submitter (see submit), each in the order submitted."""
        self._turns: deque[object] = deque()
        """The submitters with pending jobs, in the order they take their next turn."""
        self.pending = 0
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.broker: Broker | None = None
        self.broken: BaseException | None = None
        """Why the store can no longer be trusted (a failed group whose rebuild failed too); then nothing runs."""

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Open the store and recover (on this, the loop's, thread); hand on what recovery found."""
        self._loop = loop
        self.broker = self._make_broker()
        self._committed([], self.broker.take_outbox())  # what start-up recovery found: holders to watch

    def submit(self, job: StoreJob, submitter: object = None) -> asyncio.Future[Any]:
        """Run `job` in a coming group; `submitter` (a caller's uid; None: the daemon) takes turns with the others."""
        assert self._loop is not None
        future: asyncio.Future[Any] = self._loop.create_future()
        self._enqueue(job, submitter, future)
        return future

    def call(self, job: StoreJob, submitter: object, then: Callable[[Then], None]) -> None:
        """As `submit`, with `then` called once the job's outcome is known (committed, or never to run)."""
        self._enqueue(job, submitter, Then(then))

    def _enqueue(self, job: StoreJob, submitter: object, future: asyncio.Future[Any] | Then) -> None:
        assert self._loop is not None
        if self.broken is not None:
            future.set_exception(StorageError(f"the store failed ({self.broken}); the daemon is stopping"))
            return
        if self.broker is None:
            future.cancel()  # the daemon is stopping and the store is closed: nothing more runs
            return
        queue = self._queues.get(submitter)
        if queue is None:
            queue = self._queues[submitter] = deque()
            self._turns.append(submitter)
        queue.append((job, future))
        self.pending += 1
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def stop(self) -> None:
        """Run what is still pending, then close the store (what cannot run is cancelled)."""
        while self.pending and self.broker is not None and self.broken is None:
            left = self.pending
            self._flush()
            if self.pending >= left:
                break  # nothing ran (a group still waits for its commit): do not spin
        for _, future in self._drain():
            future.cancel()
        if self.broker is not None:
            self.broker.store.close()
            self.broker = None

    def _flush(self) -> None:
        """Run one group of pending jobs in one transaction (the next group waits for the next round)."""
        self._scheduled = False
        broker = self.broker
        first = self.take() if broker is not None else None
        if broker is None or first is None:
            return
        batch = [first]
        try:
            outcomes = self._run_batch(batch, more=self.take)
            outbox = broker.take_outbox()
        except Exception as error:  # the group failed and so did rebuilding the state in memory
            self._break(batch, error)
            return
        self._committed(outcomes, outbox)
        if self.pending and not self._scheduled:  # more than one group was waiting: the next, after these replies
            self._scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    def take(self) -> _Entry | None:
        """The next pending job, taking the submitters in turn; None if none is pending."""
        if not self._turns:
            return None
        submitter = self._turns.popleft()
        queue = self._queues[submitter]
        entry = queue.popleft()
        if queue:
            self._turns.append(submitter)
        else:
            del self._queues[submitter]
        self.pending -= 1
        return entry

    def _drain(self) -> list[_Entry]:
        """Every pending job, taken off the queues."""
        entries = [entry for queue in self._queues.values() for entry in queue]
        self._queues.clear()
        self._turns.clear()
        self.pending = 0
        return entries

    def _break(self, batch: list[_Entry], error: Exception) -> None:
        """Fail every waiting job and stop taking new ones; the daemon stops (a supervisor restarts it)."""
        log.critical("the store failed and its state in memory cannot be trusted (%s); stopping", error,
                     exc_info=error)
        self.broken = error
        failure = StorageError(f"the store failed ({error}); the daemon is stopping, nothing was applied")
        for _, future in [*batch, *self._drain()]:
            if not future.done():
                future.set_exception(failure)
        self._on_broken(error)

    def _run_batch(self, batch: list[_Entry], more: Callable[[], _Entry | None] | None = None) -> list[_Outcome]:
        """Run `batch` in one transaction, and after it what `more` gives (appended to `batch`) until the group
        holds MAX_GROUP jobs or has run GROUP_BUDGET_S."""
        broker = self.broker
        assert broker is not None
        outcomes: list[_Outcome] = []
        deadline = time.monotonic() + GROUP_BUDGET_S
        try:
            broker.store.begin()
            done = 0
            while done < len(batch) or (more is not None and len(batch) < MAX_GROUP
                                        and time.monotonic() < deadline and _took(batch, more)):
                job, future = batch[done]
                done += 1
                try:
                    outcomes.append((future, True, job(broker)))
                except DomainError as error:
                    outcomes.append((future, False, error))
            broker.store.commit()
            return outcomes
        except Exception as error:
            self._recover(broker)
            if len(batch) == 1:
                return [(batch[0][1], False, _storage_error(error, broker.store.path))]
            log.warning("a grouped transaction of %d requests failed (%s); retrying one by one", len(batch), error,
                        exc_info=not isinstance(error, sqlite3.Error))
            for entry in batch:
                # Each retried job commits alone: hand on its outcome and outbox now, before a later job's
                # failure rebuilds the broker (and its outbox) from the database.
                self._committed(self._run_batch([entry]), broker.take_outbox())
            return []

    @staticmethod
    def _recover(broker: Broker) -> None:
        try:
            broker.store.rollback()
        except sqlite3.Error as error:
            log.error("rollback failed: %s", error)
        broker.reload()

    def _committed(self, outcomes: list[_Outcome], outbox: Outbox) -> None:
        # The outbox first: a Then answers at once, and a reply must not leave before what the commit hands
        # on (a holder confined to its cgroup before the reply that starts its command).
        if outbox:
            _resolve([(waiter, not isinstance(outcome, BaseException), outcome) for waiter, outcome in outbox.settled])
            self._on_commit(outbox)
        _resolve(outcomes)


def _took(batch: list[_Entry], more: Callable[[], _Entry | None]) -> bool:
    entry = more()
    if entry is not None:
        batch.append(entry)
    return entry is not None


def _storage_error(error: Exception, path: str) -> Exception:
    """A failed transaction's error, with what happened and what to do when SQLite says (nothing was written)."""
    if not isinstance(error, sqlite3.Error):
        return error
    code = getattr(error, "sqlite_errorcode", 0) & 0xFF
    if code == sqlite3.SQLITE_FULL:
        why = (f"the file system holding {path} is full; free some space there and retry"
               " (the request was not applied; reads still work)")
    elif code == sqlite3.SQLITE_READONLY:
        why = (f"{path} cannot be written (a read-only file system, or the file or its -wal/-shm lost write"
               " permission); make them writable by the daemon's user, or remount read-write, then restart"
               " mcpresd if it persists (the request was not applied; reads still work)")
    elif code == sqlite3.SQLITE_IOERR:
        why = f"the disk holding {path} reported an I/O error; check the disk and the system log"
    elif code == sqlite3.SQLITE_BUSY:
        why = f"another process holds a lock on {path}; stop whatever else opened it and retry"
    else:
        why = "the request was not applied"
    return StorageError(f"{error} ({why})")


def _resolve(outcomes: list[_Outcome]) -> None:
    for future, ok, value in outcomes:
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


# -- the listening socket ---------------------------------------------------


class SocketInUse(AlreadyServed):
    """Another daemon answers on the socket path."""


def bind_unix_socket(path: str, mode: int) -> socket.socket:
    """Create, bind and listen on a Unix socket at `path` with `mode`, safely."""
    directory = os.path.dirname(path) or "."
    if not os.path.lexists(directory):
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as error:
            raise path_error(directory, error, "create the socket directory", "--socket") from None
    _check_directory(directory)
    _remove_if_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


SD_LISTEN_FDS_START = 3


class InheritedSocketError(RuntimeError):
    """The socket passed by systemd cannot be served."""


def inherited_socket(environ: MutableMapping[str, str] | None = None) -> socket.socket | None:
    """The listening socket systemd passed to this process (socket activation), else None.

    As sd_listen_fds(3) with unset_environment: the LISTEN_* variables are removed once read, so
    nothing started later mistakes them for its own.
    """
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()):
        return None
    count_text = env.get("LISTEN_FDS", "")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    try:
        count = int(count_text)
    except ValueError:
        raise InheritedSocketError(f"LISTEN_FDS={count_text!r} is not a number of sockets") from None
    if count < 1:
        return None
    if count > 1:
        log.warning("systemd passed %d sockets; serving the first (fd %d) only", count, SD_LISTEN_FDS_START)
    try:
        sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    except OSError as error:
        raise InheritedSocketError(f"fd {SD_LISTEN_FDS_START} from systemd is not a socket ({error.strerror})") from None
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
        sock.detach()
        raise InheritedSocketError(
            f"fd {SD_LISTEN_FDS_START} from systemd is not a listening Unix stream socket;"
            " mcpresd.socket needs ListenStream=/path/to/mcpresd.sock")
    sock.set_inheritable(False)
    sock.setblocking(False)
    return sock


def socket_name(sock: socket.socket) -> str:
    """The path of a bound Unix socket; an abstract name as @name."""
    name = sock.getsockname()
    text = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
    return "@" + text[1:] if text.startswith("\0") else text


def _check_directory(directory: str) -> None:
    """Refuse a directory another user owns or may write to (they could swap the socket for theirs)."""
    check_directory(directory, "--socket")


def _remove_if_stale(path: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise UnusablePath(f"{path} exists and is not a socket; remove it or choose another --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError as error:
        if error.errno in (errno.ECONNREFUSED, errno.ENOENT):
            log.info("removing stale socket %s", path)
            os.unlink(path)
            return
        raise SocketInUse(f"cannot tell whether {path} is in use ({error.strerror}); not replacing it") from None
    finally:
        probe.close()
    raise SocketInUse(f"another daemon is serving {path}; stop it first or choose another --socket")


def remove_socket(path: str, inode: int) -> None:
    try:
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass


def peer_credentials(sock: socket.socket | None, connection: int, admin_gid: int | None = None) -> Caller:
    if sock is None:
        return Caller(uid=-1, gid=-1, pid=None, connection=connection)
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", data)
    admin = uid == 0 or (admin_gid is not None and (gid == admin_gid or admin_gid in _peer_groups(sock, pid)))
    return Caller(uid=uid, gid=gid, pid=pid or None, connection=connection, admin=admin)


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
"""Linux's option number (since 4.13); Python's socket module names it only on some builds."""
PEERGROUPS_BYTES = 1024
"""The most socket.getsockopt reads: 256 groups."""


def _peer_groups(sock: socket.socket, pid: int) -> set[int]:
    """The supplementary groups the connecting process had when it connected (SO_PEERCRED gives only the primary
    gid). SO_PEERGROUPS records them at connect(), as SO_PEERCRED does the uid: /proc/<pid>/status, read later,
    could belong to another process by then (the client exited, or forked and left its child the connection,
    and the pid was reused). The groups of a process in more than 256 (more than socket.getsockopt can read)
    are read through libc, with room for the most a process may have; only kernels before 4.13 fall back to
    /proc."""
    try:
        data = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, PEERGROUPS_BYTES)
    except OSError as error:
        if error.errno == errno.ENOPROTOOPT:
            return _groups_of(pid)
        if error.errno != errno.ERANGE:
            return set()
        try:
            data = _many_peer_groups(sock.fileno())
        except OSError:
            return set()
    return set(struct.unpack(f"{len(data) // 4}I", data[: len(data) // 4 * 4]))


def _many_peer_groups(fd: int) -> bytes:
    """SO_PEERGROUPS for a process in more groups than socket.getsockopt has room for (its buffer is at most
    1024 bytes), through libc's getsockopt with room for NGROUPS_MAX."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    size = 4 * max(os.sysconf("SC_NGROUPS_MAX"), 65536)
    buffer = ctypes.create_string_buffer(size)
    length = ctypes.c_uint(size)
    if libc.getsockopt(ctypes.c_int(fd), ctypes.c_int(socket.SOL_SOCKET), ctypes.c_int(SO_PEERGROUPS), buffer,
                       ctypes.byref(length)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return buffer.raw[: length.value]


def _groups_of(pid: int) -> set[int]:
    """The supplementary groups of a process, from /proc (for kernels without SO_PEERGROUPS)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:] if g.isdigit()}
    except OSError:
        pass
    return set()


FD_OVERHEAD = 64
"""Descriptors kept for the daemon's own use: database, WAL and SHM, the listener, NVML, logs."""


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (a unit's LimitNOFILE= sets both); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as error:  # a seccomp filter (the unit's ~@resources) says EPERM
            log.info("cannot raise the open-file limit from %d to %d (%s)", soft, hard, error)
        else:
            soft = hard
    return open_file_limit() if soft == resource.RLIM_INFINITY else soft


def open_file_limit() -> int:
    """The soft RLIMIT_NOFILE (an unlimited one counts as 2**20)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


@dataclass(frozen=True)
class Limits:
    """What one client may take of the daemon (config [limits])."""

    max_connections: int = 4096
    max_connections_per_uid: int = 1024
    idle_timeout: float = 30.0
    """Seconds a half-sent message may sit unfinished before the connection is closed."""
    max_pipelined: int = 8
    """Requests one connection may have in flight; its later lines wait, unread, until one is answered."""
    reply_buffer: int = 1 << 20
    """Bytes of unread replies above which a connection's next requests wait (the write high-water mark)."""
    batch_reply: int = 16 << 20
    """Bytes one batch's replies may take; members past it get 1014 instead of their result."""
    subscriber_buffer: int = 8 << 20
    """Bytes of unread notifications above which a subscriber is unsubscribed (told so in one last line)."""
    unread_per_uid: int = 64 << 20
    """Bytes one uid's connections may hold unread together: past it its subscribers are unsubscribed and its
    connections that do not read are closed."""
    admin_reserve: int = 0
    """Connections beyond max_connections that only root and the admin group may open (set by `fitted`)."""
    holder_fds: int | None = None
    """pidfds the holder watch may keep open; further holders are polled (set by `fitted`)."""
    admin_gid: int | None = None
    """Members of this group may see and manage every user's allocations (config [access] admin_group)."""

    def fitted(self, open_files: int) -> Limits:
        """These limits kept below `open_files` descriptors, with a reserve for root and the admin group.

        Of the descriptors past FD_OVERHEAD, a quarter is for holders' pidfds; of the rest, a sixteenth (at
        least one) is the reserve, max_connections is at most what remains, and one uid gets at most half of
        max_connections.
        """
        usable = max(4, open_files - FD_OVERHEAD)
        holder_fds = usable // 4
        usable -= holder_fds
        reserve = max(1, usable // 16)
        total = max(1, min(self.max_connections, usable - reserve))
        per_uid = max(1, min(self.max_connections_per_uid, total // 2))
        fitted = replace(self, max_connections=total, max_connections_per_uid=per_uid, admin_reserve=reserve,
                         holder_fds=holder_fds)
        if (total, per_uid) != (self.max_connections, self.max_connections_per_uid):
            log.warning("with %d open files allowed, connections are capped at %d in all and %d per uid"
                        " (%d more for root and the admin group); raise LimitNOFILE (ulimit -n) for more",
                        open_files, total, per_uid, reserve)
        return fitted


class Server:
    """Accepts connections and tracks them, for shutdown and for what holds allocations."""

    def __init__(self, dispatcher: Dispatcher, on_close: Callable[[int], None] = lambda connection: None,
                 limits: Limits = Limits()) -> None:
        self.dispatcher = dispatcher
        self.connections: dict[int, Connection] = {}
        """The admitted connections not yet closed, by id (the broker asks whether one is still open)."""
        self.subscribers: set[Connection] = set()
        self.closing = False
        self.on_close = on_close
        self.limits = limits
        self.per_uid: dict[int, int] = {}
        self.of_uid: dict[int, set[Connection]] = {}
        self._ids = itertools.count(1)

    def admit(self, connection: Connection) -> str | None:
        """Why a new connection may not be served (a limit), or None.

        Root and the admin group may also use the reserve past max_connections (never past their per-uid limit).
        """
        limits, caller = self.limits, connection.caller
        total = limits.max_connections + (limits.admin_reserve if caller.admin else 0)
        if len(self.connections) >= total:
            return f"server overloaded: the daemon serves at most {total} connections; try again later"
        if self.per_uid.get(caller.uid, 0) >= limits.max_connections_per_uid:
            return (f"too many connections for uid {caller.uid}: {limits.max_connections_per_uid} are open"
                    " already, the most one user may have; close some and retry")
        return None

    def next_id(self) -> int:
        return next(self._ids)

    def publish(self, events: list[dict[str, Any]]) -> None:
        """Push events to subscribed connections as JSON-RPC notifications."""
        if not self.subscribers:
            return
        limit = self.limits.subscriber_buffer
        unread: dict[int, int] = {}
        """Per subscribing uid: what all its connections hold unread (lagged subscribers and replies too)."""
        for connection in self.subscribers:
            uid = connection.caller.uid
            if uid not in unread:
                unread[uid] = sum(c.unread() for c in self.of_uid.get(uid, ()))
        for event in events:
            line = encode({"jsonrpc": JSONRPC, "method": EVENT_NOTIFICATION, "params": event})
            private: dict[int, bytes] = {}  # what a uid may see differs from the event only by uid (event_for)
            for connection in list(self.subscribers):
                uid = connection.caller.uid
                if connection.unread() > limit:
                    connection.lagged(event.get("id"), limit)
                    continue
                if unread[uid] > self.limits.unread_per_uid:
                    connection.lagged(event.get("id"), self.limits.unread_per_uid,
                                      f"replies and notifications on uid {uid}'s connections together")
                    continue
                shown = event_for(connection.caller, event)
                data = line
                if shown is not event:
                    if uid not in private:
                        private[uid] = encode({"jsonrpc": JSONRPC, "method": EVENT_NOTIFICATION, "params": shown})
                    data = private[uid]
                connection.notify(data)
                unread[uid] += len(data)
        for uid, total in unread.items():
            if total > self.limits.unread_per_uid:
                self.hold_unread_budget(uid)

    def unread_of(self, uid: int) -> int:
        """What all of the uid's connections hold unread."""
        return sum(c.unread() for c in self.of_uid.get(uid, ()))

    def hold_unread_budget(self, uid: int) -> None:
        """Close the uid's connections that do not read (with replies or notifications waiting past what the
        socket holds), largest first, until what its connections hold unread together is within unread_per_uid."""
        over = self.unread_of(uid) - self.limits.unread_per_uid
        if over <= 0:
            return
        idle = sorted((c for c in self.of_uid.get(uid, ()) if c.unread() > 0),
                      key=lambda c: c.unread(), reverse=True)
        for connection in idle:
            if over <= 0:
                break
            over -= connection.unread()
            log.warning("connection %d (uid %d, pid %s) closed: uid %d's connections left over %d bytes unread"
                        " together", connection.id, uid, connection.caller.pid, uid, self.limits.unread_per_uid)
            connection.abort()

    def protocol(self) -> Connection:
        return Connection(self)

    async def close_all(self, timeout: float) -> None:
        """Stop reading everywhere, let requests in flight finish for up to `timeout` seconds, then close."""
        self.closing = True
        for connection in list(self.connections.values()):
            connection.stop_reading()
        deadline = asyncio.get_running_loop().time() + timeout
        while any(c.in_flight for c in self.connections.values()) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        for connection in list(self.connections.values()):
            connection.close()


class _Slot:
    __slots__ = ("data", "ready")

    def __init__(self) -> None:
        self.data: bytes | None = None
        self.ready = False


class Connection(asyncio.Protocol):
    """One client: splits its bytes into lines, dispatches each, writes the replies."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._dispatcher = server.dispatcher
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._lines: deque[bytes] = deque()
        """Whole lines read but not yet dispatched: they wait while this connection has enough in flight."""
        self._eof = False
        self._reading = True
        self._write_paused = False
        self._pumping = False
        self.in_flight = 0
        self._slots: deque[_Slot] = deque()
        self._idle: asyncio.TimerHandle | None = None
        self._paused_watch: asyncio.TimerHandle | None = None
        self._admitted = False
        self.id = server.next_id()
        self.caller = Caller(uid=-1, gid=-1, pid=None, connection=self.id)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self.caller = peer_credentials(transport.get_extra_info("socket"), self.id, self._server.limits.admin_gid)
        refusal = self._server.admit(self)
        if refusal is not None:
            log.warning("refused a connection from pid %s: %s", self.caller.pid, refusal)
            transport.write(encode(error_response(None, ErrorCode.LIMIT_EXCEEDED, refusal)))
            transport.close()
            return
        transport.set_write_buffer_limits(high=self._server.limits.reply_buffer)
        self._server.connections[self.id] = self
        self._server.per_uid[self.caller.uid] = self._server.per_uid.get(self.caller.uid, 0) + 1
        self._server.of_uid.setdefault(self.caller.uid, set()).add(self)
        self._admitted = True
        if self._server.closing:
            self.close()

    @property
    def batch_reply_bytes(self) -> int:
        return self._server.limits.batch_reply

    def data_received(self, data: bytes) -> None:
        scanned = len(self._buffer)  # the kept partial line has no newline: search only the new bytes
        buffer = self._buffer + data if self._buffer else data
        start = 0
        while True:
            end = buffer.find(b"\n", scanned if start == 0 else start)
            if end < 0:
                break
            if end - start > MAX_MESSAGE_BYTES:
                self._too_long()
                return
            line = buffer[start:end]
            start = end + 1
            if line.strip():
                self._lines.append(line)
        self._buffer = buffer[start:]
        if len(self._buffer) > MAX_MESSAGE_BYTES:
            self._too_long()
            return
        elif self._buffer and self._idle is None:
            self._idle = asyncio.get_running_loop().call_later(self._server.limits.idle_timeout, self._half_sent)
        elif not self._buffer and self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self._pump()

    def _pump(self) -> None:
        """Dispatch waiting lines while this connection has room; read more only when none wait."""
        if self._pumping:
            return  # a reply written during a dispatch below: the loop below goes on by itself
        self._pumping = True
        try:
            limit = self._server.limits.max_pipelined
            while (self._lines and self._transport is not None and not self._write_paused
                   and self.in_flight < limit and not self._server.closing):
                self._dispatch(self._lines.popleft())
        finally:
            self._pumping = False
        if self._lines or self._write_paused:
            self.stop_reading()
            if self._lines and self._paused_watch is None and not self._eof:
                self._paused_watch = asyncio.get_running_loop().call_later(HALF_CLOSED_CHECK_S,
                                                                           self._watch_while_paused)
        elif not self._reading and self._transport is not None and not self._server.closing:
            self._reading = True
            self._transport.resume_reading()
            if self._idle is not None:  # a half-sent line has its whole idle_timeout again, from now
                self._idle.cancel()
                self._idle = asyncio.get_running_loop().call_later(self._server.limits.idle_timeout,
                                                                   self._half_sent)

    def _watch_while_paused(self) -> None:
        """While its further lines wait unread, look now and then whether the client went away entirely.

        Reading is paused, so its close is not seen by reading: without this, the requests it has in flight
        (up to max_pipelined waiting allocates) stayed queued for nobody, and one granted later was held by its
        holder_pid without any client knowing.
        """
        self._paused_watch = None
        if self._transport is None or self._reading or self._eof or not self._lines:
            return
        if self._peer_gone():
            self._transport.abort()
            return
        self._paused_watch = asyncio.get_running_loop().call_later(HALF_CLOSED_CHECK_S, self._watch_while_paused)

    def _half_sent(self) -> None:
        """A message started long ago and never finished: answer once, then close (issue: a slowloris)."""
        self._idle = None
        if self._buffer and self._transport is not None and not self._reading:
            # The daemon stopped reading (the client has replies to read first): the rest is not late yet.
            self._idle = asyncio.get_running_loop().call_later(self._server.limits.idle_timeout, self._half_sent)
            return
        if self._buffer and self._transport is not None:
            self._buffer = b""
            self._transport.write(encode(error_response(
                None, ErrorCode.INVALID_REQUEST,
                f"message not finished within {self._server.limits.idle_timeout:g} s; closing the connection")))
            self._transport.close()

    def eof_received(self) -> bool:
        self._eof = True
        line, self._buffer = self._buffer, b""
        if line.strip():
            self._lines.append(line)  # a last message without its newline is still a message
        self._pump()
        if (self.in_flight or self._lines) and not self._peer_gone():
            # A half-close (shutdown(SHUT_WR)): keep the transport open until the replies are written, and look
            # now and then whether the client went away entirely (it waits for a queued request, say).
            self._watch_half_closed()
            return True
        return False

    def _watch_half_closed(self) -> None:
        if self._transport is None or not (self.in_flight or self._lines):
            return
        if self._peer_gone():
            self._transport.close()
            return
        asyncio.get_running_loop().call_later(HALF_CLOSED_CHECK_S, self._watch_half_closed)

    def _peer_gone(self) -> bool:
        """True when the client closed its socket entirely (POLLHUP), not just its sending side.

        A client that closes while it waits for a queued request must be noticed now, so that the request is
        withdrawn; nothing would be written to it until the grant.
        """
        sock = self._transport.get_extra_info("socket") if self._transport is not None else None
        if sock is None:
            return False
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLOUT)
        return any(events & (select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle is not None:
            self._idle.cancel()
        if self._paused_watch is not None:
            self._paused_watch.cancel()
        self._lines.clear()
        if not self._admitted:
            return
        left = self._server.per_uid.get(self.caller.uid, 1) - 1
        if left:
            self._server.per_uid[self.caller.uid] = left
        else:
            self._server.per_uid.pop(self.caller.uid, None)
        self._server.connections.pop(self.id, None)
        self._server.subscribers.discard(self)
        same = self._server.of_uid.get(self.caller.uid)
        if same is not None:
            same.discard(self)
            if not same:
                del self._server.of_uid[self.caller.uid]
        self._transport = None
        self._server.on_close(self.id)

    def subscribe(self) -> None:
        self._server.subscribers.add(self)

    def notify(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def unread(self) -> int:
        """Bytes written to this connection that the client has not read yet (beyond the socket's buffer)."""
        return self._transport.get_write_buffer_size() if self._transport is not None else 0

    def lagged(self, next_event: Any, limit: int, whose: str = "event notifications") -> None:
        """Unsubscribe a subscriber that fell behind; its last line says so and where to resume."""
        self._server.subscribers.discard(self)
        log.warning("connection %d (uid %d, pid %s): over %d bytes of %s left unread; unsubscribed it",
                    self.id, self.caller.uid, self.caller.pid, limit, whose)
        after = next_event - 1 if isinstance(next_event, int) else None
        self.notify(encode(error_response(
            None, ErrorCode.LIMIT_EXCEEDED,
            f"unsubscribed: over {limit} bytes of {whose} were left unread; events.subscribe again"
            f" with after_id {after} to resume where they stopped" if after is not None else
            f"unsubscribed: over {limit} bytes of {whose} were left unread",
            {"type": "SubscriberLagged", "limit": limit, "after_id": after})))

    def pause_writing(self) -> None:
        self._write_paused = True  # the client is not reading its replies: start no more of its requests
        self.stop_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._pump()

    def stop_reading(self) -> None:
        if self._transport is not None and self._reading and not self._eof:
            self._reading = False
            self._transport.pause_reading()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Close at once, dropping what the client has not read (and writing nothing more to it)."""
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.abort()

    def _dispatch(self, line: bytes) -> None:
        self.in_flight += 1
        slot = _Slot()
        self._slots.append(slot)
        try:
            self._dispatcher.handle_line(line, self, partial(self._reply, slot))
        except Exception:  # a bug must not leave the slot empty: every later reply on this connection waits on it
            log.exception("a request failed before it could be answered")
            if not slot.ready:
                self._reply(slot, encode(error_response(None, ErrorCode.INTERNAL_ERROR,
                                                        "internal error; see the daemon's log",
                                                        {"type": "InternalError"})))

    def _reply(self, slot: _Slot, data: bytes | None) -> None:
        # Replies leave in the order the requests came, whatever order they finished in.
        slot.data, slot.ready = data, True
        slots = self._slots
        while slots and slots[0].ready:
            done = slots.popleft()
            self.in_flight -= 1
            if done.data is not None and self._transport is not None:
                self._transport.write(done.data)
        if self.unread():  # the socket's buffer is full: the client is not reading (as fast)
            self._server.hold_unread_budget(self.caller.uid)
        if self._lines:
            self._pump()
        if (self._transport is not None and self.in_flight == 0 and
                ((self._eof and not self._lines) or self._server.closing)):
            self._transport.close()

    def _too_long(self) -> None:
        self._buffer = b""
        self._lines.clear()
        if self._transport is not None:
            self._transport.write(encode(error_response(
                None, ErrorCode.INVALID_REQUEST, f"message longer than {MAX_MESSAGE_BYTES} bytes; closing the connection")))
            self._transport.close()
