"""RFM scores on a hand-made population with ties, through the job that writes them."""
from __future__ import annotations

import asyncio
from datetime import date, datetime, timezone
from zoneinfo import ZoneInfo

import pytest

from conftest import add_members, storage_database
from server import rfm
from storage import segments
from storage.db import Database

KYIV = ZoneInfo("Europe/Kyiv")
# 23:30 UTC on 2026-11-30 is already 2026-12-01 in Kyiv: recency counts local days.
NOW = datetime(2026, 11, 30, 23, 30, tzinfo=timezone.utc)
TODAY = date(2026, 12, 1)


@pytest.fixture
def db(tmp_path):
    database = storage_database(tmp_path / "rfm.db")
    database.open()
    yield database
    database.close()


def add_receipt(db: Database, key: str, member_id: int, local_date: str, total: int,
                status: str = "confirmed", returned: int = 0) -> None:
    def write(conn):
        conn.execute(
            "INSERT INTO receipts (store_id, register_id, receipt_id, body_sha256, member_id, ts, local_date, total, "
            "rules_version, status, body, result, created_at) VALUES ('S001', 'K01', ?, ?, ?, ?, ?, ?, 'v', ?, "
            "?, ?, ?)", (key, b"\0", member_id, f"{local_date}T10:00:00.000000Z", local_date, total, status,
                         b"{}", b"{}", f"{local_date}T10:00:00.000000Z"))
        if returned:
            conn.execute(
                "INSERT INTO return_lines (receipt_store, receipt_register, receipt_id, line_no, return_store, "
                "return_register, return_id, qty, amount, points_reversed, points_refunded, discount_refunded, "
                "by_rule, created_at) VALUES ('S001', 'K01', ?, 1, 'S001', 'K01', ?, '1', ?, 0, 0, 0, ?, ?)",
                (key, "R" + key, returned, b"[]", f"{local_date}T11:00:00.000000Z"))
    db.write_sync(write)


def scores(db: Database) -> dict[int, tuple]:
    def read(conn):
        return {mid: (s.r, s.f, s.m, s.recency_days, s.receipts, s.spend)
                for mid in range(1, 20) if (s := segments.scores_of(conn, mid))}
    return db.read_sync(read)


def population(db: Database) -> None:
    """Five scored members, two ties (members 1 and 2 alike; members 3 and 4 bought last on
    the same day) and members the window leaves out."""
    add_members(db, 8)
    add_receipt(db, "1a", 1, "2026-12-01", 10000)
    add_receipt(db, "1b", 1, "2026-11-20", 10000)
    add_receipt(db, "2a", 2, "2026-12-01", 10000)
    add_receipt(db, "2b", 2, "2026-11-20", 10000)
    add_receipt(db, "3a", 3, "2026-11-01", 50000, returned=45000)   # net 5,000: the least spend
    add_receipt(db, "4a", 4, "2026-11-01", 30000)
    add_receipt(db, "4b", 4, "2026-10-01", 30000)
    add_receipt(db, "4c", 4, "2026-09-01", 30000)
    add_receipt(db, "5a", 5, "2025-12-02", 7000)                    # the first day of a 365-day window
    add_receipt(db, "6a", 6, "2025-12-01", 99999)                   # one day before the window
    add_receipt(db, "7a", 7, "2026-11-25", 99999, status="cancelled")
    # member 8 never bought


