"""`rules diff` from the console: an edited program against the live one, replayed on the
stored receipts of a period, in the background.

One backtest runs at a time, on a thread of its own, with its own read-only connection.
Receipts are read a page at a time, each page its own short read, so neither the memory
held nor the WAL kept from being checkpointed grows with the period; its size is bounded
anyway (console.backtest_receipts_max, console.backtest_days_max), and a page shows its
progress meanwhile. Both programs are compiled from their files for the run, so it never
waits on the serving program's engine.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from rules import ProgramError, load_files
from server.errors import conflict, field_error
from server.replay_member import from_record
from server.rules_tools import DiffReport, ToolError, decode_receipt, diff
from storage import member_facts
from storage.ledger import unpack
from storage.sql import database_errors

log = logging.getLogger("loyalty.console")
PAGE_ROWS = 500


@dataclass
class Backtest:
    id: str
    key_id: str
    file: str
    text: str
    base_sha256: str
    first: date
    last: date
    total: int
    currency: str = ""
    point_value: int = 0
    old_version: str = ""
    new_version: str = ""
    state: str = "running"          # running, done, failed, cancelled
    done: int = 0
    report: DiffReport | None = None
    error: str | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    stop: threading.Event = field(default_factory=threading.Event)


def count_receipts(conn: sqlite3.Connection, first: date, last: date) -> int:
    return conn.execute("SELECT COUNT(*) FROM receipts WHERE local_date BETWEEN ? AND ? AND status = 'confirmed'",
                        (first.isoformat(), last.isoformat())).fetchone()[0]


def stored_receipts(conn: sqlite3.Connection, first: date, last: date, job: Backtest) -> Iterator:
    """The confirmed receipts of the period in time order, each with the member facts
    recorded with it (None before they were), a page per read (keyset on the receipts_day
    index), counting job.done; stops when job.stop is set."""
    after = (first.isoformat(), "", "", "", "")
    column, join = member_facts.source(conn)
    while not job.stop.is_set():
        rows = conn.execute(
            f"SELECT r.local_date, r.ts, r.store_id, r.register_id, r.receipt_id, r.body, {column} "
            f"FROM receipts r {join} "
            "WHERE (r.local_date, r.ts, r.store_id, r.register_id, r.receipt_id) > (?, ?, ?, ?, ?) "
            "AND r.local_date <= ? AND r.status = 'confirmed' "
            "ORDER BY r.local_date, r.ts, r.store_id, r.register_id, r.receipt_id LIMIT ?",
            (*after, last.isoformat(), PAGE_ROWS)).fetchall()
        if not rows:
            return
        for row in rows:
            body, facts = row[5], row[6]
            where = f"receipt {row[2]}/{row[3]}/{row[4]}"
            receipt = decode_receipt(unpack(body) if isinstance(body, bytes) else body.encode(), where)
            yield receipt, None if facts is None else from_record(member_facts.decode(facts))
            job.done += 1
        after = tuple(rows[-1][:5])


class Backtests:
    def __init__(self, connect: Callable[[], Any], kept: int, receipts_max: int, days_max: int):
        """connect: a read-only connection to the database, for one backtest's thread."""
        self._connect = connect
        self._kept = kept
        self._receipts_max = receipts_max
        self._days_max = days_max
        self._jobs: OrderedDict[str, Backtest] = OrderedDict()
        self._tasks: set[asyncio.Task] = set()

    def get(self, job_id: str) -> Backtest | None:
        return self._jobs.get(job_id)

    def running(self) -> Backtest | None:
        return next((job for job in self._jobs.values() if job.state == "running"), None)

    async def start(self, *, key_id: str, file: str, text: str, base_sha256: str, first: date, last: date,
                    old_files: dict[str, bytes], new_files: dict[str, bytes], now) -> Backtest:
        if last < first:
            raise field_error("to", "must not be before from")
        if (last - first).days + 1 > self._days_max:
            raise field_error("to", f"the period must be at most {self._days_max} days (console.backtest_days_max)")
        if self.running() is not None:
            raise conflict("backtest_running", "a backtest is running; wait for it to finish")
        total = await asyncio.to_thread(self._count, first, last)
        if total > self._receipts_max:
            raise field_error("to", f"the period holds {total} receipts, more than {self._receipts_max} "
                                    "(console.backtest_receipts_max): choose a shorter one")
        job = Backtest(secrets.token_urlsafe(12), key_id, file, text, base_sha256, first, last, total)
        self._keep(job)
        task = asyncio.create_task(asyncio.to_thread(self._run, job, old_files, new_files, now))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    def _keep(self, job: Backtest) -> None:
        self._jobs[job.id] = job
        finished = [key for key, j in self._jobs.items() if j.state != "running"]
        while len(self._jobs) > self._kept and finished:
            del self._jobs[finished.pop(0)]

    def _count(self, first: date, last: date) -> int:
        with closing(self._connect()) as conn:
            return count_receipts(conn, first, last)

    def _run(self, job: Backtest, old_files: dict[str, bytes], new_files: dict[str, bytes], now) -> None:
        programs = []
        try:
            programs = [load_files(old_files, now), load_files(new_files, now)]
            old, new = programs
            job.old_version, job.new_version = old.version, new.version
            job.currency, job.point_value = new.currency, new.point_value
            with closing(self._connect()) as conn:
                report = diff(old, new, stored_receipts(conn, job.first, job.last, job))
            job.report = report
            job.state = "cancelled" if job.stop.is_set() else "done"
        except (ProgramError, ToolError, *database_errors(), member_facts.UnknownVersion) as e:
            job.error, job.state = str(e), "failed"
        except Exception as e:  # noqa: BLE001 - shown on the page and logged; the server goes on
            log.exception("backtest %s failed", job.id)
            job.error, job.state = f"internal error: {e}", "failed"
        finally:
            for program in programs:
                program.close()
            job.finished = time.time()

    async def close(self) -> None:
        """At shutdown: stop the runs and wait for their threads."""
        for job in self._jobs.values():
            job.stop.set()
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await task


def as_rows(job: Backtest) -> list[dict]:
    """Per rule: points before and after and their cost (points x point value, exact minor units)."""
    if job.report is None:
        return []
    rows = []
    for row in job.report.rules:
        rows.append({"rule": row.rule, "old": row.old, "new": row.new, "difference": row.difference,
                     "old_receipts": row.old_receipts, "new_receipts": row.new_receipts,
                     "old_cost": row.old * job.point_value, "new_cost": row.new * job.point_value,
                     "cost_difference": row.difference * job.point_value})
    return rows
