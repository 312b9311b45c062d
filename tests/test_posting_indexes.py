"""A receipt's postings go into fewer indexes. m035: postings_lot is gone, as each index a
posting goes into is one more B-tree page a commit writes to the WAL. What was read through
it is answered otherwise: the expiry job takes a lot's points left from lots.remaining, a
return what expiry took from a lot from the partial index of expiry postings, audit verify
sums the postings by lot in one pass. m037: postings_receipt is gone too; a cancel and a
return find a receipt's postings among its member's (postings_member), audit verify sums
them by receipt in one pass. A database from before upgrades and answers the same."""
import sqlite3
from datetime import datetime

import msgspec
import pytest

from conftest import connect, line, receipt
from server.jobs import run_all
from server.keys import CLOCK, DATABASE, PROGRAMS
from storage import ledger
from storage.audit import verify

SQLITE_ONLY = pytest.mark.sqlite_only(reason="SQLite's indexes of postings and their upgrade; PostgreSQL keeps "
                                      "postings_lot and postings_receipt (storage/pg/schema.py INTENDED_DIFFERENCES)")

NOW = "2026-11-24T12:00:05+02:00"
RECEIPT = {"store_id": "S001", "register_id": "K01", "receipt_id": "E-1"}


def to_before_m035(path) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript("""
        BEGIN;
        DROP INDEX postings_lot_expiry;
        CREATE INDEX postings_lot ON postings(lot_id);
        DELETE FROM _sqlite_migrations WHERE name = 'm035_postings_lot_expiry';
        COMMIT;
    """)
    conn.close()


