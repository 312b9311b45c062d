"""The jobs' lock on PostgreSQL: background jobs (expiry, holds, birthdays, RFM, webhook
deliveries, anchors) run in one server process at a time, whichever holds it.

It is a session-level advisory lock on a connection of its own: every process tries for it
each jobs interval (pg_try_advisory_lock never waits), one gets it and keeps it as long as
its connection lives. A process that dies or loses its connection loses the lock with it,
as PostgreSQL ends the session, and another process takes it at its next try; nothing has
to notice the death or time a lease out.
"""
from __future__ import annotations

import psycopg

from storage.pg.connection import Connection, connect

# pg_try_advisory_lock's key for the jobs: 'jobs' as a number, fixed for good.
JOBS_LOCK_KEY = 0x6A6F6273
CONNECT_TIMEOUT_S = 5


class JobsLock:
    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: Connection | None = None
        self._held = False

    def holds(self) -> bool:
        """Whether this process runs the jobs now: it holds the lock, or took it just now.
        False while PostgreSQL cannot be reached (the jobs wait with everything else)."""
        try:
            if self._conn is None or self._conn.raw.broken or self._conn.raw.closed:
                self._held = False
                self._conn = connect(self._url, connect_timeout_s=CONNECT_TIMEOUT_S)
            if self._held:
                self._conn.execute("SELECT 1")       # the session, and so the lock, still there
            else:
                self._held = bool(self._conn.execute("SELECT pg_try_advisory_lock(?)",
                                                     (JOBS_LOCK_KEY,)).fetchone()[0])
        except psycopg.OperationalError:
            self._drop()
        return self._held

    def release(self) -> None:
        """Gives the lock up (a process stopping): another process takes it at its next try.
        Unlocked before the connection closes, since a session's end reaches the server a
        moment after the client has gone."""
        if self._held and self._conn is not None:
            try:
                self._conn.execute("SELECT pg_advisory_unlock(?)", (JOBS_LOCK_KEY,))
            except psycopg.OperationalError:
                pass        # the session is gone, and its lock with it
        self._drop()

    def _drop(self) -> None:
        self._held = False
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg.Error:
                pass        # a broken session: its lock is gone with it
            self._conn = None
