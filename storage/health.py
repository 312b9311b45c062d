"""What keeps the database from being used, as typed errors, and which of them is in force.

A full disk, another program holding the write lock, or the database's files deleted or
replaced under the server are not bugs: every request they stop fails the same way, so
each is raised as one StorageError subclass (the HTTP layer answers 503 with its code)
and logged once when it starts, at most once a minute while it lasts, and once when it
ends, instead of a traceback per request.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import sqlite3
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("storage.health")

# While a fault lasts, one line this often says how many requests it refused meanwhile.
FAULT_LOG_INTERVAL_S = 60.0
# A condition that would log on every commit or checkpoint round is logged at most this often.
REPEATED_LOG_INTERVAL_S = 60.0
_MIB = 1024 * 1024
# The byte SQLite's unix VFS locks (os_unix.c) in the -shm file while a connection writes in WAL mode.
WAL_WRITE_LOCK_BYTE = 120
# Only Linux's struct flock is laid out as lock_holder_pid() packs it.
CAN_SEE_LOCK_HOLDERS = sys.platform.startswith("linux")


class StorageError(Exception):
    """The storage refused a write (or read) for a reason outside the request; nothing of it was kept."""

    cause = "error"


class StorageFull(StorageError):
    """The disk holding the database (or its WAL) has no room left."""

    cause = "full"


class StorageBusy(StorageError):
    """Another program held the database's write lock longer than the write may wait."""

    cause = "busy"


class StorageLost(StorageError):
    """The database file or its WAL was deleted or replaced under the running server."""

    cause = "lost"


class MigrationsBusy(RuntimeError):
    """Another process held PostgreSQL's migrations' lock for longer than the wait allowed
    (here, not in storage/pg, so that catching it imports no driver)."""


class StorageUnavailable(StorageError):
    """The database server cannot be reached (PostgreSQL restarting or failing over). A
    write whose COMMIT was under way may have been kept: the same request sent again
    answers as a replay if it was."""

    cause = "unavailable"


def free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged writer may still use on path's file system; None if unknown."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def is_busy(err: BaseException) -> bool:
    """Another connection holds the lock SQLite needed. The low byte is the primary code, so
    the extended ones count too: SQLITE_BUSY_RECOVERY (another process recovering the WAL
    after a crash), SQLITE_BUSY_SNAPSHOT, SQLITE_BUSY_TIMEOUT."""
    return _primary_code(err) == sqlite3.SQLITE_BUSY


def _primary_code(err: BaseException) -> int | None:
    code = getattr(err, "sqlite_errorcode", None) if isinstance(err, sqlite3.Error) else None
    return code & 0xFF if code is not None else None


def classify(err: BaseException, disk_low: Callable[[], bool]) -> BaseException:
    """err as a StorageError when it is one of the storage faults, else err itself."""
    if isinstance(err, StorageError):
        return err
    primary = _primary_code(err)
    if primary == sqlite3.SQLITE_FULL:
        return _caused(StorageFull("the disk is full"), err)
    if is_busy(err):
        return _caused(StorageBusy("another program holds the write lock"), err)
    # Growing the -shm file on a full disk fails as an I/O error, not SQLITE_FULL.
    if primary == sqlite3.SQLITE_IOERR and disk_low():
        return _caused(StorageFull(f"the disk is full ({err})"), err)
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return _caused(StorageFull("the disk is full"), err)
    return err


def _caused(new: StorageError, cause: BaseException) -> StorageError:
    new.__cause__ = cause
    return new


