"""Late receipts (a ts well before arrival): rules, tier, limits and lot dates follow ts;
the balance in the answer is the balance at arrival; points already expired at arrival are
posted and expire at once; receipt_number counts in arrival order (rules.md, Decisions)."""
import json

from conftest import TEST_HMAC_KEY, connect, line, receipt
from decision_program import NOW, points_of, write_program
from rules import load_program
from server.privacy import Privacy
from server.rules_tools import member_from_db
from server.schema import Receipt, decode
from storage.audit import verify

CARD = "7000000000001"


async def setup(make_api, tmp_path):
    api = await make_api(now=NOW, program_dir=write_program(tmp_path / "program"))
    status, _ = await api.post("/v1/members", {"card": CARD})
    assert status == 201
    return api


async def confirm(api, receipt_id: str, ts: str, *amounts: int) -> dict:
    body = receipt(receipt_id, [line(i + 1, "grocery", a) for i, a in enumerate(amounts)], card=CARD, ts=ts)
    status, res = await api.post("/v1/receipts", body, as_="register")
    assert status == 201, res
    return res


async def test_points_expired_before_arrival_are_posted_expired_and_not_in_the_balance(make_api, tmp_path):
    api = await setup(make_api, tmp_path)
    # Expires 2026-10-31, arrives 2026-11-24: 5 (1 %) + 7 (first) + 3 (daily) earned and gone.
    res = await confirm(api, "OLD-1", "2026-10-01T12:00:00+03:00", 50000)
    assert res["accrued"]["points"] == 15 and res["accrued"]["expires_on"] == "2026-10-31"
    assert res["balance"] == {"available": 100, "pending": 0, "held": 0}
    assert res["messages"][-1] == "Balance: 100 points"
    _, member = await api.get(f"/v1/members/{CARD}")
    assert member["balance"] == res["balance"]

    _, st = await api.get(f"/v1/members/{CARD}/statement")
    kinds = [(p["kind"], p["points"]) for p in st["postings"] if p["receipt"] or (p["ref"] or "").startswith("exp")]
    assert ("expiry", -15) in kinds and sum(p for k, p in kinds if k == "accrual") == 15
    assert st["postings"][0]["running_balance"] == 100

    # Within its validity at arrival (available from 2026-11-19, expires 2026-12-05): spendable now.
    res = await confirm(api, "OLD-2", "2026-11-05T12:00:00+02:00", 20000)
    assert res["accrued"]["points"] == 5 and res["balance"] == {"available": 105, "pending": 0, "held": 0}
    _, member = await api.get(f"/v1/members/{CARD}")
    assert member["balance"] == res["balance"]
    with connect(tmp_path / "loyalty.db") as conn:
        assert verify(conn).ok


async def test_a_late_receipt_gets_the_tier_and_limits_of_its_ts_and_is_not_a_first_purchase(make_api, tmp_path):
    api = await setup(make_api, tmp_path)
    first = await confirm(api, "R-1", "2026-11-20T12:00:00+02:00", 60000, 90000)
    assert first["accrued"]["by_rule"] == [{"rule": "base", "points": 15}, {"rule": "first", "points": 7},
                                           {"rule": "daily", "points": 3}]
    # Sent later, stamped before R-1: base tier then (R-1 had not happened), not a first purchase.
    late = await confirm(api, "R-2", "2026-11-10T12:00:00+02:00", 10000)
    assert late["accrued"]["by_rule"] == [{"rule": "base", "points": 1}, {"rule": "daily", "points": 3}]
    # After R-1 the member is silver; its day's limit is used; R-2's day does not count.
    after = await confirm(api, "R-3", "2026-11-20T15:00:00+02:00", 10000)
    assert after["accrued"]["by_rule"] == [{"rule": "silver", "points": 5}]
    before = await confirm(api, "R-4", "2026-11-19T15:00:00+02:00", 10000)
    assert before["accrued"]["by_rule"] == [{"rule": "base", "points": 1}, {"rule": "daily", "points": 3}]

    # Returns count as soon as they are made: R-1 net of its 900.00 line is 600.00, base.
    status, _ = await api.post("/v1/returns", {
        "return_id": "X-1", "store_id": "S001", "register_id": "K01",
        "receipt": {"store_id": "S001", "register_id": "K01", "receipt_id": "R-1"},
        "lines": [{"line_no": 2, "qty": 1}]}, as_="register")
    assert status == 201
    netted = await confirm(api, "R-5", "2026-11-21T12:00:00+02:00", 10000)
    assert points_of(netted, "base") == 1 and points_of(netted, "silver") == 0
    _, member = await api.get(f"/v1/members/{CARD}")
    # Today: 600.00 net of R-1 and four receipts of 100.00 reach silver's 1,000.00 again.
    assert member["tier"]["id"] == "silver" and member["tier"]["value"] == 60000 + 4 * 10000


