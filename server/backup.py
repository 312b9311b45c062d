"""`loyalty backup --out FILE`: a copy of the database, taken while the server serves, and
proven readable before it is given its name.

The copy is SQLite's online backup, made in steps from a read-only connection that holds
one read transaction from the first step to the last. In WAL mode a reader never blocks
the server's writer, so receipts go on being confirmed meanwhile; holding the transaction
makes every step read the same moment of the database. Without it, each write the server
commits between two steps makes SQLite start the backup again from its first page, and
under steady load a large database never finishes. The price is the server's WAL, which
cannot be restarted past a reader: it grows while the copy runs and is cut back within
seconds after it ends (README, "A bounded WAL").

The copy is written as FILE.partial, switched to a rollback journal (a single file that
any sqlite3 opens, read-only media included; the server puts it back into WAL mode when it
opens it), synced, checked with PRAGMA quick_check and every check of `loyalty audit
verify`, and only then renamed to FILE. A copy that fails the checks is kept as
FILE.unverified for inspection, never under the name a restore would pick up.
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
import time
from pathlib import Path

from storage.audit import AuditReport, verify
from storage.db import _sync_folder

# Pages per backup step: between two steps the copy sleeps, so on a shared disk the
# server's fdatasyncs are not queued behind one long burst of reads and writes.
PAGES_PER_STEP = 4096
STEP_SLEEP_SECONDS = 0.005
# How long opening the serving database may wait for its WAL index (SQLITE_BUSY while the
# server recovers it at start).
OPEN_WAIT_SECONDS = 10
# The copy is flushed to disk every this many pages (64 MiB of 4 KiB pages): one flush of
# a whole large copy at its end held the server's fdatasyncs behind it (a 941 MiB copy:
# confirms up to 0.3 s, against 0.1-0.17 s flushed in steps).
SYNC_EVERY_PAGES = 16_384
# The copy and its checks are background work beside the server: on a busy machine the
# server's requests get the CPU first.
NICENESS = 10
# A progress line on a terminal at most this often.
PROGRESS_EVERY_SECONDS = 1.0


# A copy of a PostgreSQL database is PostgreSQL's own tools' work (docs/postgresql.md).
POSTGRESQL_REFUSED = ("backup: database.url is PostgreSQL, which this command does not copy: use pg_basebackup "
                      "(with WAL archiving) or pg_dump, and a standby (docs/postgresql.md, Backups)")


class BackupFailed(Exception):
    """The copy could not be made; the message is the one line to print."""


def backup_command(config_path: str, out: str) -> int:
    """0 with one line saying what was verified; 1 when the copy fails a check (kept as
    FILE.unverified); 2 when it cannot be made, or the database is PostgreSQL's; 130 after
    Ctrl-C, with no file left."""
    from server.databases import CannotOpen, config_for_command
    try:
        config = config_for_command(config_path)
    except CannotOpen as e:
        print(e, file=sys.stderr)
        return 2
    if config.database.url is not None:
        print(POSTGRESQL_REFUSED, file=sys.stderr)
        return 2
    source = config.resolve(config.database.path)
    target = Path(out)
    os.nice(NICENESS)
    partial = target.with_name(f"{target.name}.partial")
    started = time.monotonic()
    try:
        _refuse_unusable(source, target)
        pages = copy_database(source, partial, _progress_line() if sys.stderr.isatty() else None)
        copied = time.monotonic()
        report, integrity = check_copy(partial)
    except BackupFailed as e:
        _remove(partial)
        print(f"backup failed: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _remove(partial)
        print(f"backup interrupted (Ctrl-C): no backup was made ({partial.name} removed)", file=sys.stderr)
        return 130
    if integrity != "ok" or not report.ok:
        kept = target.with_name(f"{target.name}.unverified")
        os.replace(partial, kept)
        for problem in ([f"quick_check: {integrity}"] if integrity != "ok" else []) + report.problems:
            print(f"FAIL {problem}")
        print(f"backup failed its checks; the copy is kept as {kept}", file=sys.stderr)
        return 1
    os.replace(partial, target)
    _sync_folder(target.parent)
    print(f"backup {target}: {pages} pages ({target.stat().st_size / 2**20:.1f} MiB) copied in "
          f"{copied - started:.1f}s, verified in {time.monotonic() - copied:.1f}s: quick_check ok, "
          f"{report.postings} postings chained to "
          f"{report.chain_head[:16]}…, {report.receipts} receipts, {report.members} members, "
          f"liability {report.liability} points")
    return 0


def _refuse_unusable(source: Path, target: Path) -> None:
    if not source.is_file():
        raise BackupFailed(f"{source}: no database (database.path)")
    if target.exists():
        raise BackupFailed(f"{target} already exists; remove it or choose another name")
    if not target.parent.exists():
        raise BackupFailed(f"{target.parent} does not exist (backup makes no folders)")
    if not target.parent.is_dir():
        raise BackupFailed(f"{target.parent} is not a folder")


def copy_database(source: Path, partial: Path, progress=None) -> int:
    """The source copied into `partial` as one moment of it; the number of pages copied.
    A leftover `partial` from an interrupted run is replaced."""
    _remove(partial)
    try:
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, isolation_level=None,
                              timeout=OPEN_WAIT_SECONDS)
        dst = sqlite3.connect(partial, isolation_level=None)
        try:
            src.execute("BEGIN")
            # The read transaction starts with the first read, not with BEGIN.
            src.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            pages = src.execute("PRAGMA page_count").fetchone()[0]
            with _flushing(partial, progress) as step:
                src.backup(dst, pages=PAGES_PER_STEP, progress=step, sleep=STEP_SLEEP_SECONDS)
            src.execute("ROLLBACK")
            dst.execute("PRAGMA journal_mode=DELETE")
        finally:
            dst.close()
            src.close()
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
    except (sqlite3.Error, OSError) as e:
        _remove(partial)
        raise BackupFailed(f"copying {source} to {partial}: {e}") from None
    return pages


@contextlib.contextmanager
def _flushing(partial: Path, progress):
    """A backup progress callback that flushes what was copied every SYNC_EVERY_PAGES
    (through a descriptor of its own: fdatasync flushes the file, whoever wrote it)."""
    fd = os.open(partial, os.O_RDONLY | os.O_CLOEXEC)
    synced = [0]

    def step(status: int, remaining: int, total: int) -> None:
        if total - remaining - synced[0] >= SYNC_EVERY_PAGES:
            os.fdatasync(fd)
            synced[0] = total - remaining
        if progress is not None:
            progress(status, remaining, total)
    try:
        yield step
    finally:
        os.close(fd)


def check_copy(path: Path) -> tuple[AuditReport, str]:
    """The checks of `loyalty audit verify` and PRAGMA quick_check's answer, read from the
    copy itself: what was written is what is proven."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            integrity = "; ".join(row[0] for row in conn.execute("PRAGMA quick_check(20)"))
            return verify(conn), integrity
    except sqlite3.Error as e:
        raise BackupFailed(f"the copy {path} cannot be read back: {e}") from None


def _progress_line():
    shown = [0.0]

    def progress(status: int, remaining: int, total: int) -> None:
        now = time.monotonic()
        if now - shown[0] >= PROGRESS_EVERY_SECONDS or remaining == 0:
            shown[0] = now
            print(f"\rcopied {total - remaining}/{total} pages", end="\n" if remaining == 0 else "",
                  file=sys.stderr, flush=True)
    return progress


def _remove(partial: Path) -> None:
    # NotADirectoryError: --out under a file, refused before anything was written.
    for leftover in (partial, Path(f"{partial}-journal")):
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            os.unlink(leftover)
