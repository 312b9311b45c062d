"""`audit verify` on PostgreSQL (storage/pg/audit.py): a ledger the receipt path wrote
verifies, with the same liability and accounts as SQLite reports them, and a kept number
edited by hand (a lot's remaining points, a rule's total) is named. Its reads of whole
tables come a chunk at a time, so that the audit of a large program fits in memory."""
from __future__ import annotations

from datetime import datetime

import psycopg
import pytest
from test_pg_receipt_path import REDEEM, a_receipt, confirm, db, enroll, program, rows, to_dict  # noqa: F401

from storage.pg import anchors
from storage.pg import connection as pg_connection
from storage.pg.audit import verify
from storage.pg.connection import connect

LATER = datetime.fromisoformat("2026-11-24T12:01:00+02:00")


def written(url: str, program) -> tuple[int, int]:
    """Two members, two receipts (the second paying with points), anchored; the first
    member's id and the points the receipts earned."""
    member_id = enroll(url, program)
    enroll(url, program, card="hmac-of-7000000000002")
    earned = sum(to_dict(confirm(url, program, r)[1])["accrued"]["points"]
                 for r in (a_receipt("A-1"), a_receipt("A-2", redeem=REDEEM)))
    conn = connect(url)
    try:
        anchors.write_anchors(conn, LATER)
    finally:
        conn.close()
    return member_id, earned


def audited(url: str):
    conn = connect(url)
    try:
        return verify(conn)
    finally:
        conn.close()


def test_a_ledger_the_receipt_path_wrote_verifies(db, program):
    _, earned = written(db, program)
    report = audited(db)
    assert report.problems == []
    assert report.liability == 200 + earned - REDEEM == rows(db, "SELECT SUM(remaining) FROM lots")[0][0]
    assert type(report.liability) is int        # points, never Decimal or float
    assert report.accounts == {"issue:program": -(200 + earned), "redemption:program": REDEEM}
    assert report.receipts == 2 and report.members == 2
    assert report.chain_head == bytes(rows(db, "SELECT hash FROM chain_anchors ORDER BY id DESC LIMIT 1")[0][0]).hex()


def test_a_lots_remaining_points_edited_by_hand_are_named(db, program):
    member_id, _ = written(db, program)
    lot_id = rows(db, "SELECT MIN(id) FROM lots WHERE member_id = ?", (member_id,))[0][0]
    conn = connect(db)
    try:
        conn.execute("UPDATE lots SET remaining = remaining + 1000 WHERE id = ?", (lot_id,))
    finally:
        conn.close()
    assert audited(db).problems == [f"lot {lot_id} of member m_{member_id} says {100 - REDEEM + 1000} points "
                                    f"remain, its postings sum to {100 - REDEEM}"]


def test_a_rules_total_edited_by_hand_is_named(db, program):
    written(db, program)
    base = rows(db, "SELECT SUM(points) FROM posting_rules WHERE rule_id = 'base'")[0][0]
    conn = connect(db)
    try:
        conn.execute("UPDATE rule_totals SET points = points + 5 WHERE rule_id = 'base' AND shard = "
                     "(SELECT MIN(shard) FROM rule_totals WHERE rule_id = 'base')")
    finally:
        conn.close()
    assert audited(db).problems == [f"rule base: rule_totals says it issued {base + 5} points, its accrual and "
                                    f"reversal postings sum to {base}"]


def test_the_audit_reads_whole_tables_a_few_rows_at_a_time(db, program, monkeypatch):
    # One row per fetch: every merge of two streamed reads (chains with their heads,
    # receipts with their postings) crosses a fetch between any two rows.
    monkeypatch.setattr(pg_connection, "STREAM_ROWS", 1)
    member_id, earned = written(db, program)
    earned += to_dict(confirm(db, program, a_receipt("A-3"))[1])["accrued"]["points"]
    conn = connect(db)
    try:
        anchors.write_anchors(conn, LATER)
    finally:
        conn.close()
    assert rows(db, "SELECT COUNT(*) FROM chain_anchors")[0][0] == 2
    report = audited(db)
    assert report.problems == [] and report.receipts == 3 and report.liability == 200 + earned - REDEEM
    conn = connect(db)
    try:
        conn.execute("ALTER TABLE postings DISABLE TRIGGER USER")   # the append-only guard
        conn.execute("UPDATE postings SET points = points + 1 WHERE id = (SELECT MAX(id) FROM postings "
                     "WHERE member_id = ?)", (member_id,))
        conn.execute("ALTER TABLE postings ENABLE TRIGGER USER")
    finally:
        conn.close()
    assert any(problem.startswith(f"member m_{member_id}: posting ") and "does not match" in problem
               for problem in audited(db).problems)


def test_a_streamed_read_hands_out_rows_before_its_statement_has_finished(db, monkeypatch):
    # 10 / (5 - g) fails at g = 5: a read held whole fails before giving any row.
    monkeypatch.setattr(pg_connection, "STREAM_ROWS", 2)
    sql = "SELECT 10 / (5 - g) FROM generate_series(1, 10) AS g"
    conn = connect(db)
    try:
        got = []

        def read(c):
            for row in c.stream(sql):
                got.append(row[0])
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.transaction(read, retries=0)
        assert got[:2] == [2, 3]
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute(sql)
    finally:
        conn.close()
