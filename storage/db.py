"""SQLite storage: one writer thread with group commit, a small pool of reader threads.

SQLite lets one connection write at a time, so every write goes through a single thread
that owns the write connection; callers hand it a function and await the result.

With ``synchronous=FULL`` each COMMIT costs an fsync: one receipt per transaction tops
out near 5,700/s on our hardware, 64 per transaction near 139,000/s
(notes/performance.md). The writer therefore runs everything that queued up while the
previous COMMIT was syncing as one transaction, each item inside its own SAVEPOINT so a
failing item is undone alone. Nobody is told "done" before the COMMIT that contains
their write has returned.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from sqlite_utils import Database as UtilsDatabase
from sqlite_utils.migrations import Migrations

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

# A broken metrics hook would otherwise log once per commit, thousands of times a second.
_HOOK_ERROR_LOG_INTERVAL_S = 60.0

DEFAULT_SYNC_TIMEOUT_S = 60.0
# SQLite's automatic checkpoint runs inside the COMMIT that crosses its threshold, so one
# group of receipts would wait for the WAL to be copied into the database and fsynced. A
# thread of its own checkpoints instead, this often, without blocking the writer.
CHECKPOINT_INTERVAL_S = 1.0
DEFAULT_CLOSE_TIMEOUT_S = 60.0


class Overloaded(Exception):
    """The write queue (or the number of reads in flight) is at its limit."""


class StorageClosed(Exception):
    """The database is not open, or is closing."""


class TransactionLost(Exception):
    """A write function ended the batch transaction (for example a RAISE(ROLLBACK) trigger)."""


class _Item:
    __slots__ = ("fn", "loop", "future")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], Any],
        loop: asyncio.AbstractEventLoop | None,
        future: asyncio.Future | concurrent.futures.Future,
    ) -> None:
        self.fn = fn
        # None for write_sync callers, who wait on a concurrent.futures.Future.
        self.loop = loop
        self.future = future


def _deliverable(err: BaseException) -> BaseException:
    # SystemExit or KeyboardInterrupt from a write function must not stop the awaiting
    # event loop, and asyncio refuses StopIteration as a future's exception.
    if isinstance(err, Exception) and not isinstance(err, StopIteration):
        return err
    wrapped = RuntimeError(f"write function raised {type(err).__name__}: {err}")
    wrapped.__cause__ = err
    return wrapped


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
    def __init__(
        self,
        path: str | Path,
        *,
        migrations: Migrations,
        batch_max: int = 256,
        queue_max: int = 10_000,
        readers: int = 2,
        busy_timeout_ms: int = 5_000,
        on_commit: Callable[[int, float], None] | None = None,
    ) -> None:
        if batch_max < 1 or queue_max < 1 or readers < 1 or busy_timeout_ms < 0:
            raise ValueError("batch_max, queue_max and readers must be >= 1, busy_timeout_ms >= 0")
        self._path = Path(path)
        self._migrations = migrations
        self._batch_max = batch_max
        self._queue_max = queue_max
        self._readers_max = readers
        self._busy_timeout_ms = busy_timeout_ms
        self._on_commit = on_commit

        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._pending: collections.deque[_Item] = collections.deque()
        self._state = "new"  # new -> open -> closing -> closed
        self._close_lock = threading.Lock()

        self._conn: sqlite3.Connection | None = None
        self._writer: threading.Thread | None = None
        # Only the writer thread reads or sets this; see _authorize.
        self._fn_running = False
        self._hook_error_logged_at = float("-inf")

        self._checkpointer: threading.Thread | None = None
        self._stop_checkpoints = threading.Event()
        self._reader_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._reader_local = threading.local()
        # read_now()'s connections, one per calling thread (an event loop's thread).
        self._inline_local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._reads_in_flight = 0
        self._utils: dict[sqlite3.Connection, UtilsDatabase] = {}

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
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
                conn.execute("PRAGMA wal_autocheckpoint=0")
                self._migrations.apply(self.sqlite_utils(conn))
                # Installed after the migrations: setting an authorizer expires every
                # cached statement, including the BEGIN/COMMIT sqlite-utils just ran.
                conn.set_authorizer(self._authorize)
            except BaseException:
                self._utils.pop(conn, None)
                conn.close()
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
            self._checkpointer = threading.Thread(
                target=self._checkpoint_main, name=f"sqlite-checkpoint-{self._path.name}", daemon=True)
            with self._lock:
                self._state = "open"
            self._writer.start()
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
                self._not_empty.notify_all()
                self._not_full.notify_all()
            assert self._writer is not None and self._reader_pool is not None
            self._writer.join(timeout_s)
            if self._writer.is_alive():
                # Closing the connection under a running write would corrupt nothing but
                # would fail it in confusing ways; leave it to finish, let close() be retried.
                raise TimeoutError(
                    f"writer for {self._path} still busy after {timeout_s}s "
                    f"({len(self._pending)} queued); close() can be called again"
                )
            self._reader_pool.shutdown(wait=True)
            self._stop_checkpoints.set()
            if self._checkpointer is not None:
                self._checkpointer.join(timeout_s)
            with self._lock:
                reader_conns, self._reader_conns = self._reader_conns, []
                self._utils.clear()
            for conn in reader_conns:
                conn.close()
            # Closed last: the last connection to go checkpoints the WAL into the main file.
            assert self._conn is not None
            self._conn.close()
            with self._lock:
                self._state = "closed"

    def __enter__(self) -> Database:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def path(self) -> Path:
        return self._path

    def queue_depth(self) -> int:
        """Writes waiting for the writer thread, not counting the batch it is running."""
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

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn(conn) on the writer thread; returns once the COMMIT holding it returned.

        fn must not run BEGIN/COMMIT/ROLLBACK (it is refused with "not authorized"); it
        may use its own savepoints. If another item of the batch destroys the whole
        transaction (a RAISE(ROLLBACK) trigger, disk full), fn is run a second time in a
        fresh transaction, so fn must not have effects outside the connection.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            self._refuse_unless_open()
            if len(self._pending) >= self._queue_max:
                raise Overloaded(f"{len(self._pending)} writes queued (queue_max={self._queue_max})")
            self._pending.append(_Item(fn, loop, future))
            self._not_empty.notify()
        return await future

    def write_sync(
        self, fn: Callable[[sqlite3.Connection], T], *, timeout_s: float = DEFAULT_SYNC_TIMEOUT_S
    ) -> T:
        """write() for code without an event loop: waits for room in the queue, then for the commit.

        On TimeoutError the write may still be committed later.
        """
        self._refuse_blocking_here()
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
            self._pending.append(_Item(fn, None, future))
            self._not_empty.notify()
        return future.result(timeout=max(0.0, deadline - time.monotonic()))

    # -- reads -------------------------------------------------------------------

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn(conn) on a reader thread, inside one read transaction (one snapshot)."""
        with self._reading():
            return await asyncio.wrap_future(self._submit_read(fn))

    def read_now(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn(conn) in the calling thread, inside one read transaction (one snapshot).

        For short indexed reads on the event loop (the receipt path): handing a read of tens
        of µs to a reader thread costs more than the read itself (two thread hops, and the
        reader must win the GIL from the busy loop). WAL readers never wait for the writer,
        so this does not block the loop behind a COMMIT. Long reads belong in read().
        """
        if self._state != "open":
            raise StorageClosed(f"{self._path} is {self._state}")
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

    @staticmethod
    def _in_read_transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
        # One transaction per call so several SELECTs in fn agree with each other.
        conn.execute("BEGIN")
        try:
            return fn(conn)
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")

    def _checkpoint_main(self) -> None:
        conn = self._connect(self._path)
        conn.execute("PRAGMA synchronous=FULL")
        try:
            while not self._stop_checkpoints.wait(CHECKPOINT_INTERVAL_S):
                try:
                    # PASSIVE never blocks the writer or readers; once everything is copied the
                    # next write starts the WAL from the beginning again by itself.
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as err:  # busy or locked: the next round tries again
                    log.debug("checkpoint of %s skipped: %s", self._path, err)
        finally:
            conn.close()

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
            or (action == sqlite3.SQLITE_SAVEPOINT and arg2 == _ITEM_SAVEPOINT)
        ):
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    # -- the writer thread -------------------------------------------------------

    def _writer_main(self) -> None:
        while True:
            with self._lock:
                while not self._pending and self._state == "open":
                    self._not_empty.wait()
                if not self._pending:
                    return  # closing, and everything queued has been committed
                # Whatever queued while the last COMMIT was syncing goes into this one.
                count = min(len(self._pending), self._batch_max)
                batch = [self._pending.popleft() for _ in range(count)]
                self._not_full.notify_all()
            # Every step is guarded: the writer must outlive anything, and once COMMIT
            # returned nothing may turn a committed write into a reported failure.
            try:
                outcomes, seconds = self._run_batch(batch)
            except BaseException as err:  # noqa: BLE001
                log.exception("storage writer: batch of %d failed outside any write function", len(batch))
                outcomes, seconds = [(False, _deliverable(err))] * len(batch), None
            if seconds is not None:
                self._call_on_commit(len(batch), seconds)
            try:
                self._deliver(batch, outcomes)
            except BaseException:  # noqa: BLE001
                log.exception("storage writer: could not deliver results of a batch of %d", len(batch))

    def _run_batch(self, batch: list[_Item]) -> tuple[list[tuple[bool, Any]], float | None]:
        """Returns each item's (ok, result or exception) and the transaction's seconds (None: nothing committed)."""
        conn = self._conn
        assert conn is not None
        outcomes: list[tuple[bool, Any]] = [(False, None)] * len(batch)
        todo = list(range(len(batch)))
        started_s = time.perf_counter()
        try:
            while True:
                conn.execute(_BEGIN_SQL)
                done_ok: list[int] = []
                lost_at: int | None = None
                for position, index in enumerate(todo):
                    outcomes[index] = self._run_item(conn, batch[index].fn)
                    if not conn.in_transaction:
                        lost_at = position
                        break
                    if outcomes[index][0]:
                        done_ok.append(index)
                if lost_at is None:
                    conn.execute(_COMMIT_SQL)
                    return outcomes, time.perf_counter() - started_s
                # That item's failure ended the whole transaction and took the earlier
                # items' work with it; they run again with those not started yet. Each
                # round drops the item at fault, so this ends within len(batch) rounds.
                todo = done_ok + todo[lost_at + 1 :]
                if not todo:
                    return outcomes, None
        except Exception as err:
            # BEGIN or COMMIT failed (busy beyond busy_timeout, deferred foreign key,
            # I/O error): nothing of this batch is durable, so nobody may hear otherwise.
            self._rollback_quietly(conn)
            return [(False, err)] * len(batch), None

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

    def _call_on_commit(self, batch_size: int, seconds: float) -> None:
        # Called before anyone is answered, so a caller that resumes sees its own commit counted.
        if self._on_commit is None:
            return
        try:
            self._on_commit(batch_size, seconds)
        except BaseException:  # noqa: BLE001 - a metrics hook must not fail committed writes
            now_s = time.monotonic()
            if now_s - self._hook_error_logged_at >= _HOOK_ERROR_LOG_INTERVAL_S:
                self._hook_error_logged_at = now_s
                log.exception("storage writer: on_commit hook raised (logged at most every %ss)",
                              _HOOK_ERROR_LOG_INTERVAL_S)

    def _deliver(self, batch: list[_Item], outcomes: list[tuple[bool, Any]]) -> None:
        # One wake-up per event loop per batch rather than one per item: each
        # call_soon_threadsafe writes to the loop's self-pipe.
        per_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, bool, Any]]] = {}
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
                # The loop is closed: its awaiters are gone, the writes are committed.
                pass
