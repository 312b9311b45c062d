"""The finance and operations commands: audit verify, jobs run, partners settle, export ledger.

They open the database the config names, next to or instead of a running server: reads
use their own read-only connection; jobs write through the same single-writer storage."""
from __future__ import annotations

import asyncio
import sqlite3
import sys
from contextlib import closing
from datetime import datetime

from rules import ProgramError, load_program
from server.config import ConfigError, load_config
from storage.db import Database
from storage.schema import migrations


def dispatch(args) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    db_path = config.resolve(config.database.path)
    if args.command == "jobs":
        return jobs_run(config, db_path, args.now)
    if not db_path.exists():
        print(f"{db_path}: no database", file=sys.stderr)
        return 2
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as conn:
        if args.command == "audit":
            return audit_verify(conn)
        if args.command == "partners":
            return partners_settle(config, conn, args.period, args.out)
        return export_ledger(conn, args.format, args.out)


def _program(config):
    try:
        return load_program(config.resolve(config.rules.dir))
    except ProgramError as e:
        for p in e.problems:
            print(p, file=sys.stderr)
        raise SystemExit(2) from None


def audit_verify(conn) -> int:
    from storage.audit import verify
    report = verify(conn)
    for problem in report.problems:
        print(f"FAIL {problem}")
    if not report.ok:
        return 1
    print(f"ok: {report.postings} postings, chain head {report.chain_head[:16]}…, {report.receipts} receipts "
          f"checked, {report.members} members")
    print(f"outstanding liability: {report.liability} points")
    for account, balance in report.accounts.items():
        print(f"  {account}: {balance}")
    return 0


def jobs_run(config, db_path, now_text: str | None) -> int:
    from server.clock import Clock
    from server.jobs import run_all
    program = _program(config)
    now = datetime.fromisoformat(now_text) if now_text else Clock(config.clock.start).now()
    if now.tzinfo is None:
        print("--now needs a UTC offset, e.g. 2027-01-01T03:00:00+02:00", file=sys.stderr)
        return 2
    db = Database(db_path, migrations=migrations, batch_max=config.database.commit_batch_max)
    db.open()
    try:
        done = asyncio.run(run_all(db, program, now))
    finally:
        db.close()
        program.close()
    print(", ".join(f"{k}: {v}" for k, v in done.items()))
    return 0


def partners_settle(config, conn, period: str, out_dir) -> int:
    from server.reports import settle, write_settlement
    program = _program(config)
    try:
        rows = settle(conn, program, period)
    except ValueError:
        print(f"--period must look like 2026-11, got {period}", file=sys.stderr)
        return 2
    csv_path, json_path = write_settlement(rows, out_dir, period)
    for row in rows:
        print(f"{row['partner']}: issued {row['points_issued']} funded {row['amount_funded']} "
              f"redeemed {row['points_redeemed']} owed {row['amount_owed']} net {row['net_amount']} "
              f"{row['currency']}")
    print(f"wrote {csv_path} and {json_path}")
    return 0


def export_ledger(conn, fmt: str, out_path: str | None) -> int:
    from server.reports import export_bar, export_ledger as export, output
    with output(out_path) as stream:
        count = export(conn, stream, fmt, export_bar("exporting ledger", out_path))
    print(f"{count} postings exported", file=sys.stderr)
    return 0
