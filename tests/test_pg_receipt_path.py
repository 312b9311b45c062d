"""The receipt path on PostgreSQL (storage/pg/): the same plans and answers as on SQLite,
written by transactions that run at once, as several server processes' would.

Each test gets an empty database of a throwaway cluster (tests/pg_cluster.py) and skips,
saying why, without PostgreSQL. Races are made certain, not hoped for: one connection's
transaction is held open until the other one is seen waiting for it in pg_stat_activity.
"""
from __future__ import annotations

import threading
import time
from datetime import datetime

import msgspec
import pytest

from conftest import MARKET, line, receipt
from rules import load_program
from server import schema
from server.errors import ApiError
from server.ops import sha256
from server.ops.receipts import _calculate_in_tx, confirm_write
from storage import ledger
from storage.apply import fire_events
from storage.pg import ledger as pg_ledger
from storage.pg.connection import connect
from storage.pg.schema import MIGRATIONS, applied, migrate

NOW = datetime.fromisoformat("2026-11-24T12:00:05+02:00")
# What the receipt below may pay with points at most (max_share 0.5 of its 12,100 without
# tobacco, 1 point a unit of 100): more than half of the welcome event's 100.
REDEEM = 60
CARD = "hmac-of-7000000000001"      # the receipt path is given the card's HMAC, never the number
WAIT_FOR_LOCK_S = 30                # generous: the machine is shared


@pytest.fixture
def db(pg_url):
    conn = connect(pg_url)
    migrate(conn)
    yield pg_url
    conn.close()


@pytest.fixture
def program():
    return load_program(MARKET, NOW)


def enroll(url: str, program, card: str = CARD) -> int:
    """A member with the welcome event's 100 points, as enrollment gives them."""
    conn = connect(url)
    try:
        def in_tx(c):
            member_id = ledger.insert_member(c, card=card, card_last4=card[-4:], phone_hmac=None,
                                             phone_last4=None, birthday=None, tags="[]", referred_by=None,
                                             store_id="S001", now="2026-11-01T10:00:00.000000Z")
            fire_events(c, program, member_id, "enrolled", "enrolled",
                        datetime.fromisoformat("2026-11-01T12:00:00+02:00"))
            return member_id
        return conn.transaction(in_tx)
    finally:
        conn.close()


def a_receipt(receipt_id: str, redeem: int = 0) -> schema.Receipt:
    """conformance case 01's receipt: 4 points to a member without a tier."""
    body = receipt(receipt_id, [line(1, "dairy", 9100, qty=2, sku="4820000000011", price=4550),
                                line(2, "bakery", 3000, sku="4820000000028", price=3000),
                                line(3, "tobacco", 10000, sku="4820000000035", price=10000)],
                   card="7000000000001", redeem=redeem)
    return msgspec.convert(body, schema.Receipt)


def confirming(program, r: schema.Receipt):
    """The server's confirm (server/ops/receipts.py) as one write of its own: (status, answer)."""
    body = schema.canonical(msgspec.structs.replace(r, card=CARD))
    write = confirm_write(program, r, CARD, body, sha256(body), NOW, [], None)
    return lambda conn: write.alone(conn)[:2]


def confirm(url: str, program, r: schema.Receipt):
    conn = connect(url)
    try:
        return conn.transaction(confirming(program, r))
    finally:
        conn.close()


def to_dict(answer) -> dict:
    return answer if isinstance(answer, dict) else msgspec.to_builtins(answer)


def rows(url: str, sql: str, params=()):
    conn = connect(url)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def holding_the_member(url: str, program, r: schema.Receipt, then):
    """Runs r's confirm in a transaction that stays open (the member locked) until `then`,
    started meanwhile in a thread, is seen waiting for a lock; then commits and returns
    what `then` did (its answer or its exception)."""
    conn = connect(url)
    outcome: dict = {}

    def other():
        try:
            outcome["result"] = then()
        except Exception as e:     # handed back to the test, which asserts on it
            outcome["error"] = e
    try:
        with conn.raw.transaction():
            first = confirming(program, r)(conn)
            thread = threading.Thread(target=other)
            thread.start()
            deadline = time.monotonic() + WAIT_FOR_LOCK_S
            while not (waiting := rows(url, "SELECT query FROM pg_stat_activity WHERE wait_event_type = 'Lock'")):
                assert time.monotonic() < deadline, "the second transaction never waited for the first"
                assert thread.is_alive(), f"the second transaction did not wait: {outcome}"
                time.sleep(0.02)
        thread.join(WAIT_FOR_LOCK_S)
        assert not thread.is_alive()
        # It waited at the member's lock, before reading anything of the member.
        assert "FOR UPDATE OF m" in waiting[0][0], waiting
        return first, outcome
    finally:
        conn.close()


