"""`loyalty serve --config PATH`, `loyalty backup`, `loyalty rules check|explain|diff|export`, `loyalty keys`,
`loyalty import`, `loyalty migrate`, `loyalty privacy rotate-key` and the admin commands."""
from __future__ import annotations

import argparse
import contextlib
import logging
import sqlite3
import sys
from datetime import date
from pathlib import Path

from server.cli_output import quiet_when_reader_goes


@quiet_when_reader_goes
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loyalty", description="Loyalty processing server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--config", default="config.yaml", help="path to config.yaml")
    rules = sub.add_parser("rules", help="work with rule programs")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True)
    check = rules_sub.add_parser("check", help="validate a program folder; prints file:line:column: [warning: ]message")
    check.add_argument("dir", type=Path)
    check.add_argument("--today", type=_date, help="judge periods as of this date, YYYY-MM-DD "
                                                   "(default: today in the program's timezone)")
    explain = rules_sub.add_parser("explain", help="why each rule applied or not on one receipt")
    explain.add_argument("receipt", help="a receipt in the API's JSON shape")
    explain.add_argument("--config", default="config.yaml")
    explain.add_argument("--card", help="read this card's facts from the database (default: the receipt's card)")
    explain.add_argument("--available", type=int, help="points the member has (default: as many as requested)")
    explain.add_argument("--json", action="store_true", help="print the explanation as JSON")
    diff = rules_sub.add_parser("diff", help="replay receipts through two programs; points per rule")
    diff.add_argument("old", help="the current program folder")
    diff.add_argument("new", help="the changed program folder")
    diff.add_argument("--receipts", required=True, help="JSON lines, one receipt each (loyalty export receipts)")
    diff.add_argument("--json", action="store_true", help="print the report as JSON")
    export_version = rules_sub.add_parser("export", help="write a program version recorded in the database "
                                                         "into a folder")
    export_version.add_argument("version", help="sha256:… as GET /v1/admin/rules/versions lists it, or a unique "
                                                "prefix of its digits")
    export_version.add_argument("dir", type=Path, help="an empty or new folder")
    export_version.add_argument("--config", default="config.yaml")
    export_version.add_argument("--force", action="store_true",
                                help="write into a folder that is not empty, replacing its .yaml/.yml files")
    backup = sub.add_parser("backup", help="copy the database while the server serves, then verify the copy")
    backup.add_argument("--out", required=True, help="the file to write (refused if it exists)")
    backup.add_argument("--config", default="config.yaml")
    audit = sub.add_parser("audit", help="verify the ledger").add_subparsers(dest="audit_command", required=True)
    verify = audit.add_parser("verify", help="recompute the hash chain, balances and receipts; non-zero on a problem")
    verify.add_argument("--config", default="config.yaml")
    jobs = sub.add_parser("jobs", help="lifecycle jobs").add_subparsers(dest="jobs_command", required=True)
    run = jobs.add_parser("run", help="expire lots, release expired holds, birthday events, RFM scores and "
                                      "segments (recomputed at each run)")
    run.add_argument("--config", default="config.yaml")
    run.add_argument("--now", help="the moment to run them as of (ISO datetime with offset); default: the "
                                   "server's clock (clock.start or the system clock)")
    run.add_argument("--force", action="store_true", help="run as of a --now more than a day from the server's clock")
    run.add_argument("--dry-run", action="store_true", help="print what the jobs would post; write nothing")
    partners = sub.add_parser("partners", help="partner reports").add_subparsers(dest="partners_command",
                                                                                  required=True)
    settle = partners.add_parser("settle", help="per-partner settlement for a month, as CSV and JSON")
    settle.add_argument("--period", required=True, help="YYYY-MM")
    settle.add_argument("--config", default="config.yaml")
    settle.add_argument("--out", type=Path, default=Path("reports"))
    export = sub.add_parser("export", help="exports").add_subparsers(dest="export_command", required=True)
    ledger_export = export.add_parser("ledger", help="every posting, oldest first")
    ledger_export.add_argument("--format", choices=["csv", "jsonl"], default="csv")
    ledger_export.add_argument("--config", default="config.yaml")
    ledger_export.add_argument("--out", help="file to write (default: standard output)")
    receipts_export = export.add_parser("receipts", help="stored receipt bodies as JSON lines (for rules diff)")
    receipts_export.add_argument("--config", default="config.yaml")
    receipts_export.add_argument("--out", help="file to write (default: standard output)")
    receipts_export.add_argument("--from", dest="first", help="first local date, YYYY-MM-DD")
    receipts_export.add_argument("--to", dest="last", help="last local date, YYYY-MM-DD")
    events = sub.add_parser("events", help="the events outbox").add_subparsers(dest="events_command", required=True)
    retry = events.add_parser("retry", help="send the dead letters again (deliveries that ran out of retries)")
    retry.add_argument("--config", default="config.yaml")
    retry.add_argument("--webhook", help="only this webhook's (its id)")
    retry.add_argument("--event", type=int, help="only this event (its id)")
    privacy = sub.add_parser("privacy", help="card and phone hashes").add_subparsers(dest="privacy_command",
                                                                                   required=True)
    rotate = privacy.add_parser("rotate-key", help="wrap every stored card, phone and coupon code hash in the key "
                                                   "in force (the last of privacy.hmac_key_rotations), beside the "
                                                   "server")
    rotate.add_argument("--config", default="config.yaml")
    rotate.add_argument("--batch-rows", type=int, default=1_000, help="rows per transaction (1-10000)")
    from server import cvm_cli, import_cli, keys_cli, migrate_cli
    keys_cli.add_parser(sub)
    import_cli.add_parser(sub)
    migrate_cli.add_parser(sub)
    cvm_cli.add_parsers(sub)     # after import_cli: it adds `import offers` to that command
    args = parser.parse_args(argv)
    try:
        return _dispatch(args)
    except sqlite3.DatabaseError as e:
        # database.path names a folder or a file that is not SQLite's, or its disk fails
        # under the command: one line, as a config error is, and no traceback.
        print(f"loyalty {args.command}: the SQLite database (database.path) cannot be used: {e}"
              f"{_foreign_wal_hint(args, e)}", file=sys.stderr)
        return 2


