"""The database a command opens beside the serving servers, from config.yaml's `database`."""
from __future__ import annotations

from storage.db import Database
from storage.pg.database import PgDatabase
from storage.schema import migrations


def for_command(config) -> Database | PgDatabase:
    """PostgreSQL for `database.url`; else the SQLite file at `database.path`, without
    checkpoints (a serving server checkpoints its WAL; a command must not take that turn).
    Not opened yet."""
    if config.database.url is not None:
        return PgDatabase.from_config(config.database)
    return Database.from_config(config.database, config.resolve(config.database.path), migrations=migrations,
                                checkpoints=False)
