"""SQLite storage: one write connection with group commit, reads on the loop or on a pool.

SQLite lets one connection write at a time, so every write goes through the single write
connection; callers hand it a function and await the result.

A durable commit costs an fsync, so one transaction per write caps throughput at the
disk's sync rate (benchmarks/group_commit.py measures it). Everything that queued up
while the previous batch was committing therefore runs as one transaction, each item
inside its own SAVEPOINT so a failing item is undone alone. Grouped writes (Grouped: a
plan that writes nothing, then an apply) of one kind that follow each other in a batch
share one SAVEPOINT instead, or none when they begin the transaction: each is planned, a
refused plan having written nothing, and their plans are applied together; if that fails,
the group is undone and its items run one by one in their own savepoints, so a failing
item still fails alone.

Write functions run on the event loop's own thread, and so does their COMMIT. Running
the functions on the writer thread cost more: every statement released and re-took the
GIL against the busy loop, with a context switch each time. Handing only the COMMIT to
the writer thread cost a wake-up and two GIL hand-offs per batch, for a COMMIT that only
copies pages into the WAL file (benchmarks/ab.py: 10 % less CPU per receipt at full load
with the COMMIT on the loop). Writes that take long (lifecycle jobs) or come from code
without a loop run and commit on the writer thread.

The COMMIT writes the batch's pages to the WAL (``synchronous=NORMAL``) and the
connection is free for the next batch at once; a sync thread then fdatasyncs the WAL
and only then answers the batch. Nobody is told "done" before the data of their write
is on disk, and the fsync of one batch overlaps the next batch's work instead of holding
the connection: with every receipt read, evaluated and written inside its batch, the
connection waiting for the disk had left the loop idle for a sixth of the time.

The WAL is kept short: a checkpoint thread copies it into the database without blocking
anyone (PASSIVE) and syncs the database file after each copy, having written the copied
pages out a slice at a time, so that a WAL fdatasync never queues behind the whole copy.
SQLite restarts the WAL by itself only when a write begins after a checkpoint copied every
frame and while no reader uses the WAL; a copy of half a second of frames nearly never
ends before the next commit, so once the WAL holds a quarter of wal_checkpoint_bytes the
thread tries to catch up with short passes while no batch is being written, until one ends
first. Should the WAL still pass wal_checkpoint_bytes (commits back to back, a long
reader), the write connection itself, on the write turn between two batches (no batch runs
meanwhile), finishes the copy and restarts the WAL from its beginning (RESTART; the next
commit cuts the file back to that size: journal_size_limit). RESTART waits (briefly) for
readers, and new readers leave the WAL alone once it is all copied. When nothing has been
written for a second the write turn empties the file (TRUNCATE). Run on the write
connection, both keep its page cache, which a checkpoint by another connection that
restarts the WAL would empty.

A full disk, another program's write lock and the database's files deleted or replaced
under the server fail writes with the typed errors of storage.health. The last is checked
by the sync thread after each fdatasync, before it answers, so no write kept only in a
deleted file is acknowledged; the checkpoint thread then salvages: it copies the lost WAL
into the database file, or a lost database file's content into a copy beside it, and moves
aside a WAL file a restart would replay over the wrong database.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import ctypes
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from sqlite_utils import Database as UtilsDatabase
from sqlite_utils.migrations import Migrations

from storage.health import (CAN_SEE_LOCK_HOLDERS, Faults, FileIdentity, StorageBusy, StorageError, StorageFull,
                            StorageLost, Throttle, classify, free_bytes, is_busy, wal_write_lock_holder)

__all__ = ["Database", "Flush", "Grouped", "Overloaded", "Ready", "Refusal", "StorageBusy", "StorageClosed", "StorageError", "StorageFull",
           "StorageLost", "TransactionLost"]

T = TypeVar("T")

log = logging.getLogger(__name__)

# A write function that ran COMMIT, ROLLBACK or touched the writer's savepoint would
# make other callers' writes durable (or lost) behind the writer's back, so the
# authorizer refuses those while a function runs. The writer's own statements carry a
# marker comment: sqlite3 caches prepared statements by their text, and a cached
# statement is not authorized again, so a function sending a plain "COMMIT" must never
# hit the writer's cached one.
_ITEM_SAVEPOINT = "storage_writer_item"
_BEGIN_SQL = "BEGIN IMMEDIATE -- storage writer"
_COMMIT_SQL = "COMMIT -- storage writer"
_ROLLBACK_SQL = "ROLLBACK -- storage writer"
_SAVEPOINT_SQL = f"SAVEPOINT {_ITEM_SAVEPOINT} -- storage writer"
_ROLLBACK_TO_SQL = f"ROLLBACK TO SAVEPOINT {_ITEM_SAVEPOINT} -- storage writer"
_RELEASE_SQL = f"RELEASE SAVEPOINT {_ITEM_SAVEPOINT} -- storage writer"
_GROUP_SAVEPOINT = "storage_writer_group"
_GROUP_SAVEPOINT_SQL = f"SAVEPOINT {_GROUP_SAVEPOINT} -- storage writer"
_GROUP_ROLLBACK_TO_SQL = f"ROLLBACK TO SAVEPOINT {_GROUP_SAVEPOINT} -- storage writer"
_GROUP_RELEASE_SQL = f"RELEASE SAVEPOINT {_GROUP_SAVEPOINT} -- storage writer"

# Who runs the next batch of writes: nobody (nothing queued), an event loop (a callback
# is scheduled there), or it is being run or committed right now.
_IDLE, _LOOP_TURN, _BUSY = "idle", "loop", "busy"
# Writer thread jobs: take the next batch from the queue and run it on this thread; or
# checkpoint the WAL on the write connection between two batches.
_RUN = "run"
_CHECKPOINT = "checkpoint"

DEFAULT_SYNC_TIMEOUT_S = 60.0
# SQLite's automatic checkpoint runs inside the COMMIT that crosses its threshold, so one
# group of receipts would wait for the WAL to be copied into the database and fsynced. A
# thread of its own copies it instead, this often (PASSIVE: it blocks nobody); only the
# RESTART or TRUNCATE it asks for runs on the write turn, between two batches.
CHECKPOINT_INTERVAL_S = 1.0
# While commits come, a PASSIVE every half second instead. Once the WAL holds a quarter of
# wal_checkpoint_bytes, passes every few ms, each only when no batch is being written, try to
# catch up with it: each copies just the frames since the last, and one that reaches the
# WAL's end before the next commit lets that commit start the WAL again from its beginning
# (SQLite does so at a write once every frame is copied and no reader uses them). At one or
# two receipts a commit (450 a second) one of some four passes does, and the write turn's
# RESTART, which every write waits for, is left for when the WAL passes its size anyway
# (back-to-back commits, a long reader). More frequent passes cost CPU on the server's core: each page
# is copied once per pass that finds it changed (benchmarks/RESULTS.md, "The WAL started
# again by itself").
CHECKPOINT_PASS_S = 0.5
CHECKPOINT_CATCH_UP_S = 0.005
CHECKPOINT_CATCH_UP_SHARE = 0.25
# When the sync thread sees the WAL over its size it wakes the checkpoint thread at once
# (at ~100 MB/s of WAL a second is too long), but not more often than this.
CHECKPOINT_MIN_GAP_S = 0.05
# The write connection's checkpoint holds every write meanwhile, so it waits for readers
# only this long; a long reader (an export, a backup) makes it give up and try again later,
# after a pause that doubles up to the maximum while it lasts.
CHECKPOINT_BUSY_WAIT_MS = 100
CHECKPOINT_RETRY_S = 1.0
CHECKPOINT_RETRY_MAX_S = 8.0
# After the WAL was deleted or replaced, copying what it held into the database may wait
# this long for our own last batch and readers.
SALVAGE_BUSY_WAIT_MS = 10_000
# A salvage that failed (a full disk, most likely) is tried again after this pause, doubled
# after each failure up to the maximum: each try of a lost database file writes a whole copy.
SALVAGE_RETRY_S = 1.0
SALVAGE_RETRY_MAX_S = 60.0
DEFAULT_WAL_CHECKPOINT_BYTES = 32 * 1024 * 1024
DEFAULT_MIN_FREE_BYTES = 64 * 1024 * 1024
# The writer's page cache outlives its own commits. At SQLite's default (2 MiB) a batch of
# receipts spilled dirty pages to the WAL before COMMIT (writes on the event loop) and read
# the same index pages back in the next batch. Receipts also read their member through it,
# so a cache as large as the members' hot rows (database.cache_mib) keeps them off the disk.
WRITER_CACHE_MIB = 64
# Readers are not memory-mapped (PRAGMA mmap_size): a reader drops its cache whenever
# another connection has committed, so every batch, and with a mapping it unmaps and maps
# the file again each time. Measured on the receipt path's read: 250-320 us per read
# transaction mapped against 120-200 us through pread.
DEFAULT_CLOSE_TIMEOUT_S = 60.0


class Overloaded(Exception):
    """The write queue (or the number of reads in flight) is at its limit."""


class StorageClosed(Exception):
    """The database is not open, or is closing."""


class TransactionLost(Exception):
    """A write function ended the batch transaction (for example a RAISE(ROLLBACK) trigger)."""


class Flush(Exception):
    """Raised by a grouped write's plan that depends on plans of its group not yet applied
    (the same member, say): they are applied, then it is planned again."""


class Ready:
    """A grouped write's plan that needs no apply: its result is known (a replay)."""

    __slots__ = ("result",)

    def __init__(self, result: Any) -> None:
        self.result = result


