"""The loyalty manager's console at /console: server-rendered pages over the same operations,
program holder and database the API uses (server/console/views.py has the routes).

Signing in takes a manager key once; the browser then holds a session cookie
(server/console/sessions.py). Templates and the one small script live beside this file;
nothing is fetched from elsewhere, and the pages forbid it (Content-Security-Policy).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jinja2
from aiohttp import web

from server.console.backtest import Backtests
from server.databases import read_connection
from server.console.sessions import SessionStore
from server.keys import CONFIG, CONSOLE

HERE = Path(__file__).resolve().parent


@dataclass
class Console:
    sessions: SessionStore
    backtests: Backtests
    templates: jinja2.Environment
    static: dict[str, tuple[bytes, str]]    # name -> (content, content type), read once


def templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    from server.console import views, words
    env.filters.update(money=views.money_filter, short=views.short_version)
    env.globals["sources"] = words.LOAD_SOURCES
    return env


def setup(app: web.Application) -> None:
    """Adds the console's routes and state to the app (when console.enabled)."""
    from server.console import views

    config = app[CONFIG]
    settings = config.console
    static = {name: ((HERE / "static" / name).read_bytes(), kind)
              for name, kind in (("console.js", "text/javascript"), ("console.css", "text/css"))}
    app[CONSOLE] = Console(
        SessionStore(settings.sessions_max, settings.idle_timeout_seconds, settings.session_max_hours * 3600),
        Backtests(read_connector(config), settings.backtests_kept, settings.backtest_receipts_max,
                  settings.backtest_days_max),
        templates(), static)
    app.on_cleanup.append(_close)
    views.add_routes(app)


def read_connector(config):
    """A function that opens a connection to read the stored receipts with, beside the server."""
    return lambda: read_connection(config, any_thread=True)


async def _close(app: web.Application) -> None:
    await app[CONSOLE].backtests.close()