async def test_explain_counts_receipt_number_in_arrival_order_as_the_server_does(make_api, tmp_path):
    api = await setup(make_api, tmp_path)
    await confirm(api, "R-1", "2026-11-20T12:00:00+02:00", 150000)
    await confirm(api, "R-2", "2026-11-10T12:00:00+02:00", 10000)
    program = load_program(tmp_path / "program")
    digest = Privacy(TEST_HMAC_KEY.encode()).card(CARD)

    def facts(receipt_id: str, ts: str):
        body = receipt(receipt_id, [line(1, "grocery", 10000)], card=CARD, ts=ts)
        with connect(tmp_path / "loyalty.db") as conn:
            return member_from_db(conn, program, digest, decode(json.dumps(body).encode(), Receipt))
    stored_late = facts("R-2", "2026-11-10T12:00:00+02:00")
    assert stored_late.receipt_number == 2 and stored_late.tier == "base"
    stored_first = facts("R-1", "2026-11-20T12:00:00+02:00")
    assert stored_first.receipt_number == 1 and stored_first.tier == "base"
    new = facts("R-9", "2026-11-21T12:00:00+02:00")
    assert new.receipt_number == 3 and new.tier == "silver"
    program.close()


async def test_a_late_receipt_spends_what_is_available_at_arrival(make_api, tmp_path):
    api = await setup(make_api, tmp_path)     # the welcome points came after the receipt's ts
    body = receipt("OLD-3", [line(1, "grocery", 10000)], card=CARD, ts="2026-11-01T12:00:00+02:00", redeem=20)
    status, res = await api.post("/v1/receipts", body, as_="register")
    assert status == 201 and res["redeemed"]["points"] == 20
    # 0.80 at 1 % of what was paid + 7 + 3 = 10, available since 2026-11-15.
    assert res["accrued"]["points"] == 10 and res["balance"] == {"available": 90, "pending": 0, "held": 0}
    _, member = await api.get(f"/v1/members/{CARD}")
    assert member["balance"] == res["balance"]


async def test_a_balance_at_a_past_moment_never_spends_points_a_late_receipt_spent_on_arrival(make_api, tmp_path):
    """A register offline since yesterday evening sends a receipt that pays with points the
    member was only given today: `?at=` before they were given shows nothing spent (the
    points left the balance when the receipt arrived), not a negative balance."""
    api = await setup(make_api, tmp_path)
    status, _ = await api.post("/v1/admin/adjustments", {"card": CARD, "points": 400, "reason": "goodwill",
                                                         "adjustment_id": "ADJ-1"})
    assert status == 201
    body = receipt("LATE-1", [line(1, "grocery", 60000)], card=CARD, ts="2026-11-23T18:00:00+02:00", redeem=300)
    status, res = await api.post("/v1/receipts", body, as_="register")
    assert status == 201 and res["redeemed"]["points"] == 300, res
    earned = res["accrued"]["points"]
    assert res["balance"] == {"available": 200, "pending": earned, "held": 0}

    _, before = await api.get(f"/v1/members/{CARD}?at=2026-11-24")
    assert before["balance"] == {"available": 0, "pending": earned, "held": 0}   # its purchase is dated at ts
    _, after = await api.get(f"/v1/members/{CARD}?at=2026-11-25")
    assert after["balance"] == res["balance"]
    _, st = await api.get(f"/v1/members/{CARD}/statement")
    spent = [p for p in st["postings"] if p["kind"] == "redemption"]
    assert sum(p["points"] for p in spent) == -300 and {p["at"] for p in spent} == {"2026-11-23T16:00:00.000000Z"}
    with connect(tmp_path / "loyalty.db") as conn:
        assert verify(conn).ok


REFERRAL = "events:\n  - {id: referral, on: referred_first_purchase, reward: {points: 500}}\n"


async def test_a_balance_at_a_past_moment_repays_a_debt_from_a_late_receipt_only_once_it_arrived(make_api, tmp_path):
    """A member owes points from today (a referral taken back after they spent it); a sale of
    theirs from 1 November arrives now and its points repay the debt. On 20 November the
    sale's points were available and nothing was owed yet."""
    program = write_program(tmp_path / "program")
    (program / "referral.yaml").write_text(REFERRAL)
    api = await make_api(now=NOW, program_dir=program)
    await api.post("/v1/members", {"card": CARD})
    await api.post("/v1/members", {"card": "friend", "referred_by": CARD})
    first = receipt("F-1", [line(1, "grocery", 1000)], card="friend", ts=NOW)
    assert (await api.post("/v1/receipts", first, as_="register"))[0] == 201
    spend = receipt("S-1", [line(1, "grocery", 120000)], card=CARD, ts=NOW, redeem=550)
    assert (await api.post("/v1/receipts", spend, as_="register"))[0] == 201
    assert (await api.post("/v1/receipts/S001/K01/F-1/cancel", as_="register"))[0] == 200
    _, member = await api.get(f"/v1/members/{CARD}")
    assert member["balance"]["available"] == 50 - 500

    late = await confirm(api, "LATE-1", "2026-11-01T12:00:00+02:00", 100000)
    assert late["accrued"]["available_from"] == "2026-11-15"
    _, then = await api.get(f"/v1/members/{CARD}?at=2026-11-20")
    assert then["balance"] == {"available": late["accrued"]["points"], "pending": 0, "held": 0}
    _, now = await api.get(f"/v1/members/{CARD}?at=2026-11-25")
    assert now["balance"] == late["balance"]
    with connect(tmp_path / "loyalty.db") as conn:
        assert verify(conn).ok
