"""Background jobs run in one server process at a time on PostgreSQL (storage/pg/leader.py):
of processes trying at once one gets the jobs' lock, and when it stops or its session dies,
another gets it at its next try."""
from __future__ import annotations

from storage.pg.connection import connect
from storage.pg.leader import JOBS_LOCK_KEY, JobsLock

GONE_WITHIN_MS = 30_000     # pg_terminate_backend waits for the session's end this long at most


def test_one_process_holds_the_jobs_and_another_takes_over_when_it_stops(pg_url):
    first, second, third = JobsLock(pg_url), JobsLock(pg_url), JobsLock(pg_url)
    try:
        assert [first.holds(), second.holds(), third.holds()] == [True, False, False]
        assert first.holds() and not second.holds()         # it keeps it while it lives
        first.release()
        assert [second.holds(), third.holds()] == [True, False]
    finally:
        for lock in (first, second, third):
            lock.release()


def test_a_process_whose_session_dies_loses_the_jobs_to_another(pg_url):
    first, second = JobsLock(pg_url), JobsLock(pg_url)
    admin = connect(pg_url)
    try:
        assert first.holds() and not second.holds()
        # The holder's session ends under it (a crash, a network cut, a failover).
        holder = admin.execute("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = 0 "
                               "AND objid = ? AND granted", (JOBS_LOCK_KEY,)).fetchone()[0]
        admin.execute("SELECT pg_terminate_backend(?, ?)", (holder, GONE_WITHIN_MS))
        assert second.holds()
        assert not first.holds()        # it learns it lost them, and does not take them back
    finally:
        first.release()
        second.release()
        admin.close()
