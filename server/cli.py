"""`loyalty serve --config PATH` and `loyalty rules check DIR`."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loyalty", description="Loyalty processing server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--config", default="config.yaml", help="path to config.yaml")
    rules = sub.add_parser("rules", help="work with rule programs")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True)
    check = rules_sub.add_parser("check", help="validate a program folder; prints file:line:column: message")
    check.add_argument("dir", type=Path)
    audit = sub.add_parser("audit", help="verify the ledger").add_subparsers(dest="audit_command", required=True)
    verify = audit.add_parser("verify", help="recompute the hash chain, balances and receipts; non-zero on a problem")
    verify.add_argument("--config", default="config.yaml")
    jobs = sub.add_parser("jobs", help="lifecycle jobs").add_subparsers(dest="jobs_command", required=True)
    run = jobs.add_parser("run", help="expire lots, release expired holds, birthday events")
    run.add_argument("--config", default="config.yaml")
    run.add_argument("--now", help="the moment to run them as of (ISO datetime with offset); default: now")
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
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve_command(args.config)
    if args.command == "rules":
        return rules_check_command(args.dir)
    from server import admin_cli
    return admin_cli.dispatch(args)


def serve_command(config_path: str) -> int:
    from aiohttp import web

    from rules import ProgramError
    from server.app import create_app
    from server.config import ConfigError, load_config
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(config_path)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    app = create_app(config)
    try:
        web.run_app(app, host=config.server.host, port=config.server.port, access_log=None,
                    shutdown_timeout=config.server.shutdown_timeout_seconds,
                    print=lambda text: logging.getLogger("loyalty.server").info(text.strip()))
    except ProgramError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        print(f"the program in {config.resolve(config.rules.dir)} does not load; not starting", file=sys.stderr)
        return 2
    return 0


def rules_check_command(directory: Path) -> int:
    from rules import check_dir
    if not directory.is_dir():
        print(f"{directory}: not a folder", file=sys.stderr)
        return 2
    problems = check_dir(directory)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{directory}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
