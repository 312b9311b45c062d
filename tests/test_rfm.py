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


# ------------------------------------------------------------------ one customer, two memberships

CUSTOMERS = """\
program: {id: shop, name: Shop, currency: UAH, timezone: Europe/Kyiv}
points: {value: 100, rounding: floor, activation_delay_days: 0, expiry_days: 365}
tiers: {metric: spend, window_days: 365, levels: [{id: base, from: 0}, {id: gold, from: 25000}]}
stores: [{id: S001}]
segments:
  rfm: {window_days: 365}
  define:
    - {id: champions, rfm: {f: [4, 5], m: [4, 5]}}
    - {id: recent, rfm: {r: [4, 5]}}
    - {id: gold, when: {tier: gold}}
    - {id: regulars, when: {receipts_in_window: {gte: 3}}}
    - {id: everyone, when: {enrolled_days: {gte: 0}}}
    - {id: lapsed, when: {days_since_last_purchase: {between: [400, 700]}}}
rules:
  - {id: base, reward: {percent: 2}}
"""
NEXT_DAY = datetime(2026, 12, 1, 23, 30, tzinfo=timezone.utc)       # 2026-12-02 in Kyiv


@pytest.fixture
def customers_program():
    from rules import load_files
    program = load_files({"program.yaml": CUSTOMERS}, TODAY)
    yield program
    program.close()


def enrolled(db: Database, last: int, first: int = 1) -> None:
    """Members first to last, enrolled on 1 January 2025."""
    db.write_sync(lambda conn: conn.executemany(
        "INSERT INTO members (id, tags, enrolled_at, updated_at) VALUES (?, '[]', '2025-01-01T10:00:00.000000Z', "
        "'2025-01-01')", [(i,) for i in range(first, last + 1)]))


def two_cards(db: Database) -> None:
    """Members 1 to 4 buy as in any shop; member 6 is the same customer as member 5, who
    buys more with 6's card: on their own, 6 is a champion and 5 is not."""
    enrolled(db, 6)
    for mid in (1, 2, 3, 5):
        add_receipt(db, f"{mid}a", mid, "2026-11-20", 10000)
    add_receipt(db, "4a", 4, "2026-11-20", 10000)
    add_receipt(db, "4b", 4, "2026-11-10", 10000)
    add_receipt(db, "6a", 6, "2026-11-25", 15000)
    add_receipt(db, "6b", 6, "2026-11-15", 15000)


def merged(db: Database, source: int, target: int) -> None:
    """What a merge leaves for the job: the member merged away names the member it went to;
    its receipts stay its own."""
    from storage import member_care
    db.write_sync(lambda conn: member_care.mark_merged(conn, source, target, "2026-12-01T09:00:00.000000Z"))


def members(db: Database) -> dict[str, list[int]]:
    return db.read_sync(lambda conn: {sid: segments.members_of(conn, segments.SegmentDefinition(sid))
                                      for sid in ("champions", "recent", "gold", "regulars", "everyone", "lapsed")})


def test_a_member_merged_away_is_scored_as_the_member_it_went_to(db, customers_program):
    from storage.member_care import points_holders
    two_cards(db)
    asyncio.run(rfm.run(db, 365, KYIV, NOW, program=customers_program))
    # n = 6: member 6 spent most (30,000) and bought last; 4 bought twice, spending 20,000.
    assert members(db) == {"champions": [4, 6], "recent": [6], "gold": [6], "regulars": [],
                           "everyone": [1, 2, 3, 4, 5, 6], "lapsed": []}
    merged(db, 6, 5)
    champions = segments.SegmentDefinition("champions")
    # Until the next run an offer to the segment reaches the customer through the member that stays.
    assert db.read_sync(lambda conn: points_holders(conn, segments.members_of(conn, champions))) == [4, 5]

    done = asyncio.run(rfm.run(db, 365, KYIV, NEXT_DAY, program=customers_program))
    # n = 5 customers: 5 with 6's receipts has 3 receipts, 40,000, last on 25 November (7 days).
    assert done.scored == 5
    got = scores(db)
    assert got[5] == (5, 5, 5, 7, 3, 40000) and 6 not in got
    assert got[4] == (1, 4, 4, 12, 2, 20000)
    # Member 6 left every segment, member 5 took its place: each segment counts the customer
    # once. Tiers stay each member's own, as at the till: 5's own spend (10,000) is not gold.
    assert members(db) == {"champions": [4, 5], "recent": [5], "gold": [], "regulars": [5],
                           "everyone": [1, 2, 3, 4, 5], "lapsed": []}
    assert (done.opened, done.closed) == (3, 4)
    assert db.read_sync(lambda conn: points_holders(conn, segments.members_of(conn, champions))) == [4, 5]


