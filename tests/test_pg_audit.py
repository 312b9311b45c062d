"""`audit verify` on PostgreSQL (storage/pg/audit.py): a ledger the receipt path wrote
verifies, with the same liability and accounts as SQLite reports them, and a kept number
edited by hand (a lot's remaining points, a rule's total) is named."""
from __future__ import annotations

from datetime import datetime

from test_pg_receipt_path import REDEEM, a_receipt, confirm, db, enroll, program, rows, to_dict  # noqa: F401

from storage.pg import anchors
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
