"""`loyalty events retry`: the webhooks' dead letters queued again, on the database config.yaml
names (SQLite's file or PostgreSQL), beside the serving servers."""
from __future__ import annotations

import sys

from server import databases
from storage import events
from storage.health import StorageError
from storage.sql import database_errors


def retry_command(config_path: str, webhook_id: str | None, event_id: int | None) -> int:
    """Dead deliveries pending again, in one write transaction; a serving server sends them
    within events.poll_interval_seconds, in event order per member, with a fresh retry
    period. 2 when the config or the database cannot be used, 1 when the write failed."""
    if event_id is not None and not 1 <= event_id <= events.ID_MAX:
        print(f"--event must be the id of an event, 1 to {events.ID_MAX}", file=sys.stderr)
        return 2
    try:
        db = databases.open_existing(databases.config_for_command(config_path))
    except databases.CannotOpen as e:
        print(e, file=sys.stderr)
        return 2
    try:
        count = db.write_sync(lambda conn: events.retry_dead(conn, webhook_id, event_id))
    except (StorageError, *database_errors()) as e:
        print(f"cannot queue the dead letters again: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    finally:
        db.close()
    print(f"{count} dead deliver{'y' if count == 1 else 'ies'} queued again")
    return 0
