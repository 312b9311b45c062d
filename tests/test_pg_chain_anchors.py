"""Anchors over the members' hash chains on PostgreSQL (storage/pg/anchors.py): what one
member's chain cannot show (its end cut off, the head put back) the anchors do, and writing
an anchor never waits for a receipt being written."""
from __future__ import annotations

import time
from datetime import datetime

from test_pg_receipt_path import CARD, a_receipt, confirm, db, enroll, program, rows  # noqa: F401 (fixtures)

from server.ops.receipts import confirm_write
from storage.pg import anchors
from storage.pg import ledger as pg_ledger
from storage.pg.connection import connect

LATER = datetime.fromisoformat("2026-11-24T12:01:00+02:00")
PROMPTLY_S = 20     # generous: the machine is shared; a wait for the open transaction never ends


def test_each_anchor_lists_the_heads_that_moved_since_the_last(db, program):
    first, second = enroll(db, program), enroll(db, program, card="hmac-of-7000000000002")
    conn = connect(db)
    try:
        assert anchors.write_anchors(conn, LATER) == 2
        assert anchors.write_anchors(conn, LATER) == 0         # nothing moved: no anchor
        confirm(db, program, a_receipt("A-1"))                  # the first member's chain grows
        assert anchors.write_anchors(conn, LATER) == 1
        assert anchors.verify(conn) == [] and pg_ledger.verify_chains(conn) == []
    finally:
        conn.close()
    assert rows(db, "SELECT anchor_id, member_id, seq FROM chain_anchor_heads ORDER BY anchor_id, member_id") == \
        [(1, first, 1), (1, second, 1), (2, first, 2)]


def test_postings_cut_from_a_members_end_are_named_by_the_anchor_that_listed_them(db, program):
    member_id = enroll(db, program)
    confirm(db, program, a_receipt("A-1"))
    conn = connect(db)
    try:
        anchors.write_anchors(conn, LATER)
        # By hand, as the database's owner could: the last two postings gone and the head
        # put back to the one before, so the member's own chain still verifies.
        conn.execute("ALTER TABLE postings DISABLE TRIGGER postings_append_only")
        conn.execute("DELETE FROM postings WHERE member_id = ? AND chain_seq > 1", (member_id,))
        conn.execute("ALTER TABLE postings ENABLE TRIGGER postings_append_only")
        conn.execute("UPDATE chain_heads SET seq = 1, hash = (SELECT hash FROM postings WHERE member_id = ? "
                     "AND chain_seq = 1) WHERE member_id = ?", (member_id, member_id))
        assert pg_ledger.verify_chains(conn) == []
        assert anchors.verify(conn) == [f"member m_{member_id}: posting 2 of its chain, anchored by anchor 1, "
                                        "is missing"]
    finally:
        conn.close()


def test_an_edited_anchor_breaks_the_anchors_chain(db, program):
    enroll(db, program)
    conn = connect(db)
    try:
        anchors.write_anchors(conn, LATER)
        confirm(db, program, a_receipt("A-1"))
        anchors.write_anchors(conn, LATER)
        conn.execute("ALTER TABLE chain_anchors DISABLE TRIGGER chain_anchors_append_only")
        conn.execute("UPDATE chain_anchors SET created_at = '2026-11-24T10:00:00.000000Z' WHERE id = 1")
        conn.execute("ALTER TABLE chain_anchors ENABLE TRIGGER chain_anchors_append_only")
        assert anchors.verify(conn) == ["anchor 1: does not match its heads or the anchor before it"]
    finally:
        conn.close()


def test_an_anchor_skips_a_head_being_written_instead_of_waiting_for_it(db, program):
    enroll(db, program)
    other = enroll(db, program, card="hmac-of-7000000000002")
    writing, anchoring = connect(db), connect(db)
    # Were the anchor to wait for the open transaction, it would fail after this, not hang.
    anchoring.execute(f"SET lock_timeout = '{PROMPTLY_S}s'")
    try:
        with writing.raw.transaction():         # a receipt of the first member, not committed yet
            confirm_write(program, a_receipt("A-1"), CARD, b"{}", "00" * 32, LATER, [], None).alone(writing)
            started = time.monotonic()
            assert anchors.write_anchor(anchoring, LATER) == 1
            assert time.monotonic() - started < PROMPTLY_S
            assert rows(db, "SELECT member_id FROM chain_anchor_heads") == [(other,)]
        assert anchors.write_anchors(anchoring, LATER) == 1     # the first member's, now committed
        assert anchors.verify(anchoring) == []
    finally:
        writing.close()
        anchoring.close()
