"""What `loyalty serve` does before it serves: one server per database file, and a database
busy in another process waited for instead of crashing.

Two servers on one SQLite file each keep their own member locks, holds and budgets in
memory, so a hold taken through one is invisible to the other. `serve` therefore holds an
flock on `<database>.serve.lock` for its whole life. The lock, not the file, is what
counts: the kernel drops it when the process dies, even by kill -9, so a stale file never
blocks a restart. The file is never deleted: a server that unlinked it on exit could leave
a second one locking the unlinked file while a third creates and locks a new one.
"""
from __future__ import annotations

import asyncio
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from storage.health import is_busy, lock_holder_pid, wal_write_lock_holder

LOCK_SUFFIX = ".serve.lock"
# How often a start-up waiting for another process's write lock tries again.
START_WAIT_POLL_SECONDS = 0.2
# What the lock file says about its holder, read back by a refused second server.
HOLDER_BYTES_MAX = 4096
COMMAND_LINE_CHARS_MAX = 160
# Bytes SQLite's unix VFS locks (sqlite3.c, os_unix.c) in rollback mode, a database not yet
# switched to WAL: the PENDING, RESERVED and SHARED bytes at 1 GiB.
_ROLLBACK_LOCK_START, _ROLLBACK_LOCK_BYTES = 0x40000000, 2 + 510


class StartupError(Exception):
    """The server cannot start; the message is the one line the operator sees."""

    exit_status = 2


class DatabaseUnreachable(StartupError):
    """PostgreSQL did not answer at start: a restart a little later may well find it (a host
    booting before its database, a failover), so this is not the exit status that tells
    systemd a restart cannot help (RestartPreventExitStatus=2)."""

    exit_status = 75    # EX_TEMPFAIL: try again later


def lock_path(database: Path) -> Path:
    # Resolved, so a symlink or another spelling of the same path finds the same lock.
    return Path(str(database.resolve()) + LOCK_SUFFIX)


class ServeLock:
    """The held flock; closing its file releases it (so does the process's death)."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> ServeLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def take_serve_lock(database: Path) -> ServeLock:
    """Raises StartupError when another server holds the database or the lock file cannot be made.
    Makes the database's folder: the lock file beside the database is the first file in it."""
    make_folder(database)
    path = lock_path(database)
    try:
        # O_CLOEXEC (Python's default too): a program started from the server must not
        # inherit the lock and hold it after the server is gone.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise StartupError(f"cannot open the database {database}: cannot create its lock file {path}: "
                           f"{reason(e)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise StartupError(f"another loyalty server ({holder}) is serving the database {database} "
                           f"(it holds {path}); one server per database file") from None
    except OSError as e:  # a file system without locks (ENOLCK)
        os.close(fd)
        raise StartupError(f"cannot open the database {database}: cannot lock {path}: {reason(e)}") from None
    try:
        _write_holder(fd)
    except OSError as e:
        os.close(fd)
        raise StartupError(f"cannot open the database {database}: cannot write {path}: {reason(e)}") from None
    return ServeLock(fd, path)


def make_folder(database: Path) -> None:
    try:
        database.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocking = next((p for p in database.parents if p.exists() and not p.is_dir()), None)
        why = f"{blocking} is a file, not a folder" if blocking else reason(e)
        raise StartupError(f"cannot open the database {database}: {why}") from None


def _write_holder(fd: int) -> None:
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    text = json.dumps({"pid": os.getpid(), "started": started}) + "\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, HOLDER_BYTES_MAX, 0))
        return f"pid {int(holder['pid'])}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        # Locked an instant ago and not written yet, or written by something else.
        return "pid unknown"


def reason(e: OSError) -> str:
    return (e.strerror or str(e)).lower()


def check_database_file(database: Path) -> None:
    """Raises StartupError naming the cause (permission denied, not a directory, is a
    directory, read-only file system) where SQLite would only say 'unable to open'. The
    folder exists already: `serve` made it for the lock file (take_serve_lock)."""
    try:
        os.close(os.open(database, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644))
    except OSError as e:
        raise StartupError(f"cannot open the database {database}: {reason(e)}") from None
    folder = database.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        # SQLite creates the -wal and -shm files beside the database.
        raise StartupError(f"cannot open the database {database}: permission denied (its folder {folder})")


async def wait_for_write_lock(database: Path, deadline: float, on_wait: Callable[[str], None]) -> None:
    """Returns once a write transaction on the file could begin; on_wait(holder) is called
    once, when another process is first found holding it; StartupError once the deadline
    passes. Polls on the event loop, so Ctrl-C stops the wait at once."""
    waited = False
    while not await asyncio.to_thread(_write_lock_free, database):
        # Who holds it costs two opens and a /proc read: only for the two lines that say so.
        if time.monotonic() >= deadline:
            raise still_locked(database, lock_holder(database))
        if not waited:
            waited = True
            on_wait(lock_holder(database))
        await asyncio.sleep(START_WAIT_POLL_SECONDS)


def _write_lock_free(database: Path) -> bool:
    try:
        conn = sqlite3.connect(database, isolation_level=None, timeout=0)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
        finally:
            conn.close()
    except sqlite3.Error as e:
        if is_busy(e):
            return False
        raise StartupError(f"cannot open the database {database}: {e}") from None
    return True


def still_locked(database: Path, holder: str) -> StartupError:
    return StartupError(f"the database {database} is still locked by {holder} "
                        "after database.start_wait_seconds")


def lock_holder(database: Path) -> str:
    """'pid N (its command line)' of the process holding SQLite's write lock, when the
    kernel says (POSIX locks, Linux); otherwise 'another process'."""
    pid = (wal_write_lock_holder(database)
           or lock_holder_pid(database, _ROLLBACK_LOCK_START, _ROLLBACK_LOCK_BYTES))
    if not pid:
        return "another process"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read(COMMAND_LINE_CHARS_MAX * 4).replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return f"pid {pid}"
    command = " ".join(command.split())         # an argument's newlines would break the one line
    return f"pid {pid} ({command[:COMMAND_LINE_CHARS_MAX]})"
