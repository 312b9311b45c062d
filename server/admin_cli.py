"""The finance and operations commands: audit verify, jobs run, partners settle, export ledger.

They open the database the config names, next to or instead of a running server: reads
use their own read-only connection (on PostgreSQL a read-only snapshot); jobs write
through the same storage as the server, and a dry run of them rolls back every batch on a
connection of its own."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import sys
from contextlib import closing
from datetime import datetime, timedelta

from rules import ProgramError, load_program
from server.clock import Clock
from server.interrupt import INTERRUPTED_STATUS, stop_between_batches
from server.databases import CannotOpen, config_for_command
from server.validation import DAY_EARLIEST, DAY_LATEST, DAY_RANGE
from storage.db import Database
from storage.health import StorageBusy, StorageError, is_busy
from storage.schema import migrations
from storage.sql import unreachable_errors

# A `jobs run --now` further than this from the server's clock is refused without --force.
NOW_DRIFT_MAX = timedelta(days=1)
# What a dry run waits for the server's write lock per batch (a real run's Database waits as long).
PREVIEW_BUSY_WAIT_SECONDS = 5
PG_CONNECT_TIMEOUT_S = 10


class _PostgreSQL:
    """Where the commands name the database's file, on PostgreSQL (database.url)."""

    def __str__(self) -> str:
        return "on PostgreSQL (database.url)"


POSTGRESQL = _PostgreSQL()


def dispatch(args) -> int:
    try:
        config = config_for_command(args.config)
    except CannotOpen as e:
        print(e, file=sys.stderr)
        return 2
    if config.database.url is not None:
        return _on_postgresql(config, args)
    db_path = config.resolve(config.database.path)
    if args.command == "jobs":
        return jobs_run(config, db_path, args)
    if not db_path.exists():
        print(f"{db_path}: no database", file=sys.stderr)
        return 2
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as conn:
        if args.command == "audit":
            return audit_verify(conn)
        if args.command == "partners":
            return partners_settle(config, conn, args.period, args.out)
        return export_ledger(conn, args.format, args.out)


