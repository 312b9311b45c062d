"""Coupon codes: their look, the status of each code on a receipt, and one use per use left
even when receipts race for it."""
from __future__ import annotations

import asyncio
import sqlite3
import threading
from datetime import date, datetime, timezone

import pytest

from conftest import POSTGRESQL, connect, storage_database
from server.privacy import Privacy
from storage import coupons
from storage.ledger import iso
from storage.sql import integrity_errors

NOW = datetime(2026, 12, 21, 10, tzinfo=timezone.utc)
PRIVACY = Privacy(b"tests-coupon-key-0123456789")
XMAS = coupons.Campaign("xmas", uses_per_code=1, valid_from=date(2026, 12, 20), valid_to=date(2026, 12, 31))
TWICE = coupons.Campaign("twice", uses_per_code=2)
CAMPAIGNS = {"xmas": XMAS, "twice": TWICE}


@pytest.fixture
def db(tmp_path):
    database = storage_database(tmp_path / "coupons.db")
    database.open()
    yield database
    database.close()


def add(db, campaign: str, count: int, card: str | None = None) -> list[str]:
    codes = [coupons.new_code() for _ in range(count)]
    card_hmac = PRIVACY.card(card) if card else None
    assert db.write_sync(lambda conn: coupons.add_codes(conn, campaign, codes, card_hmac, PRIVACY.coupon, NOW)) == []
    return codes


def use(conn, code_hmac: str, receipt: tuple[str, str, str], uses_per_code: int) -> bool:
    """As a receipt on PostgreSQL, or confirmed before m038, used it: with a row of its own."""
    return coupons.use_codes(conn, [coupons.CodeUse(receipt, code_hmac, uses_per_code, iso(NOW))], True)


def judge(db, codes, card=None, day=date(2026, 12, 21)):
    card_hmac = PRIVACY.card(card) if card else None
    return db.read_sync(lambda conn: coupons.judge(conn, codes, card_hmac, day, CAMPAIGNS, PRIVACY.coupon))


def test_codes_are_random_without_look_alikes():
    codes = {coupons.new_code() for _ in range(20_000)}
    assert len(codes) == 20_000
    for code in list(codes)[:200]:
        assert len(code) == 14 and code[4] == code[9] == "-"
        assert not set(code.replace("-", "")) & set("01IO")


def test_each_code_gets_its_status(db):
    xmas = add(db, "xmas", 3)
    bound = add(db, "xmas", 1, card="7001")[0]
    got = judge(db, [xmas[0].lower().replace("-", " "), "NOPE-NOPE-NOPE", xmas[1], bound], card="7002")
    assert [s for _, s in got.statuses] == [coupons.USABLE, "unknown", "not_needed", "other_card"]
    assert got.usable == {"xmas": (xmas[0].lower().replace("-", " "), PRIVACY.coupon(coupons.normalize(xmas[0])))}
    assert judge(db, [bound], card="7001").statuses == [(bound, coupons.USABLE)]
    assert judge(db, [xmas[2]], day=date(2026, 12, 19)).statuses == [(xmas[2], "not_yet_valid")]
    assert judge(db, [xmas[2]], day=date(2027, 1, 1)).statuses == [(xmas[2], "expired")]


def test_used_up_and_given_back(db):
    code = add(db, "twice", 1)[0]
    h = PRIVACY.coupon(coupons.normalize(code))
    first, second, third = ("S001", "K01", "1"), ("S001", "K01", "2"), ("S001", "K01", "3")
    assert db.write_sync(lambda conn: use(conn, h, first, 2))
    with pytest.raises(integrity_errors()):     # the same receipt: once, and the write is undone
        db.write_sync(lambda conn: use(conn, h, first, 2))
    assert judge(db, [code]).statuses == [(code, coupons.USABLE)]
    assert db.write_sync(lambda conn: use(conn, h, second, 2))
    assert judge(db, [code]).statuses == [(code, "used")]
    assert not db.write_sync(lambda conn: use(conn, h, third, 2))
    assert db.write_sync(lambda conn: coupons.give_back(conn, first, [], lambda code: (code,))) == 1
    assert db.write_sync(lambda conn: coupons.give_back(conn, first, [], lambda code: (code,))) == 0
    assert judge(db, [code]).statuses == [(code, coupons.USABLE)]
    assert db.write_sync(lambda conn: use(conn, h, third, 2))


def test_a_use_kept_in_the_receipts_row_goes_back_to_the_code_where_its_row_moved(db):
    """The receipt's row keeps the hash the code was used under (storage/receipt_takes.py);
    `privacy rotate-key` may since have moved the code's row to a later form of it."""
    code = add(db, "twice", 1)[0]
    used_under, moved_to = PRIVACY.coupon(coupons.normalize(code)), "~k2~wrapped"
    key = ("S001", "K01", "1")

    def use_then_rotate(conn):
        assert coupons.use_codes(conn, [coupons.CodeUse(key, used_under, 2, iso(NOW))], False)
        assert coupons.rewrap_codes(conn, [(used_under, moved_to)]) == 1
    db.write_sync(use_then_rotate)
    assert db.write_sync(lambda conn: coupons.give_back(conn, key, [used_under],
                                                        lambda h: (h, moved_to))) == 1
    assert db.read_sync(lambda conn: [tuple(r) for r in conn.execute("SELECT code, uses FROM coupon_codes")]) == [
        (moved_to, 0)]


def test_twenty_receipts_racing_for_a_single_use_code_one_wins(db, tmp_path):
    """Each racer is a connection of its own, as another server or a command on the same
    database would be: SQLite's write lock is what keeps the use single, on PostgreSQL the
    row lock of the code's UPDATE."""
    code = add(db, "xmas", 1)[0]
    h = PRIVACY.coupon(coupons.normalize(code))
    start, results = threading.Barrier(20), [None] * 20

    def racer(i: int) -> None:
        if POSTGRESQL:
            conn = connect(tmp_path / "coupons.db")
            try:
                start.wait(timeout=30)
                results[i] = conn.transaction(lambda c: use(c, h, ("S001", "K01", f"r{i}"), 1))
            finally:
                conn.close()
            return
        conn = sqlite3.connect(db.path, isolation_level=None, timeout=30)
        try:
            start.wait(timeout=30)
            conn.execute("BEGIN IMMEDIATE")
            results[i] = use(conn, h, ("S001", "K01", f"r{i}"), 1)
            conn.execute("COMMIT")
        finally:
            conn.close()

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results.count(True) == 1 and results.count(False) == 19
    uses = db.read_sync(lambda conn: conn.execute("SELECT uses FROM coupon_codes WHERE code = ?", (h,)).fetchone()[0])
    assert uses == 1


def test_twenty_concurrent_writes_of_the_server_one_wins(db):
    """The same race through the server's single writer (group commit batches them)."""
    code = add(db, "xmas", 1)[0]
    h = PRIVACY.coupon(coupons.normalize(code))

    async def race():
        return await asyncio.gather(*(db.write(lambda conn, i=i: use(conn, h, ("S001", "K01", f"w{i}"), 1))
                                      for i in range(20)))
    assert sorted(asyncio.run(race())) == [False] * 19 + [True]