def _foreign_wal_hint(args, error: sqlite3.DatabaseError) -> str:
    """A malformed database with a WAL beside it is, nearly always, a file copied over the
    database (a restore) with the WAL of the one before left there, which SQLite reads as
    this file's: say so, since nothing in SQLite's words points there."""
    if "malformed" not in str(error) or not getattr(args, "config", None):
        return ""
    from server.config import ConfigError, load_config
    try:
        config = load_config(args.config)
    except ConfigError:
        return ""
    if config.database.url is not None:
        return ""
    wal = Path(f"{config.resolve(config.database.path)}-wal")
    with contextlib.suppress(OSError):
        if wal.stat().st_size > 0:
            return (f"; {wal} ({wal.stat().st_size} bytes) is read as part of it: if the database file was "
                    "copied in (a restore), that WAL is the previous file's, to be moved aside with the -shm "
                    "before the copy (docs/operators.md, Restore)")
    return ""


def _dispatch(args) -> int:
    from server import cvm_cli, import_cli, keys_cli, migrate_cli
    if cvm_cli.handles(args):
        return cvm_cli.dispatch(args)
    if args.command == "serve":
        return serve_command(args.config)
    if args.command == "backup":
        from server.backup import backup_command
        return backup_command(args.config, args.out)
    if args.command == "rules" and args.rules_command == "check":
        return rules_check_command(args.dir, args.today)
    if args.command == "rules" and args.rules_command == "export":
        from server.program_versions import export_command
        return export_command(args.config, args.version, args.dir, args.force)
    if args.command == "rules" or (args.command == "export" and args.export_command == "receipts"):
        from server import rules_tools
        if args.command == "export":
            return rules_tools.export_receipts_command(args.config, args.out, args.first, args.last)
        if args.rules_command == "explain":
            return rules_tools.explain_command(args.config, args.receipt, args.card, args.available, args.json)
        return rules_tools.diff_command(args.old, args.new, args.receipts, args.json)
    if args.command == "keys":
        return keys_cli.dispatch(args)
    if args.command == "import":
        return import_cli.dispatch(args)
    if args.command == "migrate":
        return migrate_cli.dispatch(args)
    if args.command == "events":
        from server.events_cli import retry_command
        return retry_command(args.config, args.webhook, args.event)
    if args.command == "privacy":
        from server.privacy import rotate_key_command
        return rotate_key_command(args.config, args.batch_rows)
    from server import admin_cli
    return admin_cli.dispatch(args)


