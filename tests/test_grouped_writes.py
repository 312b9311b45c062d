"""Grouped writes (storage.db.Grouped): the confirms of one batch are planned one after
another and applied together, with one savepoint and one statement per table; a plan
that depends on one not yet applied has them applied first; a failed apply undoes the
group and its items run again one by one, so one bad receipt never takes others with it."""
from __future__ import annotations

import asyncio
import sqlite3

import pytest

from conftest import line, receipt
from storage.audit import verify
from storage.db import Flush, Grouped, Ready
from test_storage_writer import WriterGate, notes, open_db, wait_until  # noqa: F401 - open_db is a fixture

pytestmark = pytest.mark.sqlite_only(reason="group commit of SQLite's one writer (storage.db.Grouped);"
                                     " PostgreSQL writes each request in its own transaction")

NOW = "2026-11-24T12:00:05+02:00"


class Notes:
    """Plans are notes to insert; apply writes them with one executemany and remembers
    each call's size. A note "dup:x" depends on the pending note x."""

    def __init__(self) -> None:
        self.applied: list[list[str]] = []

    def write(self, note: str) -> Grouped:
        def plan(conn, group: dict):
            if note == "refused":
                raise ValueError("refused while planning")
            if note.startswith("dup:"):
                if note[4:] in group.get("notes", ()):
                    raise Flush
                return Ready(conn.execute("SELECT COUNT(*) FROM receipts WHERE note = ?", (note[4:],)).fetchone()[0])
            group.setdefault("notes", set()).add(note)
            return note

        return Grouped(plan, self.apply)

    def apply(self, conn, plans: list[str]) -> list[str]:
        self.applied.append(list(plans))
        conn.executemany("INSERT INTO receipts (note) VALUES (?)", [(n,) for n in plans])
        if "poison-apply" in plans and len(plans) > 1:
            raise sqlite3.IntegrityError("one plan of the group cannot be applied")
        return [f"ok {n}" for n in plans]


async def queued_behind_a_gate(db, writes):
    gate = WriterGate()
    held = await gate.close_on(db)
    tasks = [asyncio.create_task(db.write_grouped(w)) for w in writes]
    await wait_until(lambda: db.queue_depth() == len(writes))
    gate.release.set()
    await held
    return await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_batch_plans_each_then_applies_them_together_and_a_refusal_fails_alone(open_db):
    db, kinds = open_db(), Notes()
    results = await queued_behind_a_gate(db, [kinds.write(n) for n in ("a", "refused", "b", "c")])
    assert results[0] == "ok a" and results[2:] == ["ok b", "ok c"]
    assert isinstance(results[1], ValueError)
    assert kinds.applied == [["a", "b", "c"]]
    assert await db.read(notes) == ["a", "b", "c"]


async def test_a_plan_that_needs_an_earlier_one_applied_sees_it(open_db):
    db, kinds = open_db(), Notes()
    results = await queued_behind_a_gate(db, [kinds.write(n) for n in ("a", "dup:a", "b")])
    assert results == ["ok a", 1, "ok b"]          # "dup:a" planned after "a" was written
    assert kinds.applied == [["a"], ["b"]]


async def test_a_failed_apply_undoes_the_group_and_each_item_runs_alone(open_db):
    db, kinds = open_db(), Notes()
    results = await queued_behind_a_gate(db, [kinds.write(n) for n in ("a", "poison-apply", "b")])
    assert results == ["ok a", "ok poison-apply", "ok b"]      # alone, the poison applies
    assert kinds.applied == [["a", "poison-apply", "b"], ["a"], ["poison-apply"], ["b"]]
    assert await db.read(notes) == ["a", "poison-apply", "b"]   # the undone group left nothing


