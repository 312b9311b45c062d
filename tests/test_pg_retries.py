"""config.yaml's `database.retries` on PostgreSQL: a write refused for a conflict with
another transaction runs again from its start at most that often, 0 meaning one try; a
conflict that clears on a later try commits that try's work. A write that needs a member's
lock below those it holds runs again with it taken first, outside that count."""
from __future__ import annotations

import asyncio

import psycopg
import pytest

from server.config import ConfigError, config_from_dict
from storage import ledger
from storage.pg.database import PgDatabase
from storage.sql import LockFirst, WriteConflict


def section(**values):
    return config_from_dict({"database": values}).database


def opened(pg_url: str, **values) -> PgDatabase:
    db = PgDatabase.from_config(section(url=pg_url, connections=1, **values))
    db.open()
    return db


def put(conn, key: str) -> None:
    conn.execute("INSERT INTO event_fires (member_id, event_id, occasion, created_at) "
                 "VALUES (1, ?, 'retries', 'now')", (key,))


def keys(conn) -> list[str]:
    return [r[0] for r in conn.execute("SELECT event_id FROM event_fires WHERE occasion = 'retries' "
                                       "ORDER BY event_id")]


def counting(attempts: list[int], write):
    def fn(conn):
        attempts.append(len(attempts) + 1)
        return write(conn)
    return fn


@pytest.mark.parametrize("retries", [0, 1, 5])
async def test_a_write_that_keeps_conflicting_runs_retries_plus_one_times(pg_url, retries):
    db = opened(pg_url, retries=retries)
    try:
        await db.write(lambda conn: put(conn, "taken"))
        attempts: list[int] = []
        with pytest.raises(psycopg.errors.UniqueViolation):
            await db.write(counting(attempts, lambda conn: (put(conn, "mine"), put(conn, "taken"))))
        assert len(attempts) == retries + 1
        assert await db.read(keys) == ["taken"]        # no try left "mine" behind
    finally:
        db.close()


async def test_the_default_is_three_retries_and_a_conflict_that_clears_commits(pg_url):
    db = opened(pg_url)
    try:
        attempts: list[int] = []

        def loses_twice(conn):
            put(conn, f"try-{len(attempts)}")
            if len(attempts) < 3:
                raise WriteConflict("another transaction took it")
            return "done"
        assert await db.write(counting(attempts, loses_twice)) == "done"
        assert attempts == [1, 2, 3]
        assert await db.read(keys) == ["try-3"]      # only the try that committed
        attempts.clear()

        def always_loses(conn):
            raise WriteConflict("another transaction took it")
        with pytest.raises(WriteConflict):
            await db.write(counting(attempts, always_loses))
        assert len(attempts) == 4
    finally:
        db.close()


def two_members(conn) -> list[int]:
    return [ledger.insert_member(conn, card=f"card-{n}", card_last4=f"000{n}", phone_hmac=None, phone_last4=None,
                                 birthday=None, tags="[]", referred_by=None, store_id=None, now="now")
            for n in range(2)]


async def test_a_write_needing_a_lock_below_those_it_holds_runs_again_with_it_first_not_as_a_retry(pg_url):
    """The lower member's lock held by another transaction: the write, holding the higher
    one, does not wait for it (that could deadlock) but runs again with the lower one taken
    first, waiting holding nothing; with retries at 0 it still commits."""
    db = opened(pg_url, retries=0)
    other = psycopg.connect(pg_url, autocommit=True)
    try:
        low, high = await db.write(two_members)
        other.execute("BEGIN")
        other.execute("SELECT 1 FROM members WHERE id = %s FOR UPDATE", (low,))
        attempts: list[int] = []

        def both(conn):
            ledger.lock_member(conn, high)
            ledger.lock_members_after(conn, [low])
            put(conn, f"try-{len(attempts)}")
            return sorted(conn.members_locked)
        write = asyncio.ensure_future(db.write(counting(attempts, both)))
        while other.execute("SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                            "AND datname = current_database()").fetchone()[0] == 0:
            assert not write.done(), write.result()
            await asyncio.sleep(0.01)
        assert attempts == [1]          # the second run waits for the lower lock before it starts
        other.execute("COMMIT")
        assert await write == [low, high]
        assert attempts == [1, 2]
        assert await db.read(keys) == ["try-2"]      # only the run that committed

        def asks_again(conn):
            raise LockFirst([low])
        attempts.clear()
        with pytest.raises(LockFirst):      # held first and asked for again: a conflict, counted
            await db.write(counting(attempts, asks_again))
        assert attempts == [1, 2]
    finally:
        other.close()
        db.close()


@pytest.mark.parametrize("retries", [-1, 21])
def test_retries_out_of_bounds_stop_start_up(retries):
    with pytest.raises(ConfigError, match="retries"):
        section(url="postgresql://loyalty@db1/loyalty", retries=retries)