def test_a_chain_of_merges_is_scored_as_the_member_at_its_end(db, customers_program):
    two_cards(db)
    enrolled(db, 7, first=7)
    add_receipt(db, "7a", 7, "2026-11-28", 5000)
    merged(db, 6, 5)
    merged(db, 5, 7)            # 6 -> 5 -> 7: all three are one customer, member 7
    done = asyncio.run(rfm.run(db, 365, KYIV, NOW, program=customers_program))
    assert done.scored == 5
    got = scores(db)
    assert got[7] == (5, 5, 5, 3, 4, 45000) and not {5, 6} & got.keys()
    assert members(db) == {"champions": [4, 7], "recent": [7], "gold": [], "regulars": [7],
                           "everyone": [1, 2, 3, 4, 7], "lapsed": []}


def test_when_segments_read_the_customers_purchases_and_leave_out_the_member_merged_away(db, customers_program):
    enrolled(db, 4)
    add_receipt(db, "1a", 1, "2026-11-20", 10000)
    add_receipt(db, "2a", 2, "2026-11-21", 10000)
    add_receipt(db, "2b", 2, "2026-11-22", 10000)
    add_receipt(db, "3a", 3, "2025-06-01", 5000)       # before the window: 548 days before 1 December
    # member 4 never bought
    asyncio.run(rfm.run(db, 365, KYIV, NOW, program=customers_program))
    assert members(db) == {"champions": [], "recent": [], "gold": [], "regulars": [],
                           "everyone": [1, 2, 3, 4], "lapsed": [3]}
    merged(db, 2, 1)
    merged(db, 3, 4)
    asyncio.run(rfm.run(db, 365, KYIV, NEXT_DAY, program=customers_program))
    # 1 has 3 receipts with 2's; 4 last bought with 3's card, 549 days ago.
    assert members(db) == {"champions": [], "recent": [], "gold": [], "regulars": [1],
                           "everyone": [1, 4], "lapsed": [4]}


def test_an_erased_member_is_in_no_computed_segment_and_its_receipts_still_count(db, customers_program):
    two_cards(db)
    asyncio.run(rfm.run(db, 365, KYIV, NOW, program=customers_program))
    assert members(db)["gold"] == [6]
    db.write_sync(lambda conn: conn.execute(
        "UPDATE members SET erased_at = '2026-12-01T09:00:00.000000Z' WHERE id = 6"))
    done = asyncio.run(rfm.run(db, 365, KYIV, NEXT_DAY, program=customers_program))
    # Its receipts stay (as the ledger does), so everyone else is scored as before it was erased.
    assert done.scored == 6 and scores(db)[4][:3] == (1, 4, 4)
    assert members(db) == {"champions": [4], "recent": [], "gold": [], "regulars": [],
                           "everyone": [1, 2, 3, 4, 5], "lapsed": []}


def test_scores_by_customer_follow_the_formula_on_a_history_with_many_merges(db):
    """Many customers with two or three memberships, ties of spend among them and between
    their sums and others' spend: each customer's scores are the formula's over their
    receipts together."""
    import random
    from datetime import timedelta
    rnd = random.Random(5)
    enrolled(db, 60)
    receipts: dict[int, list[tuple[date, int]]] = {}
    for key in range(240):
        mid, day = rnd.randint(1, 60), TODAY - timedelta(days=rnd.randint(0, 400))
        total, returned = rnd.choice([1000, 2000, 3000, 5000]), rnd.choice([0, 0, 0, 1000])
        status = rnd.choice(["confirmed"] * 5 + ["cancelled"])
        add_receipt(db, f"r{key}", mid, day.isoformat(), total, status=status, returned=returned)
        if status == "confirmed" and (TODAY - day).days < 365:
            receipts.setdefault(mid, []).append((day, total - returned))
    into = {mid: rnd.randint(mid + 1, 60) for mid in range(1, 60) if rnd.random() < 0.3}
    for source, target in into.items():
        merged(db, source, target)

    def heir(mid: int) -> int:
        while mid in into:
            mid = into[mid]
        return mid
    by_customer: dict[int, list[tuple[date, int]]] = {}
    for mid, bought in receipts.items():
        by_customer.setdefault(heir(mid), []).extend(bought)
    n = len(by_customer)
    facts = {c: ((TODAY - max(d for d, _ in b)).days, len(b), sum(s for _, s in b)) for c, b in by_customer.items()}

    def score(value, values, lower_is_better=False):
        return 1 + 5 * sum(1 for v in values if (v > value if lower_is_better else v < value)) // n
    want = {c: (score(days, [x[0] for x in facts.values()], lower_is_better=True),
                score(count, [x[1] for x in facts.values()]), score(spend, [x[2] for x in facts.values()]),
                days, count, spend) for c, (days, count, spend) in facts.items()}
    assert len(into) > 10 and n < len(receipts)
    done = asyncio.run(rfm.run(db, 365, KYIV, NOW))
    got = db.read_sync(lambda conn: {mid: tuple(s[1:]) for mid in range(1, 61) if (s := segments.scores_of(conn, mid))})
    assert done.scored == n and got == want
