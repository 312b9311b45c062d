"""`loyalty migrate sqlite-to-postgres --from PATH --to URL`: a SQLite installation moved to
PostgreSQL at a cutover, with the server stopped (docs/postgresql.md, moving over).

It holds the SQLite database's serve lock throughout, so no server serves it meanwhile, and
reads it as one snapshot. SQLite's ledger is verified first (`audit verify`): a copy gives
every member a new hash chain, which must not vouch for rows edited by hand. The target is
migrated to this version and must be empty; everything is then copied (storage/pg/copy.py)
and verified again on PostgreSQL inside the same transaction, which commits only when that
verifies with the same liability and accounts as SQLite. Both results are printed; any
other outcome leaves the target as empty as it was.

Exit status: 0 copied and verified, 1 a ledger that does not verify or a copy that differs
(nothing committed), 2 a refusal before anything was written.
"""
from __future__ import annotations

import sqlite3
import sys
from datetime import datetime, timezone
from pathlib import Path

from storage.audit import AuditReport
from storage.sql import database_errors


class _Rejected(Exception):
    """The copy did not verify; raised inside its transaction so nothing is committed."""

    def __init__(self, report: AuditReport, why: str):
        super().__init__(why)
        self.report, self.why = report, why


def add_parser(sub) -> None:
    migrate = sub.add_parser("migrate", help="move an installation to another storage backend").add_subparsers(
        dest="migrate_command", required=True)
    to_pg = migrate.add_parser("sqlite-to-postgres", help="copy a SQLite database (its server stopped) into an "
                                                          "empty PostgreSQL database and verify both")
    to_pg.add_argument("--from", dest="source", required=True, type=Path,
                       help="the SQLite database file (database.path)")
    to_pg.add_argument("--to", dest="target", required=True,
                       help="the PostgreSQL database's URL (database.url), an empty database")


def dispatch(args) -> int:
    return sqlite_to_postgres(args.source, args.target)


def sqlite_to_postgres(source: Path, url: str, now: datetime | None = None) -> int:
    from server.startup import StartupError, take_serve_lock
    if not source.is_file():
        return _refuse(f"{source}: no such database file")
    try:
        lock = take_serve_lock(source)
    except StartupError as e:
        return _refuse(f"{e}; stop it first")
    try:
        lite = sqlite3.connect(source.resolve().as_uri() + "?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as e:
        lock.release()
        return _refuse(f"cannot open {source}: {e}")
    try:
        return _to_postgres(lite, source, url, now or datetime.now(timezone.utc))
    finally:
        lite.close()
        lock.release()


def _to_postgres(lite: sqlite3.Connection, source: Path, url: str, now: datetime) -> int:
    from storage.pg.connection import connect
    try:
        pg = connect(url)
    except database_errors() as e:
        # libpq adds a hint on a line of its own: the first says what happened, in the one line.
        return _refuse(f"cannot connect to the PostgreSQL database: {str(e).strip().splitlines()[0]}")
    try:
        return _copy(lite, source, pg, now)
    finally:
        pg.close()


def _copy(lite: sqlite3.Connection, source: Path, pg, now: datetime) -> int:
    from storage import audit
    from storage.pg import copy
    from storage.pg.schema import MigrationsBusy, migrate
    lite.execute("BEGIN")       # one snapshot: what is verified is what is copied
    try:
        source_report = audit.verify(lite)
        _print_report(f"SQLite {source}", source_report)
        if not source_report.ok:
            print("not copying: the SQLite ledger does not verify, and the copy would chain its rows anew")
            return 1
        migrate(pg)
        copy.check_ready(lite, pg)
        target_report = pg.transaction(lambda c: _copy_and_check(lite, c, now, source_report), retries=0)
    except (copy.CopyRefused, MigrationsBusy) as e:
        return _refuse(str(e))
    except _Rejected as e:
        _print_report(f"PostgreSQL {pg.raw.info.dbname}", e.report)
        print(f"not copied: {e.why}; nothing was committed")
        return 1
    finally:
        lite.execute("ROLLBACK")
    _print_report(f"PostgreSQL {pg.raw.info.dbname}", target_report)
    print(f"copied: the same {target_report.postings} postings, outstanding liability and accounts on both sides")
    return 0


def _copy_and_check(lite, pg, now: datetime, source: AuditReport) -> AuditReport:
    from storage.pg import audit as pg_audit
    from storage.pg import copy
    copy.copy_all(lite, pg, now, lambda line: print(line, file=sys.stderr, flush=True))
    target = pg_audit.check(pg)
    if not target.ok:
        raise _Rejected(target, "the copy does not verify on PostgreSQL")
    differing = [what for what, a, b in (("postings", source.postings, target.postings),
                                         ("outstanding liability", source.liability, target.liability),
                                         ("accounts", source.accounts, target.accounts)) if a != b]
    if differing:
        raise _Rejected(target, f"its {', '.join(differing)} differ from SQLite's")
    return target


def _print_report(side: str, report: AuditReport) -> None:
    for problem in report.problems:
        print(f"{side}: FAIL {problem}")
    if report.ok:
        print(f"{side}: ok: {report.postings} postings, chain head {report.chain_head[:16]}…, "
              f"{report.receipts} receipts checked, {report.members} members")
    print(f"  outstanding liability: {report.liability} points")
    for account, balance in report.accounts.items():
        print(f"    {account}: {balance}")


def _refuse(message: str) -> int:
    print(f"not copying: {message}", file=sys.stderr)
    return 2