async def test_a_failed_apply_after_another_write_of_its_batch_keeps_that_write(open_db):
    """A group that does not begin the transaction is undone alone (its savepoint): the plain
    write before it in the batch stays, and a refusal after it still fails alone."""
    db, kinds = open_db(), Notes()
    gate = WriterGate()
    held = await gate.close_on(db)
    plain = asyncio.create_task(db.write(lambda conn: conn.execute("INSERT INTO receipts (note) VALUES ('w')")
                                         .rowcount))
    await wait_until(lambda: db.queue_depth() == 1)
    grouped = [asyncio.create_task(db.write_grouped(kinds.write(n))) for n in ("a", "poison-apply", "b")]
    await wait_until(lambda: db.queue_depth() == 4)
    gate.release.set()
    await held
    assert await plain == 1
    assert await asyncio.gather(*grouped) == ["ok a", "ok poison-apply", "ok b"]
    assert kinds.applied == [["a", "poison-apply", "b"], ["a"], ["poison-apply"], ["b"]]
    assert await db.read(notes) == ["w", "a", "poison-apply", "b"]


async def test_a_group_that_begins_its_transaction_takes_no_savepoint(open_db):
    """While a savepoint is open SQLite copies each page a write changes into its journal
    first: a batch of confirms alone in its transaction is applied without one."""
    db, kinds = open_db(), Notes()
    statements: list[str] = []
    await db.write(lambda conn: conn.set_trace_callback(statements.append))
    try:
        results = await queued_behind_a_gate(db, [kinds.write(n) for n in ("a", "b")])
        alone = await db.write_grouped(kinds.write("c"))
    finally:
        await db.write(lambda conn: conn.set_trace_callback(None))
    assert results == ["ok a", "ok b"] and alone == "ok c"
    assert kinds.applied == [["a", "b"], ["c"]]
    inserts = [at for at, s in enumerate(statements) if s.startswith("INSERT INTO receipts")]
    assert {statements[at][-4:-1] for at in inserts} == {"'a'", "'b'", "'c'"}
    applying = statements[inserts[0]:inserts[-1] + 1]
    assert "COMMIT -- storage writer" in applying             # two batches: the group, then "c" alone
    assert not [s for s in applying if "SAVEPOINT" in s]
    assert not [s for s in statements if "storage_writer_group" in s]


async def test_an_item_that_ends_the_transaction_fails_alone_and_the_rest_of_its_group_is_kept(open_db):
    db, kinds = open_db(), Notes()
    results = await queued_behind_a_gate(db, [kinds.write(n) for n in ("a", "poison", "b")])
    assert results[0] == "ok a" and results[2] == "ok b"
    assert isinstance(results[1], sqlite3.IntegrityError)       # the test schema's RAISE(ROLLBACK)
    assert await db.read(notes) == ["a", "b"]


async def test_a_receipt_that_cannot_be_stored_leaves_the_others_of_its_batch_confirmed(make_api, tmp_path):
    api = await make_api(now=NOW)
    for i in range(6):
        await api.post("/v1/members", {"card": f"c{i}"})
    conn = sqlite3.connect(tmp_path / "loyalty.db")
    conn.execute("CREATE TRIGGER refuse_one BEFORE INSERT ON receipts WHEN NEW.receipt_id = 'G-3' "
                 "BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END")
    conn.commit()
    conn.close()
    bodies = [receipt(f"G-{i}", [line(1, "grocery", 60000)], card=f"c{i}", redeem=50 if i == 4 else 0)
              for i in range(6)]
    answers = await asyncio.gather(*(api.post("/v1/receipts", b, as_="register") for b in bodies))
    assert [s for s, _ in answers] == [201, 201, 201, 500, 201, 201]
    assert answers[4][1]["redeemed"]["points"] == 50
    conn = sqlite3.connect(tmp_path / "loyalty.db")
    stored = [r[0] for r in conn.execute("SELECT receipt_id FROM receipts ORDER BY receipt_id")]
    assert stored == ["G-0", "G-1", "G-2", "G-4", "G-5"]
    assert conn.execute("SELECT COUNT(*) FROM postings WHERE receipt_id = 'G-3'").fetchone()[0] == 0
    report = verify(conn)
    assert report.ok, report.problems
    _, member = await api.get("/v1/members/c4")
    assert member["balance"]["available"] == 50