def serve_command(config_path: str) -> int:
    """Start-up failures are one line on stderr and exit 2 (75 when PostgreSQL did not answer,
    which a later start may find), never a traceback."""
    import uvloop

    from rules import ProgramError
    from server.app import create_app
    from server.config import ConfigError, load_config
    from server.startup import StartupError, take_serve_lock
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(config_path)
        app = create_app(config)
        # Before the database is opened: a second server must not even run the migrations.
        # PostgreSQL is shared by design: its servers take turns on row and advisory locks.
        lock = take_serve_lock(config.resolve(config.database.path)) if config.database.url is None \
            else contextlib.nullcontext()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except StartupError as e:
        print(f"not starting: {e}", file=sys.stderr)
        return 2
    # Held until the database is closed.
    with lock:
        try:
            # uvloop's event loop (libuv): ~17 % fewer instructions per confirm served over
            # HTTP than asyncio's own loop, measured with benchmarks/confirm_cpu.py --http.
            return uvloop.run(serve(app, config))
        except ProgramError as e:
            _print_program_problems(config.resolve(config.rules.dir), e)
            return 2
        except StartupError as e:
            print(f"not starting: {e}", file=sys.stderr)
            return e.exit_status
        except KeyboardInterrupt:
            # Only before the server's own SIGINT handler is installed (the start-up wait).
            print("not starting: interrupted", file=sys.stderr)
            return 130


def _print_program_problems(directory: Path, error) -> None:
    """As `loyalty rules check` prints them: errors and warnings in position order, one a line."""
    if not directory.is_dir():
        what = "is not a folder" if directory.exists() else "does not exist"
        print(f"not starting: the program folder {directory} {what} (rules.dir)", file=sys.stderr)
        return
    for problem in sorted(error.problems + error.warnings):
        print(problem, file=sys.stderr)
    print(f"the program in {directory} does not load ({len(error.problems)} problem(s), "
          f"{len(error.warnings)} warning(s)); not starting", file=sys.stderr)


async def serve(app, config) -> int:
    """Serve until SIGTERM or SIGINT, then drain: /readyz answers 503 for server.drain_seconds
    while requests are still served, the listener closes, requests in flight finish (up to
    server.shutdown_timeout_seconds) and the database closes after its last commit.
    2 when the address cannot be listened on (said in one line)."""
    from server.access_log import access_logging
    from server.app import stop_on_signals, wait_then_drain
    from server.listen import CannotListen, Site, new_runner
    log = logging.getLogger("loyalty.server")
    # Before anything listens: a SIGTERM that arrives while the server starts (a supervisor
    # restarting it at once) then drains and stops cleanly instead of killing the process.
    stop = stop_on_signals()
    with access_logging(config) as access_log:
        runner = new_runner(app, config.server, **access_log)
        await runner.setup()
        try:
            try:
                await Site(runner, config.server).start()
            except CannotListen as e:
                print(e, file=sys.stderr)
                return 2
            log.info("serving on http://%s:%s", config.server.host, config.server.port)
            await wait_then_drain(app, stop, config.server.drain_seconds,
                                  "finishing requests in flight")
        finally:
            await runner.cleanup()
    log.info("stopped: every answered request is committed")
    return 0


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a date like 2026-11-24") from None


def rules_check_command(directory: Path, today: date | None = None) -> int:
    """Errors and warnings in position order; 1 when any error (the program would be
    refused), 0 when there are only warnings (it would load)."""
    from rules import check_dir
    if not directory.is_dir():
        print(f"{directory}: not a folder", file=sys.stderr)
        return 2
    found = check_dir(directory, today)
    for problem in found:
        print(problem)
    errors = sum(1 for problem in found if not problem.warning)
    warnings = f", {len(found) - errors} warning(s)" if len(found) > errors else ""
    if errors:
        print(f"{errors} problem(s){warnings}", file=sys.stderr)
        return 1
    print(f"{directory}: ok{warnings}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