def _on_postgresql(config, args) -> int:
    """dispatch for `database.url`: the same commands on one snapshot of PostgreSQL."""
    from storage.pg.connection import connect
    from storage.pg.database import read_only
    if args.command == "jobs":
        return jobs_run(config, POSTGRESQL, args)
    try:
        conn = connect(config.database.url, connect_timeout_s=PG_CONNECT_TIMEOUT_S)
    except unreachable_errors() as e:
        print(f"cannot connect to PostgreSQL (database.url): {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    with closing(conn):
        if args.command == "audit":
            return audit_verify(conn)       # takes its own snapshot
        if args.command == "partners":
            return read_only(conn, lambda c: partners_settle(config, c, args.period, args.out))
        return read_only(conn, lambda c: export_ledger(c, args.format, args.out))


def _program(config):
    try:
        return load_program(config.resolve(config.rules.dir))
    except ProgramError as e:
        for p in e.problems:
            print(p, file=sys.stderr)
        raise SystemExit(2) from None


def audit_verify(conn) -> int:
    from storage import admin_audit
    from storage.audit import verify
    report = verify(conn)
    # The admin actions' log is hash-chained too: a row changed or removed by hand shows here.
    log = admin_audit.verify(conn)
    for problem in report.problems:
        print(f"FAIL {problem}")
    if not log.ok:
        print(f"FAIL admin audit log: row {log.first_bad_id}: {log.reason}")
    if not (report.ok and log.ok):
        return 1
    print(f"ok: {report.postings} postings, chain head {report.chain_head[:16]}…, {report.receipts} receipts "
          f"checked, {report.members} members")
    print(f"outstanding liability: {report.liability} points")
    for account, balance in report.accounts.items():
        print(f"  {account}: {balance}")
    print(f"admin audit log: {log.rows} rows chained")
    return 0


def jobs_run(config, db_path, args) -> int:
    try:
        now, drift, clock = _job_moment(config.clock.start, args.now)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    far = abs(drift) > NOW_DRIFT_MAX
    if far and not (args.force or args.dry_run):
        # Expiry posted as of a wrong moment cannot be taken back: the ledger is append-only.
        print(f"refusing --now {args.now}: it is {_span(drift)} {clock}; lots due by then would expire for "
              f"good. Check the date, see what it would post with --dry-run, or run it anyway with --force",
              file=sys.stderr)
        return 2
    if args.dry_run:
        return jobs_preview(config, db_path, now, f"{_span(drift)} {clock}, so running it needs --force" if far
                            else "")
    if far:
        print(f"--force: running as of {args.now}, {_span(drift)} {clock}", file=sys.stderr)
    from server.jobs import Interrupted
    program = _program(config)
    try:
        with _storage_faults_unlogged(), stop_between_batches() as stop:
            done = _run_jobs(config, db_path, program, now, lambda: stop.requested)
    except Interrupted as e:
        print(f"jobs run: interrupted (Ctrl-C) after {_done_text(e.done)}; these batches stay done, "
              f"run it again to finish", file=sys.stderr)
        return INTERRUPTED_STATUS
    except (StorageError, *unreachable_errors()) as e:
        line = _why_stopped(e, db_path, config.database.busy_wait_seconds)
        if line is None:
            raise
        print(line, file=sys.stderr)
        return 1
    finally:
        program.close()
    print(_done_text(done))
    return 0


def _done_text(done: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in done.items())


def _why_stopped(e: Exception, db_path, wait_seconds: float) -> str | None:
    """One line for a storage fault that stopped the jobs; None for any other error."""
    if isinstance(e, StorageBusy) or is_busy(e):
        from server.startup import lock_holder
        # The jobs are idempotent and commit batch by batch: running them again finishes the work.
        return (f"jobs run: the database {db_path} is locked by {lock_holder(db_path)} for longer than "
                f"database.busy_wait_seconds ({wait_seconds:g}s); batches already done stay done, "
                f"run it again once the lock is released")
    if isinstance(e, (StorageError, *unreachable_errors())):
        return f"jobs run: cannot write to the database {db_path}: {e}"
    return None


def _run_jobs(config, db_path, program, now: datetime, stop) -> dict[str, int]:
    from server.jobs import run_all
    from storage.pg.database import PgDatabase
    if db_path is POSTGRESQL:
        db = PgDatabase.from_config(config.database)
    else:   # beside a serving server, which checkpoints its WAL; this command must not take that turn
        db = Database.from_config(config.database, db_path, migrations=migrations, checkpoints=False)
    db.open()
    try:
        # Asked for by a person: the segments are recomputed even if the server did today's run.
        return asyncio.run(run_all(db, program, now, config.events.expiring_days_before, stop, rescore=True))
    finally:
        db.close()


@contextlib.contextmanager
def _storage_faults_unlogged():
    """The storage's fault lines speak of refused requests and 503s, a server's; this command
    says in its own one line what stopped it."""
    faults = logging.getLogger("storage.health")
    before, faults.disabled = faults.disabled, True
    try:
        yield
    finally:
        faults.disabled = before


def jobs_preview(config, db_path, now: datetime, far_note: str) -> int:
    """`jobs run --dry-run`: what the jobs would post, with nothing committed."""
    from server.jobs import open_for_preview, preview_all
    from storage.pg.connection import connect
    if db_path is not POSTGRESQL and (problem := _cannot_preview(db_path)):
        print(problem, file=sys.stderr)
        return 2
    program = _program(config)
    try:
        with closing(connect(config.database.url, connect_timeout_s=PG_CONNECT_TIMEOUT_S) if db_path is POSTGRESQL
                     else open_for_preview(db_path, PREVIEW_BUSY_WAIT_SECONDS)) as conn:
            previews = preview_all(conn, program, now, config.events.expiring_days_before)
        segments_note = _segments_note(program)
    except unreachable_errors() as e:
        # libpq's message goes on with a hint on a line of its own: the first says what happened.
        print(f"{db_path}: cannot preview the jobs: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    finally:
        program.close()
    _print_previews(now, previews, far_note, segments_note)
    return 0


def _segments_note(program) -> str:
    """What a real run would do with the RFM scores and computed segments, which a dry run
    does not compute: scoring every member costs as much as the run itself."""
    from server import rfm
    window_days = rfm.settings_of(program)
    if window_days is None:
        return ""
    computed = [s.id for s in rfm.computed_segments(program)]
    decided = f" and decides {len(computed)} segment(s) ({', '.join(computed)})" if computed else ""
    return (f"rfm: a run scores every member with a confirmed receipt in the last {window_days} days"
            f"{decided}; the dry run does not compute them")


def _job_moment(start: datetime | None, now_text: str | None) -> tuple[datetime, timedelta, str]:
    """The moment to run the jobs as of, how far it is from the server's clock, and that clock
    named ("after the server's clock (the system clock: 2026-12-01T09:00:00+00:00)")."""
    server_now = Clock(start).now()
    named = "the server's clock " + (f"(clock.start: {start.isoformat()})" if start is not None
                                     else f"(the system clock: {server_now.isoformat(timespec='seconds')})")
    if now_text is None:
        return server_now, timedelta(0), named
    try:
        now = datetime.fromisoformat(now_text)
    except ValueError:
        raise ValueError(f"--now must be an ISO date and time with a UTC offset, e.g. "
                         f"2027-01-01T03:00:00+02:00, got {now_text!r}") from None
    if now.tzinfo is None:
        raise ValueError("--now needs a UTC offset, e.g. 2027-01-01T03:00:00+02:00")
    if not DAY_EARLIEST <= now.date() <= DAY_LATEST:
        # Further out, the day in the program's timezone may not be a date at all.
        raise ValueError(f"--now {DAY_RANGE}, got {now_text!r}")
    drift = now - server_now
    return now, drift, f"{'after' if drift >= timedelta(0) else 'before'} {named}"


def _span(drift: timedelta) -> str:
    """A duration as days and hours (a far --now is days off, not seconds)."""
    hours = (abs(drift) + timedelta(minutes=30)) // timedelta(hours=1)
    days, hours = divmod(hours, 24)
    return f"{days} day{'s' * (days != 1)} and {hours} hour{'s' * (hours != 1)}"


def _cannot_preview(db_path) -> str | None:
    """Why a dry run cannot run on this database without writing to it, if it cannot."""
    if not db_path.exists():
        return f"{db_path}: no database"
    from sqlite_utils import Database as SqliteUtils
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as conn:
        pending = migrations.pending(SqliteUtils(conn))
    if pending:
        return (f"{db_path}: the database needs {len(pending)} schema upgrade(s) first, which a dry run "
                f"does not write; `loyalty serve` or a `jobs run` applies them")
    return None


def _print_previews(now: datetime, previews, far_note: str, segments_note: str = "") -> None:
    print(f"dry run as of {now.isoformat()}{f' ({far_note})' if far_note else ''}: nothing was written")
    for p in previews:
        if p.job == "released_holds":
            print(f"{p.job}: {p.rows}, {p.points} held points available again")
        else:
            print(f"{p.job}: {p.rows}, {p.postings} postings, {p.points:+d} points")
        for line in p.lines:
            print(f"  {line}")
        if p.lines_left_out:
            print(f"  ... and {p.lines_left_out} more")
    postings = sum(p.postings for p in previews)
    points = sum(p.points for p in previews if p.job != "released_holds")
    if segments_note:
        print(segments_note)
    print(f"total: {postings} postings, changing the outstanding liability by {points:+d} points")


def partners_settle(config, conn, period: str, out_dir) -> int:
    from server.reports import settle, write_settlement
    program = _program(config)
    try:
        rows = settle(conn, program, period)
    except ValueError:
        print(f"--period must look like 2026-11, got {period}", file=sys.stderr)
        return 2
    try:
        csv_path, json_path = write_settlement(rows, out_dir, period, program.currency)
    except OSError as e:     # --out names a file, or a folder that cannot be written
        why = "it is a file, not a folder" if out_dir.is_file() else e.strerror
        print(f"partners settle: cannot write the settlement into {out_dir}: {why}", file=sys.stderr)
        return 2
    for row in rows:
        print(settlement_text(row))
    print(f"wrote {csv_path} and {json_path}")
    return 0


def settlement_text(row: dict) -> str:
    """One partner's settlement for a person: amounts in the currency, and who pays whom."""
    from server.reports import money_text
    currency, name = row["currency"], row["name"]
    net = row["net_to_partner_minor_units"]
    if net > 0:
        who = f"positive: the program pays {name} {money_text(net, currency)}"
    elif net < 0:
        who = f"negative: {name} pays the program {money_text(-net, currency)}"
    else:
        who = "nobody pays: what it funds equals what it is owed"
    return (f"{row['partner']} ({name}), {row['period']}:\n"
            f"  issued at its stores: {row['issued_points']} points; it funds {row['funded_points']} of them "
            f"(share {row['funding_share']}): {money_text(row['funded_minor_units'], currency)}\n"
            f"  redeemed at its stores: {row['redeemed_points']} points; the program owes it "
            f"{money_text(row['owed_minor_units'], currency)}\n"
            f"  net to partner: {money_text(net, currency)} ({who})")


def export_ledger(conn, fmt: str, out_path: str | None) -> int:
    from server.reports import export_bar, export_ledger as export, export_to
    bar = export_bar("exporting ledger", out_path)
    return export_to("export ledger", out_path, "postings", lambda stream: export(conn, stream, fmt, bar))