def test_scores_follow_the_formula_with_ties(db):
    population(db)
    done = asyncio.run(rfm.run(db, 365, KYIV, NOW))
    assert done is not None and done.scored == 5
    got = scores(db)
    # n = 5. Recency days: 0, 0, 30, 30, 364 -> strictly worse: 3, 3, 1, 1, 0.
    # Frequency: 2, 2, 1, 3, 1 -> strictly worse: 2, 2, 0, 4, 0.
    # Monetary (net): 20000, 20000, 5000, 90000, 7000 -> strictly worse: 2, 2, 0, 4, 1.
    assert got == {
        1: (1 + 15 // 5, 1 + 10 // 5, 1 + 10 // 5, 0, 2, 20000),
        2: (4, 3, 3, 0, 2, 20000),
        3: (2, 1, 1, 30, 1, 5000),
        4: (2, 5, 5, 30, 3, 90000),
        5: (1, 1, 2, 364, 1, 7000),
    }
    # Outside the window, cancelled or never bought: no scores at all.
    assert not {6, 7, 8} & got.keys()


def test_runs_once_a_local_day_and_a_new_run_replaces_the_old(db):
    population(db)
    first = asyncio.run(rfm.run(db, 365, KYIV, NOW))
    assert asyncio.run(rfm.run(db, 365, KYIV, NOW)) is None        # the same local day: done already
    add_receipt(db, "8a", 8, "2026-12-02", 500000)
    second = asyncio.run(rfm.run(db, 365, KYIV, datetime(2026, 12, 2, 12, tzinfo=timezone.utc)))
    # A day later member 5's only receipt has left the window and member 8 came in.
    assert second.run_id > first.run_id and second.scored == 5
    got = scores(db)
    assert 5 not in got and got[8] == (5, 1, 5, 0, 1, 500000)
    # The first run's rows are gone; only the newest finished run is kept.
    left = db.read_sync(lambda conn: [tuple(r) for r in conn.execute("SELECT DISTINCT run_id FROM rfm_scores")])
    assert left == [(second.run_id,)]


def test_an_unfinished_run_is_never_read(db):
    population(db)
    first = asyncio.run(rfm.run(db, 365, KYIV, NOW))
    # A run that stopped half-way (the process was killed) wrote rows but never finished.
    run_id = db.write_sync(lambda conn: segments.start_run(conn, TODAY, 365, NOW))
    db.write_sync(lambda conn: segments.write_scores(conn, run_id, [segments.Score(1, 1, 1, 1, 9, 9, 9)]))
    got = scores(db)
    assert got[1][:3] == (4, 3, 3) and first.scored == 5


SHOP = """\
program: {id: shop, name: Shop, currency: UAH, timezone: Europe/Kyiv}
points: {value: 100, rounding: floor, activation_delay_days: 0, expiry_days: 365}
tiers: {levels: [{id: base, from: 0}]}
stores: [{id: S001}]
segments:
  rfm: {window_days: 365}
  define:
    - {id: champions, rfm: {f: [4, 5], m: [4, 5]}}
    - {id: recent, rfm: {r: [4, 5]}}
    - {id: staff, list: true}
rules:
  - {id: base, reward: {percent: 2}}
"""


@pytest.fixture
def shop():
    from rules import load_files
    program = load_files({"program.yaml": SHOP}, TODAY)
    yield program
    program.close()


def test_segments_by_rfm_range_and_by_list(db, shop):
    from server.member_state import segments_now
    population(db)
    done = asyncio.run(rfm.run(db, 365, KYIV, NOW, program=shop))
    assert (done.opened, done.closed) == (3, 0)
    db.write_sync(lambda conn: segments.add_members(conn, "staff", [3, 8], NOW))
    got = db.read_sync(lambda conn: {mid: sorted(segments_now(conn, shop, mid)) for mid in (1, 3, 4, 8)})
    assert got == {1: ["recent"], 3: ["staff"], 4: ["champions"], 8: ["staff"]}
    recent = segments.SegmentDefinition("recent", r=segments.ScoreRange(4, 5))
    assert db.read_sync(lambda conn: segments.members_of(conn, recent)) == [1, 2]


def test_recency_counts_local_days_across_midnight_and_a_clock_change(db):
    add_members(db, 2)

    def at(key, member_id, ts):
        db.write_sync(lambda conn: conn.execute(
            "INSERT INTO receipts (store_id, register_id, receipt_id, body_sha256, member_id, ts, local_date, total, "
            "rules_version, status, body, result, created_at) VALUES ('S001', 'K01', ?, ?, ?, ?, '', 100, 'v', "
            "'confirmed', ?, ?, ?)", (key, b"\0", member_id, ts, b"{}", b"{}", ts)))
    # 22:30 UTC on 30 November is 00:30 on 1 December in Kyiv (UTC+2): bought today.
    at("a", 1, "2026-11-30T22:30:00.000000Z")
    # 21:30 UTC on 31 July is 00:30 on 1 August in Kyiv (summer time, UTC+3): 122 days before.
    at("b", 2, "2026-07-31T21:30:00.000000Z")
    asyncio.run(rfm.run(db, 365, KYIV, NOW))
    got = scores(db)
    assert got[1][3] == 0 and got[2][3] == (TODAY - date(2026, 8, 1)).days == 122


def test_the_lifecycle_jobs_score_once_a_local_day_when_the_program_has_rfm(db, shop):
    from conftest import MARKET
    from rules import load_program
    from server.jobs import run_all
    population(db)
    market = load_program(MARKET)
    try:
        assert "rfm_members_scored" not in asyncio.run(run_all(db, market, NOW))    # no segments: no scores
    finally:
        market.close()
    assert asyncio.run(run_all(db, shop, NOW))["rfm_members_scored"] == 5
    assert asyncio.run(run_all(db, shop, NOW))["rfm_members_scored"] == 0       # done today already
    assert scores(db)[4][:3] == (2, 5, 5)