class Faults:
    """The storage fault in force, if any, and its log lines and counts.

    A lost file stays in force until the server is restarted; a full disk until a write
    is kept again or space was freed; another program's lock until a write gets it.
    """

    def __init__(self, name: str, on_error: Callable[[str, int], None] | None = None) -> None:
        self._name = name
        self._on_error = on_error
        self._lock = threading.Lock()
        # Read without the lock on hot paths: a stale None only delays a clear() by one batch.
        self.current: StorageError | None = None
        self._since_s = 0.0
        self._logged_at_s = float("-inf")
        self._refused_since_log = 0
        self._refused_total = 0
        self.free_at_fault: int | None = None

    def record(self, err: StorageError, refused: int = 1, free: int | None = None) -> None:
        now_s = time.monotonic()
        with self._lock:
            current = self.current
            if isinstance(current, StorageLost) and not isinstance(err, StorageLost):
                err = current                      # nothing else matters any more
            if current is None or current.cause != err.cause:
                self.current, self._since_s, self.free_at_fault = err, now_s, free
                self._refused_since_log, self._refused_total = 0, 0
                self._logged_at_s = now_s
                self._log_start(err)
            elif now_s - self._logged_at_s >= FAULT_LOG_INTERVAL_S:
                log.error("storage %s: still %s (%s) for %.0fs; %d requests refused in the last %.0fs",
                          self._name, _NAMES[err.cause], err, now_s - self._since_s,
                          self._refused_since_log + refused, now_s - self._logged_at_s)
                self._logged_at_s, self._refused_since_log = now_s, 0
            else:
                self._refused_since_log += refused
            self._refused_total += refused
        if self._on_error is not None:
            try:
                self._on_error(err.cause, refused)
            except Exception:  # noqa: BLE001 - a metrics hook must not change the answer
                log.debug("storage error hook failed", exc_info=True)

    def _log_start(self, err: StorageError) -> None:
        if isinstance(err, StorageLost):
            log.critical("storage %s: %s; writes and reads are refused until the server is restarted",
                         self._name, err)
        else:
            detail = f"{err}: {err.__cause__}" if err.__cause__ is not None else str(err)
            log.error("storage %s: %s (%s); refusing requests with 503 until it is over, logged again "
                      "at most every %.0fs", self._name, _NAMES[err.cause], detail, FAULT_LOG_INTERVAL_S)

    def clear(self, cause: str) -> None:
        current = self.current
        if current is None or current.cause != cause or cause == StorageLost.cause:
            return
        with self._lock:
            if self.current is not current:
                return
            self.current = None
            log.warning("storage %s: %s is over after %.1fs; %d requests were refused",
                        self._name, _NAMES[cause], time.monotonic() - self._since_s, self._refused_total)

    def clear_full_if_freed(self, free: int | None, min_free: int) -> None:
        """Space was freed since the disk filled up: writes may succeed again."""
        current = self.current
        if not isinstance(current, StorageFull) or free is None:
            return
        if free >= min_free and free > (self.free_at_fault or 0) + _MIB:
            self.clear(StorageFull.cause)


_NAMES = {StorageFull.cause: "disk full", StorageBusy.cause: "write lock held by another program",
          StorageLost.cause: "database files lost", StorageUnavailable.cause: "database not answering",
          StorageError.cause: "storage error"}


class Throttle:
    """ready() is True at most once per interval: for a log line that could otherwise repeat
    thousands of times a second. Approximate across threads: at worst a line twice."""

    def __init__(self, interval_s: float = REPEATED_LOG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._last_s = float("-inf")

    def ready(self) -> bool:
        now_s = time.monotonic()
        if now_s - self._last_s < self.interval_s:
            return False
        self._last_s = now_s
        return True


class FileIdentity:
    """Whether a path still names the file the server opened (same device and inode).

    One stat of the path tells both: a deleted file gives ENOENT, one deleted and created
    again (or renamed over) another inode. The stat's size is kept, so the caller needs no
    second call for it.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        st = os.stat(path)
        self._id = (st.st_dev, st.st_ino)
        self.size = st.st_size                     # as of the last problem() that found none

    def problem(self) -> str | None:
        """None while the path is the opened file, else what happened to it."""
        name = os.path.basename(self.path)
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return f"{name} was deleted"
        except OSError:
            return None                            # cannot tell (permissions): not evidence of loss
        if not self.is_same(st):
            return f"{name} was replaced by another file"
        self.size = st.st_size
        return None

    def is_same(self, st: os.stat_result) -> bool:
        return (st.st_dev, st.st_ino) == self._id


def wal_write_lock_holder(database: Path) -> int | None:
    """pid of another process writing to database (WAL mode) right now; None when none is,
    or when the kernel cannot say (see CAN_SEE_LOCK_HOLDERS). Never waits."""
    return lock_holder_pid(Path(f"{database}-shm"), WAL_WRITE_LOCK_BYTE, 1)


def lock_holder_pid(path: Path, start: int, length: int) -> int | None:
    """pid of another process holding a POSIX lock on path's bytes start..start+length
    (F_GETLK: this process's own locks never conflict, so they are not seen)."""
    if not CAN_SEE_LOCK_HOLDERS:
        return None
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
