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
import struct
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

LOCK_SUFFIX = ".serve.lock"
# How often a start-up waiting for another process's write lock tries again.
START_WAIT_POLL_SECONDS = 0.2
# What the lock file says about its holder, read back by a refused second server.
HOLDER_BYTES_MAX = 4096
COMMAND_LINE_CHARS_MAX = 160
# Bytes SQLite's unix VFS locks (sqlite3.c, os_unix.c): in WAL mode a writer holds byte 120
# of the -shm file; in rollback mode the PENDING, RESERVED and SHARED bytes sit at 1 GiB.
_WAL_WRITE_LOCK_BYTE = 120
_ROLLBACK_LOCK_START, _ROLLBACK_LOCK_BYTES = 0x40000000, 2 + 510
_BUSY_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class StartupError(Exception):
    """The server cannot start; the message is the one line the operator sees."""


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
    """Raises StartupError when another server holds the database or the lock file cannot be made."""
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
    directory, read-only file system) where SQLite would only say 'unable to open'."""
    make_folder(database)
    try:
        os.close(os.open(database, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644))
    except OSError as e:
        raise StartupError(f"cannot open the database {database}: {reason(e)}") from None
    folder = database.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        # SQLite creates the -wal and -shm files beside the database.
        raise StartupError(f"cannot open the database {database}: permission denied (its folder {folder})")


def is_busy(e: BaseException) -> bool:
    # The low byte is the primary code: SQLITE_BUSY_RECOVERY (another process recovering the
    # WAL after a crash) is busy too.
    code = getattr(e, "sqlite_errorcode", None) if isinstance(e, sqlite3.OperationalError) else None
    return code is not None and code & 0xFF in _BUSY_CODES


async def wait_for_write_lock(database: Path, deadline: float, on_wait: Callable[[str], None]) -> None:
    """Returns once a write transaction on the file could begin; on_wait(holder) is called
    while another process holds it; StartupError once the deadline passes. Polls on the
    event loop, so Ctrl-C stops the wait at once."""
    while not await asyncio.to_thread(_write_lock_free, database):
        holder = lock_holder(database)
        if time.monotonic() >= deadline:
            raise still_locked(database, holder)
        on_wait(holder)
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
    pid = (_posix_lock_pid(Path(str(database) + "-shm"), _WAL_WRITE_LOCK_BYTE, 1)
           or _posix_lock_pid(database, _ROLLBACK_LOCK_START, _ROLLBACK_LOCK_BYTES))
    if not pid:
        return "another process"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read(COMMAND_LINE_CHARS_MAX * 4).replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return f"pid {pid}"
    return f"pid {pid} ({command[:COMMAND_LINE_CHARS_MAX]})"


def _posix_lock_pid(path: Path, start: int, length: int) -> int | None:
    if not sys.platform.startswith("linux"):
        return None  # struct flock is laid out differently elsewhere
    # struct flock on Linux: l_type, l_whence (short), l_start, l_len (off_t), l_pid (pid_t).
    layout = "hhqqi4x"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(layout, fcntl.F_WRLCK, os.SEEK_SET, start, length, 0))
    except OSError:
        return None
    finally:
        os.close(fd)
    kind, _, _, _, pid = struct.unpack(layout, answer)
    return pid if kind != fcntl.F_UNLCK and pid > 0 else None