class Grouped:
    """A write in two halves, so that the writes of one kind in a batch are applied together.

    plan(conn, group) reads and decides without writing; it returns what apply needs, a
    Ready, or raises Flush. `group` is the planners' own bookkeeping of the plans not yet
    applied in this batch (which members, which shared counters), emptied after each apply.
    apply(conn, plans) writes plans planned in order and returns one result per plan.
    Items with the same apply run as one group: one savepoint, the plans applied with one
    statement per table. If applying fails, the group is undone and its items run again
    one by one, each planned and applied in its own savepoint.
    """

    __slots__ = ("plan", "apply")

    def __init__(self, plan: Callable[[sqlite3.Connection, dict], Any],
                 apply: Callable[[sqlite3.Connection, list], list]) -> None:
        self.plan, self.apply = plan, apply

    def alone(self, conn: sqlite3.Connection) -> Any:
        planned = self.plan(conn, {})
        return planned.result if isinstance(planned, Ready) else self.apply(conn, [planned])[0]


class _Item:
    __slots__ = ("fn", "loop", "future", "off_loop", "deadline_s", "grouped")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], Any],
        loop: asyncio.AbstractEventLoop | None,
        future: asyncio.Future | concurrent.futures.Future,
        off_loop: bool = False,
        busy_wait_s: float = 0.0,
    ) -> None:
        self.fn = fn
        # Until when it may wait for another program's write lock, counted from being queued.
        self.deadline_s = time.monotonic() + busy_wait_s
        # None for write_sync callers, who wait on a concurrent.futures.Future.
        self.loop = loop
        self.future = future
        self.off_loop = off_loop or loop is None
        self.grouped: Grouped | None = None


class _Done:
    """A batch whose functions have run: what its thread commits and the sync thread answers."""

    __slots__ = ("batch", "outcomes", "commit", "started_s", "wrote")

    def __init__(self, batch: list[_Item], outcomes: list[tuple[bool, Any]], commit: bool,
                 started_s: float) -> None:
        self.batch = batch
        self.outcomes = outcomes
        # False: nothing of the batch is left in an open transaction.
        self.commit = commit
        self.started_s = started_s
        # Whether its COMMIT had rows to write: only that shows the disk has room again.
        self.wrote = False


class Refusal(Exception):
    """What a write function raises to refuse its write (unknown card, too few points): an
    answer for its caller, not a fault.

    Delivered without the traceback of the writer's frames. That traceback held the frame
    that caught it, and through each frame's caller every frame of the batch's turn, whose
    locals (the batch, its futures, which then held the refusal) closed a reference cycle
    over the whole batch: its receipts, plans and answers were freed only by the cyclic
    collector, whose full collections then took 5 to 60 ms of the event loop."""


def _deliverable(err: BaseException) -> BaseException:
    # SystemExit or KeyboardInterrupt from a write function must not stop the awaiting
    # event loop, and asyncio refuses StopIteration as a future's exception.
    if isinstance(err, Refusal):
        return err.with_traceback(None)
    if isinstance(err, Exception) and not isinstance(err, StopIteration):
        return err
    wrapped = RuntimeError(f"write function raised {type(err).__name__}: {err}")
    wrapped.__cause__ = err
    return wrapped


def _sync_folder(folder: Path) -> None:
    # A rename is durable once its folder is synced.
    fd = os.open(folder, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_file_range():
    """Linux's sync_file_range(2), or None where the C library has none. Called through
    ctypes, it runs without the GIL, as os.fdatasync does."""
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError, TypeError):
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return call


_SYNC_FILE_RANGE = _sync_file_range()
# SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER
_WRITE_AND_WAIT = 1 | 2 | 4
DATABASE_WRITE_OUT_SLICE_BYTES = 256 * 1024
# Each slice is a system call, clean or not: a file of many GB would cost tens of ms of CPU
# every flush at 256 KiB, so a large file's slices grow to keep their number bounded.
DATABASE_WRITE_OUT_SLICES_MAX = 1024