def posting_indexes(path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {name for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'postings' AND sql IS NOT NULL")}
    finally:
        conn.close()


def audited(path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return verify(conn).problems
    finally:
        conn.close()


@SQLITE_ONLY
async def test_an_older_database_upgrades_then_expires_and_refunds_by_what_lots_keep(make_api, tmp_path):
    db = tmp_path / "loyalty.db"
    api = await make_api(now=NOW)
    await api.post("/v1/members", {"card": "1"})          # 100 welcome points, expire 2027-11-24
    status, bought = await api.post("/v1/receipts", receipt("E-1", [line(1, "grocery", 100000)], card="1",
                                                            redeem=60), as_="register")
    assert status == 201 and bought["redeemed"]["points"] == 60
    await api.client.close()
    to_before_m035(db)
    assert "postings_lot" in posting_indexes(db)

    api = await make_api(now=NOW)               # m035 runs at start
    assert posting_indexes(db) == {"postings_member", "postings_counter", "postings_lot_expiry"}
    app = api.client.app
    app[CLOCK].set(datetime.fromisoformat("2027-11-25T10:00:00+02:00"))
    done = await run_all(app[DATABASE], app[PROGRAMS].current, app[CLOCK].now())
    assert done["expired_lots"] >= 1
    _, statement = await api.get("/v1/members/1/statement")
    expired = [p["points"] for p in statement["postings"] if p["kind"] == "expiry"]
    assert -40 in expired                                   # what the welcome lot had left, not its 100
    _, before = await api.get("/v1/members/1")

    # The 60 points paid with go back to the welcome lot, which expired meanwhile: they are
    # expired at once, and the balance does not move.
    status, returned = await api.post("/v1/returns", {"return_id": "late", **{k: v for k, v in RECEIPT.items()
                                                                              if k != "receipt_id"},
                                                      "receipt": RECEIPT, "lines": [{"line_no": 1, "qty": 1}]},
                                      as_="register")
    assert status == 201 and returned["refunded"]["points"] == 60
    _, after = await api.get("/v1/members/1")
    assert after["balance"]["available"] == before["balance"]["available"]
    await api.client.close()
    assert audited(db) == []


@SQLITE_ONLY
def test_a_returns_expiry_facts_come_from_expiry_postings_alone(tmp_path):
    """lot_facts reads the partial index, which no receipt writes, and sums expiry only."""
    from storage.schema import migrations
    import sqlite_utils
    conn = sqlite_utils.Database(sqlite3.connect(tmp_path / "plan.db")).conn
    migrations.apply(sqlite_utils.Database(conn))
    plan = [row[3] for row in conn.execute(
        "EXPLAIN QUERY PLAN SELECT l.id, l.expires_on, -COALESCE((SELECT SUM(points) FROM postings p "
        "WHERE p.lot_id = l.id AND p.kind = 'expiry'), 0) FROM lots l WHERE l.id IN (?)", (1,))]
    assert any("postings_lot_expiry" in step for step in plan), plan
    assert ledger.lot_facts(conn, [1]) == {}
    conn.close()


@SQLITE_ONLY
async def test_audit_verify_names_a_lot_whose_kept_points_disagree_with_its_postings(make_api, tmp_path):
    db = tmp_path / "loyalty.db"
    api = await make_api(now=NOW)
    await api.post("/v1/members", {"card": "1"})
    await api.client.close()
    assert audited(db) == []
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("UPDATE lots SET remaining = remaining + 1")
    conn.close()
    problems = audited(db)
    assert len(problems) == 1 and "says 101 points remain, its postings sum to 100" in problems[0], problems


# m037's scenario: one gold member's three receipts, two of them with the same receipt id
# from two registers, so that only the receipt's whole identity tells their postings apart.
RETURNS_NOW = "2026-11-28T09:00:05+02:00"
CARD = "7000000000002"
FIRST, SAME_ID, OTHER = ("S001", "K01", "B-1"), ("S001", "K02", "B-1"), ("S001", "K01", "B-2")


def to_before_m037(path) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript("""
        BEGIN;
        CREATE INDEX postings_receipt ON postings(store_id, register_id, receipt_id) WHERE receipt_id IS NOT NULL;
        DELETE FROM _sqlite_migrations WHERE name = 'm037_postings_receipt';
        COMMIT;
    """)
    conn.close()


def basket(key, redeem=0) -> dict:
    return receipt(key[2], [line(1, "alcohol", 30000, sku="wine-1"), line(2, "dairy", 20000, sku="cheese-1"),
                            line(3, "grocery", 50000, sku="coffee-1")],
                   card=CARD, ts="2026-11-28T09:00:00+02:00", store=key[0], register=key[1], redeem=redeem)


async def three_receipts(api) -> dict:
    """The gold member with 5,000 points (100 welcome, 4,900 adjusted) and their three
    receipts' answers, by key."""
    assert (await api.post("/v1/members", {"card": CARD}))[0] == 201
    assert (await api.put(f"/v1/admin/members/{CARD}/tier", {"tier": "gold", "until": "2027-12-31"}))[0] == 200
    assert (await api.post("/v1/admin/adjustments", {"card": CARD, "points": 4900, "reason": "migration",
                                                     "adjustment_id": "adj-1"}))[0] == 201
    answers = {}
    for key, redeem in ((FIRST, 1000), (SAME_ID, 500), (OTHER, 0)):
        status, answers[key] = await api.post("/v1/receipts", basket(key, redeem), as_="register")
        assert status == 201, answers[key]
    return answers


def by_kind(path, key) -> dict[str, int]:
    """What the ledger holds for one receipt, summed by kind."""
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT kind, SUM(points) FROM postings WHERE store_id = ? AND register_id = ? "
                                 "AND receipt_id = ? GROUP BY kind", key))
    finally:
        conn.close()


def line_points(answer: dict, part: str, line_no: int) -> int:
    return sum(x["points"] for x in answer[part]["by_line"] if x["line_no"] == line_no)


@SQLITE_ONLY
async def test_an_older_database_upgrades_then_cancels_and_returns_what_each_receipt_posted(make_api, tmp_path):
    db = tmp_path / "loyalty.db"
    api = await make_api(now=RETURNS_NOW)
    answers = await three_receipts(api)
    assert answers[FIRST]["accrued"]["points"] == 87 and answers[FIRST]["redeemed"]["points"] == 350
    await api.client.close()
    to_before_m037(db)
    assert "postings_receipt" in posting_indexes(db)
    before = {key: by_kind(db, key) for key in answers}

    api = await make_api(now=RETURNS_NOW)       # m037 runs at start
    assert posting_indexes(db) == {"postings_member", "postings_counter", "postings_lot_expiry"}
    status, cancelled = await api.post("/v1/receipts/S001/K01/B-1/cancel", as_="register")
    assert status == 200 and cancelled["status"] == "cancelled"
    assert cancelled["reversed"]["points"] == 87 and cancelled["refunded"]["points"] == 350
    status, returned = await api.post("/v1/returns", {
        "return_id": "RET-1", "store_id": "S001", "register_id": "K02",
        "receipt": dict(zip(("store_id", "register_id", "receipt_id"), SAME_ID)),
        "lines": [{"line_no": 3, "qty": 1}]}, as_="register")
    assert status == 201, returned
    same_id = answers[SAME_ID]
    assert returned["reversed"]["points"] == line_points(same_id, "accrued", 3) > 0
    assert returned["refunded"]["points"] == line_points(same_id, "redeemed", 3) > 0
    _, member = await api.get(f"/v1/members/{CARD}")
    await api.client.close()

    # The ledger afterwards: the cancelled receipt nets to zero, the returned one lost its
    # line 3 alone, and the member's third receipt is as it was.
    assert by_kind(db, FIRST) == {**before[FIRST], "reversal": -87, "refund": 350}
    assert by_kind(db, SAME_ID) == {**before[SAME_ID], "reversal": -returned["reversed"]["points"],
                                    "refund": returned["refunded"]["points"]}
    assert by_kind(db, OTHER) == before[OTHER]
    earned = sum(a["accrued"]["points"] for a in answers.values()) - 87 - returned["reversed"]["points"]
    spent = sum(a["redeemed"]["points"] for a in answers.values()) - 350 - returned["refunded"]["points"]
    assert member["balance"]["available"] + member["balance"]["pending"] == 100 + 4900 + earned - spent
    assert audited(db) == []


@SQLITE_ONLY
async def test_a_cancel_and_a_return_find_a_receipts_postings_among_its_members(make_api, tmp_path):
    """No index finds postings by receipt: each statement that reads a receipt's postings
    searches postings_member, none scans postings."""
    db = tmp_path / "loyalty.db"
    api = await make_api(now=RETURNS_NOW)
    await three_receipts(api)
    database, statements = api.client.app[DATABASE], []
    await database.write(lambda conn: conn.set_trace_callback(statements.append))
    try:
        assert (await api.post("/v1/receipts/S001/K01/B-1/cancel", as_="register"))[0] == 200
        assert (await api.post("/v1/returns", {
            "return_id": "RET-1", "store_id": "S001", "register_id": "K02",
            "receipt": dict(zip(("store_id", "register_id", "receipt_id"), SAME_ID)),
            "lines": [{"line_no": 3, "qty": 1}]}, as_="register"))[0] == 201
    finally:
        await database.write(lambda conn: conn.set_trace_callback(None))
    await api.client.close()
    by_receipt = [s for s in statements if s.lstrip().startswith("SELECT") and "FROM postings" in s
                  and "p.receipt_id = " in s]
    assert len(by_receipt) == 2, statements                  # the cancel's and the return's
    conn = sqlite3.connect(db)
    try:
        for statement in by_receipt:
            plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + statement)]
            assert any(step.startswith("SEARCH p USING INDEX postings_member (member_id=?)") for step in plan), plan
            assert not any(step.startswith("SCAN") for step in plan), plan
    finally:
        conn.close()


