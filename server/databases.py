"""The database a command opens beside the serving servers, from config.yaml's `database`."""
from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Union

from storage.db import Database
from storage.health import MigrationsBusy, StorageUnavailable
from storage.schema import migrations
from storage.sql import unreachable_errors

if TYPE_CHECKING:
    from storage.pg.database import PgDatabase

# A command's connect to PostgreSQL gives up after this long (libpq's connect_timeout).
CONNECT_TIMEOUT_S = 10

# A name, not a union of classes: PgDatabase (and psycopg) is imported only for a `database.url`.
CommandDatabase = Union[Database, "PgDatabase"]


class CannotOpen(Exception):
    """A command's config or database cannot be used: the one line to print, exit 2."""


def config_for_command(config_path: str):
    """config.yaml loaded; CannotOpen with `config error: ...` when it does not load."""
    from server.config import ConfigError, load_config
    try:
        return load_config(config_path)
    except ConfigError as e:
        raise CannotOpen(f"config error: {e}") from None


def open_existing(config) -> CommandDatabase:
    """for_command opened; CannotOpen (`<file>: no database`) when SQLite's file is not
    there, which a command that changes stored rows must not create empty."""
    if config.database.url is None and not config.resolve(config.database.path).exists():
        raise CannotOpen(f"{described(config)}: no database")
    db = for_command(config)
    try:
        db.open()
    except (StorageUnavailable, MigrationsBusy) as e:     # PostgreSQL not answering, or its migrations' turn held
        raise CannotOpen(f"{e} (database.url)") from None
    return db


def read_existing(config):
    """read_connection; CannotOpen (`<file>: no database`, PostgreSQL not answering) when
    there is none to read."""
    try:
        conn = read_connection(config)
    except unreachable_errors() as e:
        first_line = str(e).strip().splitlines()[0]
        if config.database.url is None:     # SQLite's file: a folder, say, where it should be
            raise CannotOpen(f"{described(config)}: cannot open the database: {first_line}") from None
        raise CannotOpen(f"cannot connect to PostgreSQL (database.url): {first_line}") from None
    if conn is None:
        raise CannotOpen(f"{described(config)}: no database")
    return conn


def for_command(config) -> CommandDatabase:
    """PostgreSQL for `database.url`; else the SQLite file at `database.path`, without
    checkpoints (a serving server checkpoints its WAL; a command must not take that turn).
    Not opened yet."""
    if config.database.url is not None:
        from storage.pg.database import PgDatabase
        return PgDatabase.from_config(config.database)
    return Database.from_config(config.database, config.resolve(config.database.path), migrations=migrations,
                                checkpoints=False)


def read_connection(config, *, any_thread: bool = False):
    """A connection for a command's reads beside the serving servers: PostgreSQL for
    `database.url`, else the SQLite file read-only; None when that file does not exist.
    any_thread: the SQLite connection may be used from a thread other than its maker's."""
    if config.database.url is not None:
        from storage.pg.connection import connect
        return connect(config.database.url, connect_timeout_s=CONNECT_TIMEOUT_S, retries=config.database.retries)
    path = config.resolve(config.database.path)
    if not path.exists():
        return None
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=not any_thread)


def described(config) -> str:
    """The database as a command's messages name it (a URL may carry what is not to be shown)."""
    return "the PostgreSQL database (database.url)" if config.database.url is not None \
        else str(config.resolve(config.database.path))