def test_processes_starting_together_take_turns_migrating(pg_url):
    results: list[list[str]] = []
    barrier = threading.Barrier(3)

    def start():
        conn = connect(pg_url)
        try:
            barrier.wait(timeout=30)
            results.append(migrate(conn))
        finally:
            conn.close()
    threads = [threading.Thread(target=start) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == [[], [], [name for name, _ in MIGRATIONS]]
    conn = connect(pg_url)
    try:
        assert applied(conn) == [name for name, _ in MIGRATIONS]
    finally:
        conn.close()


def test_a_confirm_answers_as_the_contract_and_leaves_a_verifiable_ledger(db, program):
    member_id = enroll(db, program)
    status, answer = confirm(db, program, a_receipt("A-1"))
    answer = to_dict(answer)
    assert status == 201
    assert answer["accrued"]["points"] == 4
    assert answer["accrued"]["available_from"] == "2026-12-08"
    assert answer["accrued"]["expires_on"] == "2027-11-24"
    assert {r["rule"]: r["points"] for r in answer["accrued"]["by_rule"]} == {"base": 2, "dairy-x2": 2}
    assert answer["balance"] == {"available": 100, "pending": 4, "held": 0}
    assert rows(db, "SELECT kind, points, rule_id, chain_seq FROM postings WHERE member_id = ? ORDER BY chain_seq",
                (member_id,)) == [("event", 100, "welcome", 1), ("accrual", 4, None, 2)]
    # One accrual posting per lot, its split by rule beside it, as on SQLite.
    assert rows(db, "SELECT rule_id, points FROM posting_rules ORDER BY rule_id") == [("base", 2), ("dairy-x2", 2)]
    assert rows(db, "SELECT SUM(remaining) FROM lots WHERE member_id = ?", (member_id,)) == [(104,)]
    assert dict(rows(db, "SELECT rule_id, SUM(points) FROM rule_totals GROUP BY rule_id")) == \
        {"base": 2, "dairy-x2": 2}
    conn = connect(db)
    try:
        assert pg_ledger.verify_chains(conn) == []
    finally:
        conn.close()


def test_the_same_receipt_answers_replayed_and_a_changed_body_conflicts(db, program):
    enroll(db, program)
    assert confirm(db, program, a_receipt("A-1"))[0] == 201
    status, again = confirm(db, program, a_receipt("A-1"))
    assert status == 200 and to_dict(again)["replayed"] is True and to_dict(again)["accrued"]["points"] == 4
    with pytest.raises(ApiError) as refused:
        confirm(db, program, a_receipt("A-1", redeem=10))
    assert (refused.value.status, refused.value.code) == (409, "idempotency_conflict")
    assert rows(db, "SELECT COUNT(*) FROM postings WHERE receipt_id = 'A-1'") == [(1,)]     # one lot's accrual


def test_the_same_receipt_sent_to_two_processes_at_once_is_written_once(db, program):
    enroll(db, program)
    (status, _), second = holding_the_member(db, program, a_receipt("A-1"),
                                             lambda: confirm(db, program, a_receipt("A-1")))
    assert status == 201
    assert "error" not in second, second
    status2, answer2 = second["result"]
    assert status2 == 200 and to_dict(answer2)["replayed"] is True
    assert rows(db, "SELECT COUNT(*) FROM receipts") == [(1,)]
    assert rows(db, "SELECT COUNT(*) FROM postings WHERE receipt_id = 'A-1'") == [(1,)]     # one lot's accrual


def test_two_receipts_of_one_member_at_once_cannot_spend_the_same_points(db, program):
    """The second waits at the member's lock until the first commits, then plans against its
    postings: it pays with what is left (a request above the balance pays with the
    balance), never the same points."""
    member_id = enroll(db, program)
    (status, first), second = holding_the_member(db, program, a_receipt("A-1", redeem=REDEEM),
                                                 lambda: confirm(db, program, a_receipt("A-2", redeem=REDEEM)))
    assert status == 201 and to_dict(first)["redeemed"]["points"] == REDEEM
    assert "error" not in second, second
    status2, answer2 = second["result"]
    assert status2 == 201
    assert to_dict(answer2)["redeemed"]["points"] == 100 - REDEEM
    assert to_dict(answer2)["balance"]["available"] == 0
    assert rows(db, "SELECT SUM(points) FROM postings WHERE member_id = ? AND kind = 'redemption'",
                (member_id,)) == [(-100,)]
    assert rows(db, "SELECT COUNT(*) FROM lots WHERE member_id = ? AND remaining < 0", (member_id,)) == [(0,)]


def test_a_hold_put_through_one_connection_is_seen_through_another(db, program):
    enroll(db, program)
    conn = connect(db)
    try:
        held = conn.transaction(lambda c: _calculate_in_tx(c, program, a_receipt("A-1", redeem=REDEEM), NOW, CARD,
                                                           [], None))
    finally:
        conn.close()
    assert to_dict(held)["balance"]["held"] == REDEEM
    status, other = confirm(db, program, a_receipt("A-2", redeem=REDEEM))
    assert status == 201 and to_dict(other)["redeemed"]["points"] == 100 - REDEEM     # the held points stay
    status, answer = confirm(db, program, a_receipt("A-1", redeem=REDEEM))     # the hold's own receipt
    assert status == 201 and to_dict(answer)["redeemed"]["points"] == REDEEM
    assert rows(db, "SELECT status FROM holds") == [("consumed",)]


def test_postings_are_append_only_and_an_edited_one_breaks_its_members_chain(db, program):
    member_id = enroll(db, program)
    other = enroll(db, program, card="hmac-of-7000000000002")
    confirm(db, program, a_receipt("A-1"))
    conn = connect(db)
    try:
        with pytest.raises(Exception, match="append-only"):
            conn.execute("UPDATE postings SET points = 50 WHERE member_id = ? AND chain_seq = 2", (member_id,))
        # By hand, as the database's owner could: past the trigger.
        conn.execute("ALTER TABLE postings DISABLE TRIGGER postings_append_only")
        conn.execute("UPDATE postings SET points = 50 WHERE member_id = ? AND chain_seq = 2", (member_id,))
        conn.execute("ALTER TABLE postings ENABLE TRIGGER postings_append_only")
        problems = pg_ledger.verify_chains(conn)
    finally:
        conn.close()
    assert problems == [f"member m_{member_id}: posting 2 of its chain does not match its contents "
                        "or the posting before it"]
    assert not any(f"m_{other}:" in p for p in problems)
