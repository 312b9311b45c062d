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
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve_command(args.config)
    return rules_check_command(args.dir)


def serve_command(config_path: str) -> int:
    import asyncio

    from rules import ProgramError
    from server.app import create_app
    from server.config import ConfigError, load_config
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(config_path)
        app = create_app(config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(app, config))
    except ProgramError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        print(f"the program in {config.resolve(config.rules.dir)} does not load; not starting", file=sys.stderr)
        return 2
    return 0


async def serve(app, config) -> None:
    """Serve until SIGTERM or SIGINT, then drain: /readyz answers 503 for server.drain_seconds
    while requests are still served, the listener closes, requests in flight finish (up to
    server.shutdown_timeout_seconds) and the database closes after its last commit."""
    import asyncio
    import signal

    from aiohttp import web

    from server.keys import STATE
    log = logging.getLogger("loyalty.server")
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           shutdown_timeout=config.server.shutdown_timeout_seconds)
    await runner.setup()
    try:
        await web.TCPSite(runner, config.server.host, config.server.port).start()
        log.info("serving on http://%s:%s", config.server.host, config.server.port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        app[STATE]["draining"] = True
        log.info("stopping: /readyz answers 503; serving %.1fs more, then finishing requests in flight",
                 config.server.drain_seconds)
        await asyncio.sleep(config.server.drain_seconds)
    finally:
        await runner.cleanup()
    log.info("stopped: every answered request is committed")


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