def _write_out_in_slices(fd: int) -> None:
    """Writes the file's dirty pages out a slice at a time, each waited for before the next.

    A checkpoint's copy leaves some MB of the database file dirty; one fdatasync sends them
    to the disk at once, and the WAL's fdatasync that comes meanwhile, which a batch of
    receipts waits for, queues behind all of it (the slowest WAL syncs overlapped the
    database file's sync 10 to 45 times more often than the others). A slice at a time,
    it waits behind one slice at most. The fdatasync after it still makes the file durable;
    this only orders the writing."""
    if _SYNC_FILE_RANGE is None:
        return
    size = os.fstat(fd).st_size
    slice_bytes = max(DATABASE_WRITE_OUT_SLICE_BYTES, -(-size // DATABASE_WRITE_OUT_SLICES_MAX))
    for offset in range(0, size, slice_bytes):
        if _SYNC_FILE_RANGE(fd, offset, slice_bytes, _WRITE_AND_WAIT) != 0:
            return          # the fdatasync that follows writes the rest and reports a failure


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _settle_async(entries: list[tuple[asyncio.Future, bool, Any]]) -> None:
    for future, ok, value in entries:
        if future.done():
            # The awaiter was cancelled: the write happened, nobody wants the answer.
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class Database:
    # What the server asks to tell the two databases apart (storage/pg/database.py).
    backend = "sqlite"
    def __init__(
        self,
        path: str | Path,
        *,
        migrations: Migrations,
        batch_max: int = 256,
        queue_max: int = 10_000,
        readers: int = 2,
        busy_timeout_ms: int = 5_000,
        cache_mib: int = WRITER_CACHE_MIB,
        wal_checkpoint_bytes: int = DEFAULT_WAL_CHECKPOINT_BYTES,
        min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
        on_commit: Callable[[int, float], None] | None = None,
        on_checkpoint: Callable[[str, str, float], None] | None = None,
        on_storage_error: Callable[[str, int], None] | None = None,
        checkpoints: bool = True,
    ) -> None:
        """busy_timeout_ms: how long a write may wait for another program's write lock,
        from the moment it is queued, before it fails with StorageBusy.

        checkpoints=False: no checkpoint thread and no checkpoints on the write turn, for a
        command run beside a serving server, which owns them; SQLite's own automatic
        checkpoint bounds the WAL when the command runs alone. A lost file is refused as
        always but not salvaged (the checkpoint thread does that)."""
        if (batch_max < 1 or queue_max < 1 or readers < 1 or busy_timeout_ms < 0 or cache_mib < 1
                or wal_checkpoint_bytes < 1 or min_free_bytes < 0):
            raise ValueError("batch_max, queue_max, readers, cache_mib and wal_checkpoint_bytes must be >= 1, "
                             "busy_timeout_ms and min_free_bytes >= 0")
        self._path = Path(path)
        self._migrations = migrations
        self._batch_max = batch_max
        self._queue_max = queue_max
        self._readers_max = readers
        self._busy_timeout_ms = busy_timeout_ms
        self._busy_wait_s = busy_timeout_ms / 1000
        self._cache_mib = cache_mib
        self._wal_checkpoint_bytes = wal_checkpoint_bytes
        self._min_free_bytes = min_free_bytes
        self._on_commit = on_commit
        self._on_checkpoint = on_checkpoint
        self._checkpoints = checkpoints
        self._faults = Faults(self._path.name, on_storage_error)

        self._lock = threading.Lock()
        self._not_full = threading.Condition(self._lock)
        self._pending: collections.deque[_Item] = collections.deque()
        # Only one batch at a time uses the write connection; _turn says whose go it is.
        self._turn = _IDLE
        self._turn_loop: asyncio.AbstractEventLoop | None = None
        self._jobs: queue.SimpleQueue[_Done | list[_Item] | str] = queue.SimpleQueue()
        # The write connection's busy_timeout now; on the event loop it must be 0 (see _begin).
        self._busy_timeout_now_ms = busy_timeout_ms
        self._state = "new"  # new -> open -> closing -> closed
        self._close_lock = threading.Lock()

        self._conn: sqlite3.Connection | None = None
        self._writer: threading.Thread | None = None
        # Only whoever runs the current batch reads or sets this; see _authorize.
        self._fn_running = False
        # A broken metrics hook would otherwise log once per commit, thousands of times a second.
        self._hook_error_log = Throttle()
        self._changes_seen = 0

        # Committed batches waiting for the WAL to reach the disk, for the sync thread.
        self._syncs: queue.SimpleQueue[_Done | None] = queue.SimpleQueue()
        self._syncer: threading.Thread | None = None
        self._wal_fd: int | None = None
        # The checkpoint thread's handle for syncing the database file (_flush_copied_pages).
        # Opened once and closed after every connection: closing any descriptor of the file
        # drops all of this process's POSIX locks on it, SQLite's included, and another
        # process's connection could then think itself the last one and delete the WAL.
        self._db_fd: int | None = None
        self._files: list[FileIdentity] = []     # the database file, then its WAL
        self._lost: str | None = None            # what happened to the files, once seen
        self._lost_file: FileIdentity | None = None
        # Where every acknowledged write is, once the salvage after a loss put it there.
        self._salvaged_into: str | None = None
        self._salvage_retry_at_s = 0.0
        self._salvage_retry_s = SALVAGE_RETRY_S
        self._wrote_at_s = 0.0                   # when a commit last wrote: is the server idle?
        self._checkpointer: threading.Thread | None = None
        self._ckpt_conn: sqlite3.Connection | None = None
        # One checkpoint at a time in this process: SQLite would refuse a second one at once.
        self._ckpt_lock = threading.Lock()
        self._ckpt_wake = threading.Event()
        self._ckpt_wanted: str | None = None     # a mode for the write connection to run
        self._ckpt_retry_at_s = 0.0
        self._ckpt_retry_s = CHECKPOINT_RETRY_S
        self._ckpt_busy_log = Throttle()
        self._ckpt_backfilled = 0                # frames copied as of the last PASSIVE
        self._ckpt_frames = 0                    # frames in the WAL as of the last PASSIVE
        self._frame_bytes = 4096 + 24
        self._stop_checkpoints = threading.Event()
        # Start of each open read transaction of ours, by connection (the oldest holds the WAL).
        self._reads_started: dict[sqlite3.Connection, float] = {}
        self._reader_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._reader_local = threading.local()
        # read_now()'s connections, one per calling thread (an event loop's thread).
        self._inline_local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._reads_in_flight = 0
        self._utils: dict[sqlite3.Connection, UtilsDatabase] = {}

    @classmethod
    def from_config(cls, database: Any, path: str | Path, *, migrations: Migrations,
                    checkpoints: bool = True, **hooks: Any) -> Database:
        """The Database a config's `database` section (server.config.DatabaseConfig) describes,
        for the server and for commands alike; hooks: on_commit, on_checkpoint, on_storage_error.
        A command beside a serving server passes checkpoints=False (see __init__)."""
        mib = 1024 * 1024
        return cls(path, migrations=migrations, batch_max=database.commit_batch_max,
                   queue_max=database.write_queue_max, readers=database.readers, cache_mib=database.cache_mib,
                   busy_timeout_ms=round(database.busy_wait_seconds * 1000),
                   wal_checkpoint_bytes=database.wal_checkpoint_mib * mib,
                   min_free_bytes=database.min_free_mib * mib, checkpoints=checkpoints, **hooks)

    # -- lifecycle ---------------------------------------------------------------

    def open(self) -> None:
        with self._close_lock:
            if self._state != "new":
                raise RuntimeError(f"Database.open() on a {self._state} database; make a new one")
            self._path.parent.mkdir(parents=True, exist_ok=True)
            conn = self._connect(self._path)
            try:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    # Without WAL, readers block the writer and group commit loses its point.
                    raise RuntimeError(f"{self._path}: journal_mode is {mode!r}, WAL is required")
                # The COMMIT only writes the WAL; the sync thread makes it durable before
                # anyone is answered (see the module's docstring).
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA foreign_keys=ON")
                if self._checkpoints:
                    conn.execute("PRAGMA wal_autocheckpoint=0")
                # The first commit after the WAL was restarted cuts the file back to this size.
                conn.execute(f"PRAGMA journal_size_limit={int(self._wal_checkpoint_bytes)}")
                conn.execute(f"PRAGMA cache_size=-{self._cache_mib * 1024}")
                # Each queued write runs in its own SAVEPOINT: the original of every page it
                # changes goes to the savepoint journal, a temporary file past 64 KiB (a
                # pwrite per page on the event loop). It is never synced or needed after
                # COMMIT, so it may as well live in memory.
                conn.execute("PRAGMA temp_store=MEMORY")
                self._migrations.apply(self.sqlite_utils(conn))
                # Installed after the migrations: setting an authorizer expires every
                # cached statement, including the BEGIN/COMMIT sqlite-utils just ran.
                conn.set_authorizer(self._authorize)
                # The migrations wrote, so the WAL exists; it lives as long as this connection.
                self._wal_fd = os.open(self._wal_path(), os.O_RDWR)
                self._files = [FileIdentity(str(self._path)), FileIdentity(self._wal_path())]
                self._frame_bytes = conn.execute("PRAGMA page_size").fetchone()[0] + 24
                if self._checkpoints:
                    self._db_fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
                    self._ckpt_conn = self._checkpoint_connection()
            except BaseException:
                self._utils.pop(conn, None)
                conn.close()
                self._close_descriptors()
                raise
            self._conn = conn
            self._reader_pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=self._readers_max, thread_name_prefix=f"sqlite-reader-{self._path.name}"
            )
            self._writer = threading.Thread(
                target=self._writer_main,
                name=f"sqlite-writer-{self._path.name}",
                # A daemon thread killed at interpreter exit leaves an uncommitted
                # transaction, which SQLite discards: nobody was told it was durable.
                daemon=True,
            )
            self._syncer = threading.Thread(
                target=self._syncer_main, name=f"sqlite-sync-{self._path.name}", daemon=True)
            if self._checkpoints:
                self._checkpointer = threading.Thread(
                    target=self._checkpoint_main, name=f"sqlite-checkpoint-{self._path.name}", daemon=True)
            with self._lock:
                self._state = "open"
            self._writer.start()
            self._syncer.start()
            if self._checkpointer is not None:
                self._checkpointer.start()

    def close(self, timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S) -> None:
        """Stop accepting work, commit everything already queued, release the file."""
        with self._close_lock:
            with self._lock:
                if self._state == "closed":
                    return
                if self._state == "new":
                    self._state = "closed"
                    return
                self._state = "closing"
                self._not_full.notify_all()
                if self._turn != _BUSY:
                    # A loop given the turn may be the one blocked in this call: the writer
                    # thread drains the queue instead, and stops once it is empty.
                    self._turn = _BUSY
                    self._jobs.put(_RUN)
            assert self._writer is not None and self._reader_pool is not None
            self._writer.join(timeout_s)
            if self._writer.is_alive():
                # Closing the connection under a running write would corrupt nothing but
                # would fail it in confusing ways; leave it to finish, let close() be retried.
                raise TimeoutError(
                    f"writer for {self._path} still busy after {timeout_s}s "
                    f"({len(self._pending)} queued); close() can be called again"
                )
            # Everything the writer committed is answered once the sync thread has synced it.
            self._syncs.put(None)
            assert self._syncer is not None
            self._syncer.join(timeout_s)
            self._reader_pool.shutdown(wait=True)
            self._stop_checkpoints.set()
            self._ckpt_wake.set()
            self._join_checkpointer(timeout_s)
            with self._lock:
                reader_conns, self._reader_conns = self._reader_conns, []
                self._utils.clear()
            for conn in reader_conns:
                conn.close()
            # Closing the last connection deletes the WAL: that is no loss to report.
            self._files = []
            # Closed last: the last connection to go checkpoints the WAL into the main file.
            assert self._conn is not None
            self._conn.close()
            self._close_descriptors()
            with self._lock:
                self._state = "closed"

    def _close_descriptors(self) -> None:
        """After the connections: see _db_fd."""
        for name in ("_wal_fd", "_db_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    def _join_checkpointer(self, timeout_s: float) -> None:
        """The checkpoint thread closes its own connection as it ends: a salvage may still be
        copying through it, and closing it under the copy would fail the copy."""
        if self._checkpointer is None:
            return
        if self._lock_held_by_salvage():
            log.warning("storage %s: closing waits up to %.0fs for the copy of the lost file's writes",
                        self._path.name, timeout_s)
        self._checkpointer.join(timeout_s)
        if self._checkpointer.is_alive():
            log.critical("storage %s: the copy of the lost file's writes is still running after %.0fs; it "
                         "goes on while the process lives (a copy cut short is never named .saved-)",
                         self._path.name, timeout_s)

    def _lock_held_by_salvage(self) -> bool:
        return self._lost is not None and self._salvaged_into is None and self._ckpt_lock.locked()

    def __enter__(self) -> Database:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def path(self) -> Path:
        return self._path

    def queue_depth(self) -> int:
        """Writes waiting for their batch, not counting the batch running or committing."""
        return len(self._pending)

    def sqlite_utils(self, conn: sqlite3.Connection) -> UtilsDatabase:
        """sqlite-utils view of a connection handed to a write or read function.

        Inside a write, sqlite-utils' own atomic() blocks become nested savepoints; its
        begin()/commit()/rollback() are refused like any other transaction control.
        """
        with self._lock:
            utils = self._utils.get(conn)
            if utils is None:
                # recursive_triggers stays at SQLite's default so wrapping a connection
                # does not change what its triggers do; plugins are not ours to load.
                utils = UtilsDatabase(conn, recursive_triggers=False, execute_plugins=False)
                if conn is self._conn or conn in self._reader_conns or self._state == "new":
                    self._utils[conn] = utils
            return utils

    # -- writes ------------------------------------------------------------------

    async def write(self, fn: Callable[[sqlite3.Connection], T], *, off_loop: bool = False) -> T:
        """Run fn(conn) in the next group commit; returns once the WAL holding its COMMIT was
        fdatasynced and is still the database's WAL on disk (StorageLost otherwise).

        fn runs on the event loop's thread, between other callbacks, so it must be short
        (a receipt: its read, its rules and its postings, well under a millisecond); with
        off_loop=True it runs on the writer thread instead,
        for functions that take long (a job's batch of hundreds of rows) or block.

        fn must not run BEGIN/COMMIT/ROLLBACK (it is refused with "not authorized"); it
        may use its own savepoints. If another item of the batch destroys the whole
        transaction (a RAISE(ROLLBACK) trigger, disk full), fn is run a second time in a
        fresh transaction, so fn must not have effects outside the connection.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._refuse_if_lost()
        with self._lock:
            self._refuse_unless_open()
            if len(self._pending) >= self._queue_max:
                raise Overloaded(f"{len(self._pending)} writes queued (queue_max={self._queue_max})")
            self._pending.append(_Item(fn, loop, future, off_loop, self._busy_wait_s))
            self._start_turn(None if off_loop else loop)
        try:
            return await future
        except BaseException:
            future = None  # type: ignore[assignment] # see write_grouped
            raise

    async def write_grouped(self, grouped: Grouped) -> Any:
        """write() for a write in two halves (Grouped), applied with the others of its kind
        that share its batch; answered like write() once its group commit is durable."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._refuse_if_lost()
        with self._lock:
            self._refuse_unless_open()
            if len(self._pending) >= self._queue_max:
                raise Overloaded(f"{len(self._pending)} writes queued (queue_max={self._queue_max})")
            item = _Item(grouped.alone, loop, future, False, self._busy_wait_s)
            item.grouped = grouped
            self._pending.append(item)
            self._start_turn(loop)
        try:
            return await future
        except BaseException:
            # The refusal raised here holds this frame in its traceback, and the future holds
            # the refusal: dropped, they are freed by their counts, not by a full collection.
            future = item = None  # type: ignore[assignment]
            raise

    def write_sync(
        self, fn: Callable[[sqlite3.Connection], T], *, timeout_s: float = DEFAULT_SYNC_TIMEOUT_S
    ) -> T:
        """write() for code without an event loop: waits for room in the queue, then for the commit.

        On TimeoutError the write may still be committed later.
        """
        self._refuse_blocking_here()
        self._refuse_if_lost()
        deadline = time.monotonic() + timeout_s
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            while True:
                self._refuse_unless_open()
                if len(self._pending) < self._queue_max:
                    break
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    raise Overloaded(f"write queue stayed full for {timeout_s}s")
                self._not_full.wait(remaining_s)
            self._pending.append(_Item(fn, None, future, busy_wait_s=self._busy_wait_s))
            self._start_turn(None)
        return future.result(timeout=max(0.0, deadline - time.monotonic()))

    # -- reads -------------------------------------------------------------------

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn(conn) on a reader thread, inside one read transaction (one snapshot).

        For reads that take long (statements, exports), which must not stall the loop;
        short indexed ones are cheaper with read_now().
        """
        with self._reading():
            return await asyncio.wrap_future(self._submit_read(fn))

    async def lookup(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A short indexed read for a request (a member by card): read_now(), here on the
        loop. The interface both databases offer for it: PostgreSQL's goes over the network
        and runs on a pool thread."""
        return self.read_now(fn)

    def read_now(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn(conn) in the calling thread, inside one read transaction (one snapshot).

        For short indexed reads on the event loop (the receipt path): handing a read of tens
        of µs to a reader thread costs more than the read itself (two thread hops, and the
        reader must win the GIL from the busy loop). WAL readers never wait for the writer,
        so this does not block the loop behind a COMMIT. Long reads belong in read().
        """
        if self._state != "open":
            raise StorageClosed(f"{self._path} is {self._state}")
        self._refuse_if_lost()
        conn = getattr(self._inline_local, "conn", None)
        if conn is None:
            conn = self._inline_local.conn = self._read_connection()
        if conn.in_transaction:
            raise RuntimeError("read_now() cannot be nested inside another read_now() function")
        return self._in_read_transaction(conn, fn)

    def read_sync(
        self, fn: Callable[[sqlite3.Connection], T], *, timeout_s: float = DEFAULT_SYNC_TIMEOUT_S
    ) -> T:
        self._refuse_blocking_here()
        with self._reading():
            return self._submit_read(fn).result(timeout=timeout_s)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        # The executor's own queue has no bound; this one does.
        with self._lock:
            self._refuse_unless_open()
            if self._reads_in_flight >= self._queue_max:
                raise Overloaded(f"{self._reads_in_flight} reads in flight (limit {self._queue_max})")
            self._reads_in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._reads_in_flight -= 1

    def _submit_read(self, fn: Callable[[sqlite3.Connection], T]) -> concurrent.futures.Future[T]:
        assert self._reader_pool is not None
        try:
            return self._reader_pool.submit(self._run_read, fn)
        except RuntimeError as err:  # the pool was shut down between the check and here
            raise StorageClosed(f"{self._path} is {self._state}") from err

    def _run_read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        self._refuse_if_lost()
        conn = getattr(self._reader_local, "conn", None)
        if conn is None:
            conn = self._reader_local.conn = self._read_connection()
        return self._in_read_transaction(conn, fn)

    def _read_connection(self) -> sqlite3.Connection:
        conn = self._connect(self._path.resolve().as_uri() + "?mode=ro", uri=True)
        conn.execute("PRAGMA query_only=ON")
        with self._lock:
            self._reader_conns.append(conn)
        return conn

    def _in_read_transaction(self, conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
        # One transaction per call so several SELECTs in fn agree with each other.
        conn.execute("BEGIN")
        self._reads_started[conn] = time.monotonic()
        try:
            return fn(conn)
        except sqlite3.Error as err:
            # Another program's exclusive lock or a lost file can stop reads too: same answer.
            fault = classify(err, self._disk_low)
            if isinstance(fault, StorageError):
                self._faults.record(fault)
                raise fault from err
            raise
        finally:
            self._reads_started.pop(conn, None)
            if conn.in_transaction:
                conn.execute("ROLLBACK")

    def oldest_read_seconds(self) -> float:
        """Age of the oldest read transaction open on this server's connections (0: none).
        Other processes' readers are not seen."""
        # A copy taken in one C call: reader threads add and remove entries meanwhile.
        starts = list(self._reads_started.values())
        return max(0.0, time.monotonic() - min(starts)) if starts else 0.0

    # -- checkpoints -------------------------------------------------------------

    def _checkpoint_connection(self) -> sqlite3.Connection:
        conn = self._connect(self._path)
        try:
            conn.execute("PRAGMA synchronous=FULL")
            # Opens the WAL now: should the file be deleted later, this connection still reads
            # the frames it holds and can copy them into the database (_salvage).
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except BaseException:
            conn.close()
            raise
        return conn

    def _checkpoint_main(self) -> None:
        try:
            while not self._stop_checkpoints.is_set():
                catch_up = self._catching_up()
                woken = self._ckpt_wake.wait(self._pass_interval(catch_up))
                self._ckpt_wake.clear()
                if self._stop_checkpoints.is_set():
                    return
                # A batch being written commits during the pass, so the pass could not catch up.
                if catch_up and not woken and not self._writer_idle():
                    continue
                # While a long reader holds the WAL, wake-ups after each commit wait for the retry.
                if not woken or self._lost is not None or time.monotonic() >= self._ckpt_retry_at_s:
                    try:
                        self._checkpoint_round(idle=not self._writing(), catch_up=catch_up and not woken)
                    except BaseException:  # noqa: BLE001 - the checkpoints must go on
                        log.exception("storage %s: checkpoint round failed", self._path.name)
                if woken:
                    # Woken after every commit while the WAL is over its size: not a round each time.
                    self._stop_checkpoints.wait(CHECKPOINT_MIN_GAP_S)
        finally:
            self._checkpoints_end()

    def _checkpoints_end(self) -> None:
        """Closing: one last salvage, whatever the pause (the files go with the connections),
        then the checkpoint connection, closed by this thread, which may have been copying."""
        try:
            if self._lost is not None and self._salvaged_into is None:
                self._salvage()
        except BaseException:  # noqa: BLE001 - the connection is closed all the same
            log.exception("storage %s: the last salvage failed", self._path.name)
        with self._ckpt_lock:
            conn, self._ckpt_conn = self._ckpt_conn, None
        if conn is not None:
            conn.close()

    def _checkpoint_round(self, idle: bool, catch_up: bool = False) -> None:
        if self._check_files() is not None:
            self._salvage_when_due()
            return
        with self._lock:
            if self._ckpt_wanted is not None:
                return                            # the write connection is about to do it
        passive = None
        if self._ckpt_lock.acquire(blocking=False):
            try:
                # PASSIVE never blocks the writer or readers and copies most of the WAL.
                passive = self._checkpoint(self._ckpt_conn, "PASSIVE")  # type: ignore[arg-type]
            finally:
                self._ckpt_lock.release()
        # The third column counts the frames copied since the WAL began again: a pass copied
        # something when it moved. A pass trying to catch up leaves its few pages to the sync
        # SQLite makes once one reaches the WAL's end: a sync of its own each time would
        # double the fdatasyncs of those passes, beside the WAL's after every commit.
        if passive is not None and not catch_up and passive[2] > 0 and passive[2] != self._ckpt_backfilled:
            self._flush_copied_pages()
        if passive is not None:
            self._ckpt_backfilled, self._ckpt_frames = passive[2], passive[1]
        if time.monotonic() < self._ckpt_retry_at_s:
            return
        if idle and self.wal_bytes() > 0:
            self._want_checkpoint("TRUNCATE")     # nothing is written: give the file back
        elif passive is not None and passive[1] * self._frame_bytes > self._wal_checkpoint_bytes:
            self._want_checkpoint("RESTART")

    def _writing(self) -> bool:
        return time.monotonic() - self._wrote_at_s < CHECKPOINT_INTERVAL_S

    def _catching_up(self) -> bool:
        """Whether the next passes try to catch up with the WAL (CHECKPOINT_CATCH_UP_S)."""
        return (self._writing() and self._lost is None
                and self._ckpt_frames * self._frame_bytes >= self._wal_checkpoint_bytes * CHECKPOINT_CATCH_UP_SHARE)

    def _pass_interval(self, catch_up: bool) -> float:
        if catch_up:
            return CHECKPOINT_CATCH_UP_S
        return CHECKPOINT_PASS_S if self._writing() else CHECKPOINT_INTERVAL_S

    def _writer_idle(self) -> bool:
        with self._lock:
            return self._turn == _IDLE and not self._pending

    def _flush_copied_pages(self) -> None:
        """fdatasync of the database file after a PASSIVE that copied frames (its pages
        written out in slices first: _write_out_in_slices).

        SQLite syncs the database file only when a checkpoint finds it copied up to the WAL's
        current end, which under load a commit during the copy has always moved: the pages
        a PASSIVE copied stayed dirty until the RESTART on the write turn, whose fdatasync
        then wrote tens of MB while every write waited (10-30 ms a RESTART at 450
        receipts/s, the slowest 1 % of requests). Synced here, off the write turn, the
        RESTART's own sync finds only the pages committed since. Only ever an extra sync:
        should it fail, the RESTART's sync fails the same way and is reported there."""
        if self._db_fd is None:
            return
        try:
            _write_out_in_slices(self._db_fd)
            os.fdatasync(self._db_fd)
        except OSError as err:
            log.debug("storage %s: fdatasync of the database file after a checkpoint failed: %s",
                      self._path.name, err)

    def _want_checkpoint(self, mode: str) -> None:
        """Asks for a checkpoint on the write connection at the next turn between batches."""
        with self._lock:
            if self._state != "open" or self._ckpt_wanted is not None:
                return
            self._ckpt_wanted = mode
            if self._turn == _IDLE:
                self._turn, self._turn_loop = _BUSY, None
                self._jobs.put(_CHECKPOINT)

    def _checkpoint_on_writer(self) -> None:
        """On the write turn: no batch runs meanwhile, so the WAL can be restarted (RESTART,
        the next commit cuts the file back) or emptied (TRUNCATE) without emptying the write
        connection's cache. Waits briefly for readers; a long one makes it retry later."""
        with self._lock:
            mode, self._ckpt_wanted = self._ckpt_wanted, None
        conn = self._conn
        if mode is None or conn is None or self._lost is not None:
            return
        if not self._ckpt_lock.acquire(timeout=CHECKPOINT_BUSY_WAIT_MS / 1000):
            return
        try:
            self._set_busy_timeout(conn, CHECKPOINT_BUSY_WAIT_MS)
            row = self._checkpoint(conn, mode)
        finally:
            self._ckpt_lock.release()
        if row is not None and not row[0]:
            self._ckpt_retry_s, self._ckpt_retry_at_s = CHECKPOINT_RETRY_S, 0.0
            return
        self._ckpt_retry_at_s = time.monotonic() + self._ckpt_retry_s
        self._ckpt_retry_s = min(self._ckpt_retry_s * 2, CHECKPOINT_RETRY_MAX_S)
        if row is not None and self._ckpt_busy_log.ready():
            log.warning("storage %s: the WAL (%d MiB) cannot be restarted while a reader uses it (our oldest "
                        "read is %.0fs old; other processes' readers are not seen); retrying",
                        self._path.name, self.wal_bytes() // (1024 * 1024), self.oldest_read_seconds())

    def _checkpoint(self, conn: sqlite3.Connection, mode: str) -> tuple[int, int, int] | None:
        """PRAGMA wal_checkpoint(mode): (busy, frames in the WAL, frames copied), None on error."""
        started_s = time.perf_counter()
        row: tuple[int, int, int] | None = None
        try:
            row = tuple(conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone())  # type: ignore[assignment]
            result = "busy" if row[0] else ("done" if row[1] == row[2] else "partial")  # type: ignore[index]
        except sqlite3.Error as err:
            result = "full" if isinstance(classify(err, self._disk_low), StorageFull) else "error"
            log.debug("storage %s: %s checkpoint failed: %s", self._path.name, mode, err)
        if self._on_checkpoint is not None:
            try:
                self._on_checkpoint(mode.lower(), result, time.perf_counter() - started_s)
            except Exception:  # noqa: BLE001 - a metrics hook must not stop checkpoints
                log.debug("checkpoint hook failed", exc_info=True)
        return row

    # -- helpers -----------------------------------------------------------------

    def _connect(self, target: str | Path, *, uri: bool = False) -> sqlite3.Connection:
        conn = sqlite3.connect(
            target,
            uri=uri,
            isolation_level=None,
            check_same_thread=False,
            timeout=self._busy_timeout_ms / 1000,
        )
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_ms)}")
        return conn

    def _refuse_unless_open(self) -> None:
        # Caller holds self._lock.
        if self._state != "open":
            raise StorageClosed(f"{self._path} is {self._state}")

    def _refuse_blocking_here(self) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("this would block the event loop: use 'await db.write()' / 'await db.read()'")
        if threading.current_thread() is self._writer or getattr(self._reader_local, "conn", None):
            raise RuntimeError("a write or read function cannot wait for another one: it would deadlock")

    def _authorize(self, action: int, arg1: str | None, arg2: str | None, *_: object) -> int:
        if self._fn_running and (
            action == sqlite3.SQLITE_TRANSACTION
            or (action == sqlite3.SQLITE_SAVEPOINT and arg2 in (_ITEM_SAVEPOINT, _GROUP_SAVEPOINT))
        ):
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    # -- group commit ------------------------------------------------------------

    def _start_turn(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Caller holds self._lock and just queued an item: make sure a batch will take it."""
        if self._turn == _LOOP_TURN and self._turn_loop is not None and self._turn_loop.is_closed():
            self._turn = _IDLE  # that loop went away before taking its turn
        if self._turn != _IDLE:
            return  # the batch in progress hands the turn on when it is committed
        if loop is None:
            self._turn = _BUSY
            self._jobs.put(_RUN)
        else:
            self._turn, self._turn_loop = _LOOP_TURN, loop
            # Not run right here: writes queued by other callbacks of this round join it.
            loop.call_soon(self._loop_turn, loop)

    def _take(self, on_loop: bool) -> list[_Item]:
        # Caller holds self._lock. A batch stops where the items meant for the other side
        # begin, unless closing, when the writer thread takes everything.
        count = min(len(self._pending), self._batch_max)
        if on_loop or self._state == "open":
            for position in range(count):
                if self._for_loop(self._pending[position]) != on_loop:
                    count = position
                    break
        batch = [self._pending.popleft() for _ in range(count)]
        if batch:
            self._not_full.notify_all()
        return batch

    @staticmethod
    def _for_loop(item: _Item) -> bool:
        return not item.off_loop and not item.loop.is_closed()  # type: ignore[union-attr]

    def _loop_turn(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the event loop: run the queued write functions and COMMIT them."""
        with self._lock:
            if self._turn != _LOOP_TURN or self._turn_loop is not loop:
                return  # close() passed the turn to the writer thread
            self._turn, self._turn_loop = _BUSY, None
            batch = self._take(on_loop=True)
            if not batch:
                self._jobs.put(_RUN)  # the first one waiting is for the writer thread
                return
        done = self._run_functions(batch, on_loop=True)
        if done is None:
            # Another process holds the lock: the writer thread waits for it.
            self._jobs.put(batch)
            return
        try:
            next_job = self._commit_and_answer(done)
        except BaseException:  # noqa: BLE001 - the turn must move on whatever happened
            log.exception("storage writer: unexpected failure on the event loop")
            next_job = self._turn_after_failure()
        if next_job is not None:
            self._jobs.put(next_job)

    def _writer_main(self) -> None:
        while True:
            job: _Done | list[_Item] | str | None = self._jobs.get()
            while job is not None:
                # Every step is guarded: the writer must outlive anything, and once COMMIT
                # returned nothing may turn a committed write into a reported failure.
                try:
                    if job == _CHECKPOINT:
                        self._checkpoint_on_writer()
                        job = self._hand_on()
                    else:
                        job = self._run_job(job)
                except BaseException:  # noqa: BLE001
                    log.exception("storage writer: unexpected failure")
                    job = self._turn_after_failure()
                if job is None and self._stopped():
                    return

    def _run_job(self, job: _Done | list[_Item] | str) -> _Done | str | None:
        if job == _RUN:
            with self._lock:
                job = self._take(on_loop=False) or None  # type: ignore[assignment]
        done = self._run_functions(job, on_loop=False) if isinstance(job, list) else job
        if not isinstance(done, _Done):
            done = _Done([], [], False, 0.0)      # nothing was queued: the turn still moves on
        return self._commit_and_answer(done)

    def _turn_after_failure(self) -> str | None:
        """_RUN if the failed batch still held the turn (the writer thread goes on with the
        queue), None if it had already been passed on."""
        with self._lock:
            return _RUN if self._turn == _BUSY else None

    def _stopped(self) -> bool:
        with self._lock:
            return self._state != "open" and self._turn == _IDLE

    def _run_functions(self, batch: list[_Item], on_loop: bool) -> _Done | None:
        """Runs the batch's functions in one open transaction. None: the loop must leave it to the writer thread."""
        conn = self._conn
        assert conn is not None
        started_s = time.perf_counter()
        if self._lost is not None:
            return _Done(batch, [(False, StorageLost(self._lost))] * len(batch), False, started_s)
        # Each item waits for another program's lock at most busy_timeout_ms from being queued.
        wait_ms = 0 if on_loop else max(0, int((min(i.deadline_s for i in batch) - time.monotonic()) * 1000))
        try:
            self._begin(conn, wait_ms)
            if self._faults.current is not None:
                self._faults.clear(StorageBusy.cause)
            outcomes, commit = self._run_in_transaction(conn, batch)
        except BaseException as err:  # noqa: BLE001
            if on_loop and is_busy(err):
                # Another process holds the write lock: wait for it on the writer thread,
                # not here, where waiting would stall every request.
                return None
            # BEGIN failed (busy beyond busy_timeout, I/O error): nothing of this batch
            # is durable, so nobody may hear otherwise.
            self._rollback_quietly(conn)
            if is_busy(err):
                err = StorageBusy(f"waited {wait_ms / 1000:.1f}s for it")
            return _Done(batch, [(False, _deliverable(err))] * len(batch), False, started_s)
        return _Done(batch, outcomes, commit, started_s)

    def _begin(self, conn: sqlite3.Connection, wait_ms: int) -> None:
        self._set_busy_timeout(conn, wait_ms)
        conn.execute(_BEGIN_SQL)

    def _set_busy_timeout(self, conn: sqlite3.Connection, wait_ms: int) -> None:
        if wait_ms != self._busy_timeout_now_ms:
            conn.execute(f"PRAGMA busy_timeout={int(wait_ms)}")
            self._busy_timeout_now_ms = wait_ms

    def _run_in_transaction(self, conn: sqlite3.Connection,
                            batch: list[_Item]) -> tuple[list[tuple[bool, Any]], bool]:
        """Runs each item in its savepoint, or each run of grouped items of one kind in one
        (_run_group); returns (ok, result or exception) per item and whether to COMMIT."""
        outcomes: list[tuple[bool, Any]] = [(False, None)] * len(batch)
        todo = list(range(len(batch)))
        grouping = True
        try:
            while True:
                done_ok: list[int] = []
                lost_at: int | None = None
                position = 0
                while position < len(todo):
                    run = self._group_run(batch, todo, position) if grouping else 0
                    indexes = todo[position:position + max(run, 1)]
                    results = (self._run_group(conn, [batch[i] for i in indexes], first=position == 0) if run
                               else [self._run_item(conn, batch[indexes[0]].fn)])
                    for index, outcome in zip(indexes, results):
                        outcomes[index] = outcome
                    if not conn.in_transaction:
                        lost_at = position
                        break
                    done_ok += [index for index, outcome in zip(indexes, results) if outcome[0]]
                    position += len(indexes)
                if lost_at is None:
                    return outcomes, True
                if todo[lost_at:lost_at + 1] and batch[todo[lost_at]].grouped is not None and grouping:
                    # Which item of the group ended the transaction (or failed its apply,
                    # a group that began it) is not known: all of them run again, one by
                    # one this time, and that round finds it.
                    todo = done_ok + todo[lost_at:]
                    grouping = False
                else:
                    # That item's failure ended the whole transaction and took the earlier
                    # items' work with it; they run again with those not started yet. Each
                    # round drops the item at fault, so this ends within len(batch) rounds.
                    todo = done_ok + todo[lost_at + 1 :]
                if not todo:
                    return outcomes, False
                conn.execute(_BEGIN_SQL)
        except Exception as err:
            self._rollback_quietly(conn)
            return [(False, err)] * len(batch), False

    @staticmethod
    def _group_run(batch: list[_Item], todo: list[int], position: int) -> int:
        """How many grouped items from `position` on form one group (0: not grouped, run it
        alone in its savepoint)."""
        first = batch[todo[position]].grouped
        if first is None:
            return 0
        run = 1
        while position + run < len(todo):
            other = batch[todo[position + run]].grouped
            if other is None or other.apply != first.apply:
                break
            run += 1
        return run

    def _run_group(self, conn: sqlite3.Connection, items: list[_Item], first: bool) -> list[tuple[bool, Any]]:
        """Plans every item of the group, then applies the plans together, in one savepoint
        (a plan writes nothing, so a refused one needs no savepoint of its own). A failed
        apply undoes the group, whose items then run one by one.

        A group that begins the transaction (`first`, nearly every batch of confirms) takes
        no savepoint: while one is open SQLite copies every page the apply changes into the
        savepoint journal first. A failed apply then rolls the whole transaction back, which
        held nothing else, and the caller runs the items one by one in a new one."""
        if not first:
            conn.execute(_GROUP_SAVEPOINT_SQL)
        self._fn_running = True
        try:
            outcomes = self._plan_and_apply(conn, items)
        except BaseException:  # noqa: BLE001 - each item runs again alone and gets its own error
            outcomes = None
        finally:
            self._fn_running = False
        if not conn.in_transaction:
            return [(False, TransactionLost("a grouped write ended the transaction"))] * len(items)
        if outcomes is None and first:
            self._rollback_quietly(conn)
            return [(False, TransactionLost("its group's apply failed"))] * len(items)
        if outcomes is None:
            conn.execute(_GROUP_ROLLBACK_TO_SQL)
            conn.execute(_GROUP_RELEASE_SQL)
            return self._one_by_one(conn, items)
        if not first:
            conn.execute(_GROUP_RELEASE_SQL)
        return outcomes

    def _one_by_one(self, conn: sqlite3.Connection, items: list[_Item]) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        for item in items:
            outcomes.append(self._run_item(conn, item.fn))
            if not conn.in_transaction:
                # The caller runs the group again, one by one, in a new transaction.
                lost = TransactionLost("another write of its group ended the transaction")
                return outcomes + [(False, lost)] * (len(items) - len(outcomes))
        return outcomes

    @staticmethod
    def _plan_and_apply(conn: sqlite3.Connection, items: list[_Item]) -> list[tuple[bool, Any]]:
        apply = items[0].grouped.apply  # type: ignore[union-attr]
        outcomes: list[tuple[bool, Any]] = [(False, None)] * len(items)
        group: dict = {}
        pending: list[tuple[int, Any]] = []

        def flush() -> None:
            for (at, _), result in zip(pending, apply(conn, [planned for _, planned in pending])):
                outcomes[at] = (True, result)
            pending.clear()
            group.clear()

        for at, item in enumerate(items):
            plan = item.grouped.plan  # type: ignore[union-attr]
            try:
                try:
                    planned = plan(conn, group)
                except Flush:
                    flush()
                    planned = plan(conn, group)
            except Exception as err:  # noqa: BLE001 - a refusal: delivered to its caller
                if not conn.in_transaction:
                    raise
                outcomes[at] = (False, _deliverable(err))
                continue
            if isinstance(planned, Ready):
                outcomes[at] = (True, planned.result)
            else:
                pending.append((at, planned))
        flush()
        return outcomes

    def _commit_and_answer(self, done: _Done) -> _Done | str | None:
        """Returns the next job if the next batch is the writer thread's."""
        conn = self._conn
        assert conn is not None
        if done.commit:
            try:
                done.wrote = conn.total_changes != self._changes_seen
                self._changes_seen = conn.total_changes
                conn.execute(_COMMIT_SQL)
            except Exception as err:
                # Deferred foreign key, I/O error, disk full: nothing of this batch is durable.
                self._rollback_quietly(conn)
                done.outcomes = [(False, err)] * len(done.batch)
                done.commit = False
        if done.commit:
            # Queued before the turn passes, so the sync thread counts and answers batches
            # in the order they committed: queued after it, the next batch could commit
            # and reach the sync thread first.
            self._syncs.put(done)
        # The connection is free from here on: the next batch may start on a loop while
        # this one waits for the disk.
        next_job = self._hand_on()
        if not done.commit:
            self._answer(done.batch, done.outcomes)
        return next_job

    def _hand_on(self) -> str | None:
        """Passes the write turn on; returns the writer thread's next job if it is its turn."""
        next_job, next_loop = self._pass_turn()
        if next_loop is not None:
            try:
                if _running_loop() is next_loop:
                    next_loop.call_soon(self._loop_turn, next_loop)
                else:
                    next_loop.call_soon_threadsafe(self._loop_turn, next_loop)
            except RuntimeError:  # that loop closed before it could be told
                next_job = self._take_turn_back(next_loop)
        return next_job

    def _syncer_main(self) -> None:
        """Makes committed batches durable, then answers them: one fdatasync for every
        batch that was committed while the previous one ran (group commit once more)."""
        stopping = False
        while not stopping:
            group = [self._syncs.get()]
            while True:
                try:
                    group.append(self._syncs.get_nowait())
                except queue.Empty:
                    break
            stopping = None in group
            group = [done for done in group if done is not None]
            if not group:
                continue
            failure = self._make_durable()
            if failure is None:
                self._after_durable(group)
            for done in group:
                try:
                    if failure is None:
                        self._call_on_commit(len(done.batch), time.perf_counter() - done.started_s)
                        self._answer(done.batch, done.outcomes)
                    else:
                        self._answer(done.batch, [(False, failure)] * len(done.batch))
                except BaseException:  # noqa: BLE001 - the sync thread must outlive anything
                    log.exception("storage sync: could not answer a batch of %d", len(done.batch))

    def _make_durable(self) -> BaseException | None:
        """fdatasync of the WAL, then whether it is still the file SQLite will read after a
        crash: the failure to answer the group with, or None."""
        try:
            self._sync_wal()
        except BaseException as err:  # noqa: BLE001 - reported to every caller instead
            # The pages may not be on disk: nobody may hear their write was kept.
            log.critical("storage: fdatasync of %s failed: %s", self._wal_path(), err)
            return _deliverable(err)
        # A deleted or replaced file takes these commits with it at the next crash.
        return self._check_files()

    def _after_durable(self, group: list[_Done]) -> None:
        if any(done.wrote for done in group):
            self._wrote_at_s = time.monotonic()
            if self._faults.current is not None:
                self._faults.clear(StorageFull.cause)
        # The size _check_files' stat of the WAL just saw: no call of its own.
        if self._files and self._files[1].size > self._wal_checkpoint_bytes:
            self._ckpt_wake.set()

    def _sync_wal(self) -> None:
        fd = self._wal_fd
        assert fd is not None
        os.fdatasync(fd)

    # -- storage faults ---------------------------------------------------------

    def _check_files(self) -> StorageLost | None:
        """StorageLost once the database file or its WAL is no longer the one on disk (two
        stat calls). The first time, wakes the checkpoint thread to salvage: on this thread
        (the sync thread, the event loop) a copy of the whole database would hold every answer."""
        if self._lost is not None:
            return StorageLost(self._lost)
        for identity in self._files:
            problem = identity.problem()
            if problem is not None:
                break
        else:
            return None
        with self._lock:
            first = self._lost is None
            if first:
                self._lost, self._lost_file = problem, identity
        if first:
            self._faults.record(StorageLost(problem), refused=0)
            self._ckpt_wake.set()
        return StorageLost(self._lost)

    def _refuse_if_lost(self) -> None:
        if self._lost is not None:
            err = StorageLost(self._lost)
            self._faults.record(err)
            raise err

    def _salvage_when_due(self) -> None:
        """On the checkpoint thread, once a file was lost. A failed salvage (a full disk, most
        likely) is retried after a pause that doubles up to SALVAGE_RETRY_MAX_S."""
        if self._salvaged_into is not None or time.monotonic() < self._salvage_retry_at_s:
            return
        if self._salvage():
            return
        self._salvage_retry_at_s = time.monotonic() + self._salvage_retry_s
        self._salvage_retry_s = min(self._salvage_retry_s * 2, SALVAGE_RETRY_MAX_S)

    def _salvage(self) -> bool:
        """Every commit so far into a database file that survives a restart; True once done."""
        with self._ckpt_lock:
            conn, lost = self._ckpt_conn, self._lost_file
            if conn is None or lost is None:
                return False
            db_lost = lost.path == str(self._path)
            try:
                if db_lost:
                    target = self._save_copy(conn)
                    where, what = (f"in {target.name}", f"the database file was deleted or replaced; the server's "
                                   f"copy of it, with every acknowledged write, is saved as {target}")
                else:
                    conn.execute(f"PRAGMA busy_timeout={SALVAGE_BUSY_WAIT_MS}")
                    busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(FULL)").fetchone()
                    if busy or frames != copied:
                        log.critical("storage %s: copying the lost WAL into the database stopped at frame %d "
                                     "of %d; retrying in %.0fs", self._path.name, copied, frames,
                                     self._salvage_retry_s)
                        return False
                    where, what = ("in the database file", f"the WAL's {frames} frames are copied into the "
                                   "database file, which holds every acknowledged write")
                moved = self._move_wal_aside(db_lost)
            except (sqlite3.Error, OSError) as err:
                log.critical("storage %s: saving the writes of the lost file failed (%s); retrying in %.0fs",
                             self._path.name, err, self._salvage_retry_s)
                return False
            log.critical("storage %s: %s%s; restart the server", self._path.name, what, moved)
            self._salvaged_into = where
            return True

    def _save_copy(self, conn: sqlite3.Connection) -> Path:
        """The server's database backed up into a new file beside it. Written under a
        .partial name and renamed once complete; removed if it fails (the disk is probably
        the full one), so a retry never leaves another partial copy."""
        target = self._path.with_name(f"{self._path.name}.saved-{time.strftime('%Y%m%dT%H%M%S')}")
        partial = target.with_name(f"{target.name}.partial")
        try:
            copy = sqlite3.connect(partial)
            try:
                conn.backup(copy)
            finally:
                copy.close()
            os.replace(partial, target)
            _sync_folder(target.parent)
        except BaseException:
            for leftover in (partial, Path(f"{partial}-journal")):
                with contextlib.suppress(OSError):
                    os.unlink(leftover)
            raise
        return target

    def _move_wal_aside(self, db_lost: bool) -> str:
        """A WAL file at the database's WAL path is replayed into the database at the next
        start (after a kill -9 the server never removes it). Once salvaged, the one there
        belongs to no database a restart would open: another program's (the WAL was
        replaced), or ours, whose database file is gone (its writes are in the copy). Moved
        aside, not deleted: it is someone's data. Returns what to add to the log line."""
        wal = self._wal_path()
        try:
            st = os.stat(wal)
        except FileNotFoundError:
            return ""
        ours = self._files[1].is_same(st) if self._files else False
        if ours and not db_lost:
            return ""
        aside = f"{wal}.{'saved' if ours else 'foreign'}-{time.strftime('%Y%m%dT%H%M%S')}"
        os.rename(wal, aside)
        _sync_folder(self._path.parent)
        return f"; {wal} is moved to {aside} so that a restart does not replay it over the database"

    def check_free_space(self) -> None:
        """Raises StorageFull while the database's disk has less than min_free_bytes free."""
        free = free_bytes(self._path.parent)
        self._faults.clear_full_if_freed(free, self._min_free_bytes)
        if free is not None and free < self._min_free_bytes:
            raise StorageFull(f"{free // (1024 * 1024)} MiB free on the database's disk, "
                              f"under the minimum of {self._min_free_bytes // (1024 * 1024)} MiB")

    def _disk_low(self) -> bool:
        free = free_bytes(self._path.parent)
        return free is not None and free < max(self._min_free_bytes, 1024 * 1024)

    def fault(self) -> StorageError | None:
        """The storage fault in force: files lost, disk full (or under its minimum), another
        program's lock. Cheap (a few stat calls, never a write): for /readyz and /metrics."""
        lost = self._check_files()
        if lost is not None:
            return lost
        try:
            self.check_free_space()
        except StorageFull as err:
            return err
        current = self._faults.current
        if current is None:
            return None
        if isinstance(current, StorageBusy) and not self._still_busy():
            return None
        return type(current)(str(current))

    def _still_busy(self) -> bool:
        """Whether another process still holds the write lock a write of ours was refused
        for. Where the kernel cannot say, the fault stays until a write gets the lock."""
        if not CAN_SEE_LOCK_HOLDERS or wal_write_lock_holder(self._path) is not None:
            return True
        self._faults.clear(StorageBusy.cause)     # released meanwhile: the next write gets it
        return False

    def runs_jobs(self) -> bool:
        """The background jobs run in the one server on the file (its serve lock)."""
        return True

    def check_ready(self) -> None:
        """For /readyz: raises the storage fault in force, or StorageClosed. Never waits for
        the write turn: a deep write queue is load, not a fault, and the answer stays quick."""
        if self._state != "open":
            raise StorageClosed(f"{self._path} is {self._state}")
        fault = self.fault()
        if fault is None:
            return
        if isinstance(fault, StorageLost) and self._salvaged_into is not None:
            raise StorageLost(f"{fault}; every acknowledged write is {self._salvaged_into}")
        raise fault

    def wal_bytes(self) -> int:
        try:
            return os.fstat(self._wal_fd).st_size if self._wal_fd is not None else 0
        except OSError:
            return 0

    def _wal_path(self) -> str:
        return f"{self._path}-wal"

    def _pass_turn(self) -> tuple[str | None, asyncio.AbstractEventLoop | None]:
        """After a batch: a checkpoint wanted goes first (_CHECKPOINT, on the writer thread),
        then the next batch on the first waiting item's loop, else on this thread (_RUN)."""
        with self._lock:
            if self._ckpt_wanted is not None and self._state == "open":
                self._turn, self._turn_loop = _BUSY, None
                return _CHECKPOINT, None
            if not self._pending:
                self._turn, self._turn_loop = _IDLE, None
                return None, None
            head = self._pending[0]
            if self._state == "open" and self._for_loop(head):
                self._turn, self._turn_loop = _LOOP_TURN, head.loop
                return None, head.loop
            self._turn, self._turn_loop = _BUSY, None
            return _RUN, None

    def _take_turn_back(self, loop: asyncio.AbstractEventLoop | None) -> str | None:
        # The loop given the turn closed before it could be told.
        with self._lock:
            if self._turn != _LOOP_TURN or self._turn_loop is not loop:
                return None
            self._turn, self._turn_loop = _BUSY, None
            return _RUN

    def _run_item(self, conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], Any]) -> tuple[bool, Any]:
        conn.execute(_SAVEPOINT_SQL)
        self._fn_running = True
        try:
            result = fn(conn)
        except BaseException as err:  # noqa: BLE001 - delivered to the caller instead
            error: BaseException | None = err
        else:
            error = None
        finally:
            self._fn_running = False
        if not conn.in_transaction:
            lost = error if error is not None else TransactionLost("write function ended the transaction")
            return False, _deliverable(lost)
        if error is None:
            conn.execute(_RELEASE_SQL)
            return True, result
        conn.execute(_ROLLBACK_TO_SQL)
        conn.execute(_RELEASE_SQL)
        return False, _deliverable(error)

    def _rollback_quietly(self, conn: sqlite3.Connection) -> None:
        if not conn.in_transaction:
            return
        try:
            conn.execute(_ROLLBACK_SQL)
        except Exception:  # noqa: BLE001
            log.exception("storage writer: ROLLBACK after a failed batch failed")

    def _storage_outcomes(self, outcomes: list[tuple[bool, Any]]) -> list[tuple[bool, Any]]:
        """Failures that are storage faults become their StorageError, each counted and logged
        once per interval rather than handed on as a traceback per request."""
        if all(ok for ok, _ in outcomes):
            return outcomes
        mapped: list[tuple[bool, Any]] = []
        fault: StorageError | None = None
        refused = 0
        for ok, value in outcomes:
            if not ok:
                value = classify(value, self._disk_low)
                if isinstance(value, StorageError):
                    fault, refused = value, refused + 1
            mapped.append((ok, value))
        if fault is not None:
            free = free_bytes(self._path.parent) if isinstance(fault, StorageFull) else None
            self._faults.record(fault, refused, free)
        return mapped

    def _call_on_commit(self, batch_size: int, seconds: float) -> None:
        # Called before anyone is answered, so a caller that resumes sees its own commit counted.
        if self._on_commit is None:
            return
        try:
            self._on_commit(batch_size, seconds)
        except BaseException:  # noqa: BLE001 - a metrics hook must not fail committed writes
            if self._hook_error_log.ready():
                log.exception("storage writer: on_commit hook raised (logged at most every %.0fs)",
                              self._hook_error_log.interval_s)

    def _answer(self, batch: list[_Item], outcomes: list[tuple[bool, Any]]) -> None:
        # One wake-up per event loop per batch rather than one per item: each
        # call_soon_threadsafe writes to the loop's self-pipe.
        per_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, bool, Any]]] = {}
        outcomes = self._storage_outcomes(outcomes)
        for item, (ok, value) in zip(batch, outcomes):
            if item.loop is None:
                future = item.future
                assert isinstance(future, concurrent.futures.Future)
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
            else:
                per_loop.setdefault(item.loop, []).append((item.future, ok, value))  # type: ignore[arg-type]
        for loop, entries in per_loop.items():
            try:
                loop.call_soon_threadsafe(_settle_async, entries)
            except RuntimeError:
                pass  # the loop is closed: its awaiters are gone, the writes are committed