@SQLITE_ONLY
async def test_audit_verify_reads_the_receipts_postings_in_one_pass(make_api, tmp_path):
    """As many statements for three receipts as for one: not a look-up per receipt."""
    db = tmp_path / "loyalty.db"
    api = await make_api(now=RETURNS_NOW)
    await three_receipts(api)
    await api.client.close()

    def statements_of_verify() -> int:
        conn, statements = sqlite3.connect(db), []
        conn.set_trace_callback(statements.append)
        try:
            assert verify(conn).problems == []
        finally:
            conn.close()
        return len(statements)

    three = statements_of_verify()
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("UPDATE receipts SET member_id = NULL WHERE receipt_id = 'B-2' OR register_id = 'K02'")
    conn.close()
    assert statements_of_verify() == three


async def test_audit_verify_names_a_receipt_whose_postings_do_not_match_its_answer(make_api, tmp_path):
    """The one of two receipts with the same receipt id from two registers whose stored
    answer claims a point more for a rule than its postings hold."""
    db = tmp_path / "loyalty.db"
    api = await make_api(now=RETURNS_NOW)
    answers = await three_receipts(api)
    await api.client.close()

    def audit() -> list[str]:
        conn = connect(db)
        try:
            return verify(conn).problems
        finally:
            conn.close()

    assert audit() == []
    first = answers[SAME_ID]["accrued"]["by_rule"][0]
    conn = connect(db)
    try:
        (stored,), = conn.execute("SELECT result FROM receipts WHERE store_id = ? AND register_id = ? "
                                  "AND receipt_id = ?", SAME_ID).fetchall()
        answer = msgspec.json.decode(ledger.unpack(bytes(stored)))
        answer["accrued"]["by_rule"][0]["points"] += 1
        conn.execute("UPDATE receipts SET result = ? WHERE store_id = ? AND register_id = ? AND receipt_id = ?",
                     (msgspec.json.encode(answer), *SAME_ID))
        conn.commit()
    finally:
        conn.close()
    assert audit() == [f"receipt S001/K02/B-1: rule {first['rule']} posted {first['points']} "
                       f"but the receipt answered {first['points'] + 1}"]
