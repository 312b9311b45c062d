"""Campaign budgets hold under concurrent receipts and across restarts (the issued points
are kept in rule_totals, also in a database upgraded to it); a referral pays the
referrer once, and a cancel or a whole return of the friend's first purchase takes it back;
a cancel of a first purchase already wholly returned pays it for the receipt that becomes
the first purchase."""
import asyncio
import shutil
import sqlite3

import pytest

from conftest import MARKET, connect, line, receipt
from per_rule_postings import to_per_rule_postings
from storage.audit import verify

NOW = "2026-11-24T12:00:05+02:00"
EXTRA = """
rules:
  - id: launch
    reward: {points: 30}
    budget: {points: 50}
events:
  - {id: referral, on: referred_first_purchase, reward: {points: 500}}
"""


async def api_with_extra(make_api, tmp_path):
    program = tmp_path / "program"
    if not program.exists():
        shutil.copytree(MARKET, program)
        (program / "extra.yaml").write_text(EXTRA)
    return await make_api(now=NOW, program_dir=program)


def launch_points(result) -> int:
    return sum(x["points"] for x in result["accrued"]["by_rule"] if x["rule"] == "launch")


async def test_budget_is_never_exceeded_by_concurrent_receipts(make_api, tmp_path):
    api = await api_with_extra(make_api, tmp_path)
    for i in range(6):
        await api.post("/v1/members", {"card": f"c{i}"})
    bodies = [receipt(f"B-{i}", [line(1, "bakery", 1000)], card=f"c{i}") for i in range(6)]
    answers = await asyncio.gather(*(api.post("/v1/receipts", b, as_="register") for b in bodies))
    assert all(s == 201 for s, _ in answers)
    given = sorted(launch_points(r) for _, r in answers)
    assert sum(given) == 50 and given[-2:] == [20, 30]     # the crossing receipt gets the remainder

    # A cancel gives its points back to the budget.
    full = next(r for _, r in answers if launch_points(r) == 30)
    ref = full["receipt"]
    status, _ = await api.post(f"/v1/receipts/{ref['store_id']}/{ref['register_id']}/{ref['receipt_id']}/cancel",
                               as_="register")
    assert status == 200
    _, again = await api.post("/v1/receipts", receipt("B-again", [line(1, "bakery", 1000)], card="c0",
                                                      ts="2026-11-24T12:00:01+02:00"), as_="register")
    assert launch_points(again) == 30


async def test_budget_survives_a_restart(make_api, tmp_path):
    api = await api_with_extra(make_api, tmp_path)
    await api.post("/v1/members", {"card": "c"})
    await api.post("/v1/receipts", receipt("R-1", [line(1, "bakery", 1000)], card="c"), as_="register")
    await api.client.close()
    api2 = await api_with_extra(make_api, tmp_path)      # same database, new process state
    _, r = await api2.post("/v1/receipts", receipt("R-2", [line(1, "bakery", 1000)], card="c",
                                                   ts="2026-11-24T12:00:01+02:00"), as_="register")
    assert launch_points(r) == 20


async def buy(api, receipt_id: str, card: str, second: int = 0):
    body = receipt(receipt_id, [line(1, "bakery", 1000)], card=card, ts=f"2026-11-24T12:00:{second:02d}+02:00")
    return await api.post("/v1/receipts", body, as_="register")


async def cancel(api, receipt_id: str):
    return await api.post(f"/v1/receipts/S001/K01/{receipt_id}/cancel", as_="register")


async def use_up_budget_then_cancel_one(make_api, tmp_path):
    """30 + 20 points of the 50-point launch budget, then the 30 given back: 20 issued."""
    api = await api_with_extra(make_api, tmp_path)
    for card in ("c0", "c1", "c2", "c3"):
        await api.post("/v1/members", {"card": card})
    answers = [await buy(api, "R-0", "c0"), await buy(api, "R-1", "c1")]
    assert [launch_points(r) for _, r in answers] == [30, 20]
    status, _ = await cancel(api, "R-0")
    assert status == 200
    await api.client.close()


def launch_total(tmp_path) -> int:
    conn = connect(tmp_path / "loyalty.db")
    try:
        kept = conn.execute("SELECT SUM(points) FROM rule_totals WHERE rule_id = 'launch'").fetchone()[0]
        assert verify(conn).ok
        return kept
    finally:
        conn.close()


async def test_budget_totals_survive_a_restart_and_the_cap_holds(make_api, tmp_path):
    await use_up_budget_then_cancel_one(make_api, tmp_path)
    assert launch_total(tmp_path) == 20
    api = await api_with_extra(make_api, tmp_path)       # same database, new process state
    status, r = await buy(api, "R-2", "c2", second=1)
    assert status == 201 and launch_points(r) == 30      # what the cancel gave back, no more
    status, r = await buy(api, "R-3", "c3", second=1)
    assert status == 201 and launch_points(r) == 0                # the budget is spent
    _, member = await api.get("/v1/members/c3")
    assert member["balance"]["pending"] + member["balance"]["available"] == 100   # the welcome points only
    await api.client.close()
    assert launch_total(tmp_path) == 50


def to_before_rule_totals(path) -> None:
    """The database as a server without m016 left it: postings only, one accrual per rule."""
    to_per_rule_postings(path)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript("""
BEGIN;
DROP TRIGGER postings_rule_totals;
DROP TABLE rule_totals;
DELETE FROM _sqlite_migrations WHERE name = 'm016_rule_totals';
COMMIT;
""")
    conn.close()


@pytest.mark.sqlite_only(reason="upgrades an SQLite file written before m016")
async def test_budget_totals_of_an_upgraded_database_count_accruals_and_reversals(make_api, tmp_path):
    await use_up_budget_then_cancel_one(make_api, tmp_path)
    to_before_rule_totals(tmp_path / "loyalty.db")
    api = await api_with_extra(make_api, tmp_path)       # upgrades: rule_totals filled from postings
    status, r = await buy(api, "R-2", "c2", second=1)
    assert status == 201 and launch_points(r) == 30
    status, r = await buy(api, "R-3", "c3", second=1)
    assert status == 201 and launch_points(r) == 0
    await api.client.close()
    assert launch_total(tmp_path) == 50


async def test_referrer_earns_once_on_the_first_purchase(make_api, tmp_path):
    api = await api_with_extra(make_api, tmp_path)
    await api.post("/v1/members", {"card": "referrer"})
    status, _ = await api.post("/v1/members", {"card": "friend", "referred_by": "referrer"})
    assert status == 201
    status, err = await api.post("/v1/members", {"card": "x", "referred_by": "nobody"})
    assert status == 422 and err["error"]["code"] == "unknown_card"
    for n in range(2):
        await api.post("/v1/receipts", receipt(f"F-{n}", [line(1, "bakery", 1000)], card="friend",
                                               ts=f"2026-11-24T12:00:0{n}+02:00"), as_="register")
    _, m = await api.get("/v1/members/referrer")
    assert m["balance"]["available"] == 100 + 500


# ---------------------------------------------------------------- a referral taken back

FRIEND_BUYS = [line(1, "bakery", 1000, qty=2)]


async def referral_paid(make_api, tmp_path, referrer: str = "referrer"):
    """A friend referred by `referrer` whose first purchase F-1 paid the referrer's 500 points."""
    api = await api_with_extra(make_api, tmp_path)
    if referrer == "referrer":
        await api.post("/v1/members", {"card": "referrer"})
    status, _ = await api.post("/v1/members", {"card": "friend", "referred_by": referrer})
    assert status == 201
    status, _ = await api.post("/v1/receipts", receipt("F-1", FRIEND_BUYS, card="friend"), as_="register")
    assert status == 201
    return api


async def available(api, card: str) -> int:
    status, member = await api.get(f"/v1/members/{card}")
    assert status == 200, member
    return member["balance"]["available"]


async def friend_buys_again(api, receipt_id: str, second: int) -> None:
    body = receipt(receipt_id, FRIEND_BUYS, card="friend", ts=f"2026-11-24T12:00:{second:02d}+02:00")
    assert (await api.post("/v1/receipts", body, as_="register"))[0] == 201


async def a_return(api, return_id: str, qty: int, receipt_id: str = "F-1"):
    return await api.post("/v1/returns", {
        "return_id": return_id, "store_id": "S001", "register_id": "K01",
        "receipt": {"store_id": "S001", "register_id": "K01", "receipt_id": receipt_id},
        "lines": [{"line_no": 1, "qty": qty}]}, as_="register")


async def events_of(api, kind: str) -> list[dict]:
    status, page = await api.get("/v1/admin/events?after=0&limit=1000")
    assert status == 200, page
    return [e for e in page["events"] if e["type"] == kind]


async def verified(api) -> None:
    from server.keys import DATABASE
    report = await api.client.server.app[DATABASE].read(verify)
    assert report.ok, report.problems


async def test_a_cancelled_first_purchase_takes_the_referral_back_and_the_next_pays_it_again(make_api, tmp_path):
    api = await referral_paid(make_api, tmp_path)
    assert await available(api, "referrer") == 100 + 500
    _, friend = await api.get("/v1/members/friend")
    status, cancelled = await cancel(api, "F-1")
    assert status == 200 and cancelled["status"] == "cancelled"
    assert await available(api, "referrer") == 100

    _, statement = await api.get("/v1/members/referrer/statement")
    newest, paid = statement["postings"][:2]
    ref = f"event:referral:referral:{friend['member_id'].removeprefix('m_')}"
    assert (newest["kind"], newest["points"], newest["ref"], newest["running_balance"]) == ("reversal", -500, ref, 100)
    assert (paid["kind"], paid["points"], paid["ref"], paid["rule"]) == ("event", 500, ref, "referral")
    assert newest["lot"] == paid["lot"] and newest["receipt"] is None
    # The friend's CRM event says whose points went.
    (event,) = await events_of(api, "receipt.cancelled")
    _, referrer = await api.get("/v1/members/referrer")
    assert event["data"]["referral_reversed"] == [{"member_id": referrer["member_id"], "points": 500}]

    # Sent again, the cancel takes nothing more.
    status, again = await cancel(api, "F-1")
    assert status == 200 and again["already"] is True
    assert await available(api, "referrer") == 100

    # The next receipt is the friend's first purchase again: the referral pays once more.
    await friend_buys_again(api, "F-2", 1)
    assert await available(api, "referrer") == 100 + 500
    await friend_buys_again(api, "F-3", 2)
    assert await available(api, "referrer") == 100 + 500
    await verified(api)


async def test_a_cancel_while_a_later_receipt_of_the_friend_stands_leaves_the_referral(make_api, tmp_path):
    """The later receipt is the friend's first purchase now: it keeps the reward, and a
    cancel of it then takes the reward back."""
    api = await referral_paid(make_api, tmp_path)
    await friend_buys_again(api, "F-2", 1)
    assert (await cancel(api, "F-1"))[0] == 200
    assert await available(api, "referrer") == 100 + 500
    assert (await cancel(api, "F-2"))[0] == 200
    assert await available(api, "referrer") == 100
    await friend_buys_again(api, "F-3", 2)
    assert await available(api, "referrer") == 100 + 500
    await verified(api)


async def test_a_whole_return_in_two_parts_takes_the_referral_back_once(make_api, tmp_path):
    api = await referral_paid(make_api, tmp_path)
    status, _ = await a_return(api, "RET-1", 1)
    assert status == 201
    assert await available(api, "referrer") == 100 + 500        # a part of the receipt takes nothing
    (partial,) = await events_of(api, "return.accepted")
    assert partial["data"]["referral_reversed"] == []
    status, _ = await a_return(api, "RET-2", 1)
    assert status == 201
    assert await available(api, "referrer") == 100
    status, replay = await a_return(api, "RET-2", 1)
    assert status == 200 and replay["replayed"] is True
    assert await available(api, "referrer") == 100
    _, referrer = await api.get("/v1/members/referrer")
    whole = (await events_of(api, "return.accepted"))[-1]
    assert whole["data"]["referral_reversed"] == [{"member_id": referrer["member_id"], "points": 500}]
    # A return leaves receipt_number as it was: the next receipt is no first purchase.
    await friend_buys_again(api, "F-2", 1)
    assert await available(api, "referrer") == 100
    await verified(api)


async def test_a_cancel_of_a_wholly_returned_first_purchase_pays_the_referral_for_the_receipt_after_it(
        make_api, tmp_path):
    """F-1's whole return took the reward back; its cancel makes F-2, which stands (a part
    of it returned), the first purchase, whose reward is then paid, dated by the cancel."""
    from datetime import datetime
    from server.keys import CLOCK
    api = await referral_paid(make_api, tmp_path)
    assert (await a_return(api, "RET-1", 2))[0] == 201
    assert await available(api, "referrer") == 100
    await friend_buys_again(api, "F-2", 1)
    assert (await a_return(api, "RET-2", 1, receipt_id="F-2"))[0] == 201
    assert await available(api, "referrer") == 100
    _, friend = await api.get("/v1/members/friend")
    api.client.app[CLOCK].set(datetime.fromisoformat("2026-12-10T10:00:00+02:00"))

    status, cancelled = await cancel(api, "F-1")
    assert status == 200 and cancelled["status"] == "cancelled"
    assert await available(api, "referrer") == 100 + 500
    _, referrer = await api.get("/v1/members/referrer")
    # A lot of its own, available at once, expiring expiry_days after the day it was paid.
    assert referrer["expiring"] == [{"date": "2027-11-24", "points": 100}, {"date": "2027-12-10", "points": 500}]
    _, statement = await api.get("/v1/members/referrer/statement")
    paid, taken, first = statement["postings"][:3]
    ref = f"event:referral:referral:{friend['member_id'].removeprefix('m_')}"
    assert (paid["kind"], paid["points"], paid["ref"], paid["rule"], paid["counter_account"], paid["at"][:19],
            paid["receipt"], paid["running_balance"]) == (
        "event", 500, ref, "referral", "issue:program", "2026-12-10T08:00:00", None, 600)
    assert (taken["kind"], taken["points"], first["kind"], first["points"]) == ("reversal", -500, "event", 500)
    assert paid["lot"] != first["lot"] == taken["lot"]
    (event,) = await events_of(api, "receipt.cancelled")
    assert event["data"]["referral_reversed"] == []

    # Sent again, the cancel pays nothing more.
    status, again = await cancel(api, "F-1")
    assert status == 200 and again["already"] is True
    assert await available(api, "referrer") == 100 + 500
    # The reward is F-2's now: a cancel of F-2 takes it back, and the next receipt pays it again.
    assert (await cancel(api, "F-2"))[0] == 200
    assert await available(api, "referrer") == 100
    await friend_buys_again(api, "F-3", 2)
    assert await available(api, "referrer") == 100 + 500
    await verified(api)


async def test_a_cancel_of_a_wholly_returned_first_purchase_pays_nothing_when_the_next_was_returned_too(
        make_api, tmp_path):
    api = await referral_paid(make_api, tmp_path)
    assert (await a_return(api, "RET-1", 2))[0] == 201
    await friend_buys_again(api, "F-2", 1)
    assert (await a_return(api, "RET-2", 2, receipt_id="F-2"))[0] == 201
    assert await available(api, "referrer") == 100
    # F-2 is the first purchase now, wholly returned: no reward is due for it.
    assert (await cancel(api, "F-1"))[0] == 200
    assert await available(api, "referrer") == 100
    # A receipt after F-2 is no first purchase (a return leaves receipt_number as it was).
    await friend_buys_again(api, "F-3", 2)
    assert await available(api, "referrer") == 100
    # F-2 cancelled too, F-3 is the first purchase, not returned: the reward is paid for it.
    assert (await cancel(api, "F-2"))[0] == 200
    assert await available(api, "referrer") == 100 + 500
    await verified(api)


async def test_a_referrer_who_spent_the_points_owes_them_after_the_cancel(make_api, tmp_path):
    api = await referral_paid(make_api, tmp_path)
    status, spent = await api.post("/v1/receipts", receipt("R-1", [line(1, "bakery", 120000)], card="referrer",
                                                           redeem=550), as_="register")
    assert status == 201 and spent["redeemed"]["points"] == 550
    assert await available(api, "referrer") == 50
    assert (await cancel(api, "F-1"))[0] == 200
    assert await available(api, "referrer") == 50 - 500                   # a debt
    # The next points credited repay it first.
    status, _ = await api.post("/v1/admin/adjustments", {"card": "referrer", "points": 600, "reason": "goodwill",
                                                         "adjustment_id": "ADJ-1"})
    assert status == 201
    assert await available(api, "referrer") == 150
    await verified(api)


async def test_a_merged_away_referrer_loses_the_referral_from_the_member_it_went_to(make_api, tmp_path):
    api = await referral_paid(make_api, tmp_path)
    await api.post("/v1/members", {"card": "keeper"})
    _, referrer = await api.get("/v1/members/referrer")
    _, keeper = await api.get("/v1/members/keeper")
    status, merged = await api.post("/v1/admin/members/merge", {
        "merge_id": "MG-1", "from_member_id": referrer["member_id"], "into_member_id": keeper["member_id"],
        "reason": "one customer"})
    assert status == 201, merged
    assert await available(api, "keeper") == 100 + 100 + 500
    assert (await cancel(api, "F-1"))[0] == 200
    assert await available(api, "keeper") == 100 + 100
    (event,) = await events_of(api, "receipt.cancelled")
    assert event["data"]["referral_reversed"] == [{"member_id": keeper["member_id"], "points": 500}]
    # The next first purchase pays the member that stays.
    await friend_buys_again(api, "F-2", 1)
    assert await available(api, "keeper") == 100 + 100 + 500
    assert (await cancel(api, "F-2"))[0] == 200
    assert await available(api, "keeper") == 100 + 100
    await verified(api)


async def test_a_referrer_merged_away_before_the_purchase_was_paid_through_the_member_kept(make_api, tmp_path):
    api = await api_with_extra(make_api, tmp_path)
    for card in ("referrer", "keeper"):
        await api.post("/v1/members", {"card": card})
    await api.post("/v1/members", {"card": "friend", "referred_by": "referrer"})
    _, referrer = await api.get("/v1/members/referrer")
    _, keeper = await api.get("/v1/members/keeper")
    status, _ = await api.post("/v1/admin/members/merge", {
        "merge_id": "MG-1", "from_member_id": referrer["member_id"], "into_member_id": keeper["member_id"],
        "reason": "one customer"})
    assert status == 201
    await friend_buys_again(api, "F-1", 0)
    assert await available(api, "keeper") == 100 + 100 + 500
    status, _ = await a_return(api, "RET-1", 2)
    assert status == 201
    assert await available(api, "keeper") == 100 + 100
    await verified(api)


# ---------------------------------------------------------------- the referrer's events

def referral_event(event: dict) -> tuple:
    return event["member_id"], event["data"]


async def ids(api, *cards: str) -> list[str]:
    out = []
    for card in cards:
        status, member = await api.get(f"/v1/members/{card}")
        assert status == 200, member
        out.append(member["member_id"])
    return out


def receipt_key(receipt_id: str) -> dict:
    return {"store_id": "S001", "register_id": "K01", "receipt_id": receipt_id}


async def test_the_first_purchase_tells_the_referrer_of_its_reward(make_api, tmp_path):
    api = await api_with_extra(make_api, tmp_path)
    await api.post("/v1/members", {"card": "referrer"})
    patch = {"crm_id": "CRM-R", "consent": {"sms": True}}
    assert (await api.call("PATCH", "/v1/members/referrer", patch))[0] == 200
    await api.post("/v1/members", {"card": "friend", "referred_by": "referrer"})
    first = receipt("F-1", FRIEND_BUYS, card="friend")
    assert (await api.post("/v1/receipts", first, as_="register"))[0] == 201
    referrer, friend = await ids(api, "referrer", "friend")

    (event,) = await events_of(api, "referral.rewarded")
    assert (event["member_id"], event["card_last4"], event["crm_id"], event["consent"]["sms"]) == (
        referrer, "rrer", "CRM-R", True)
    assert event["data"] == {"referred_member_id": friend, "receipt": receipt_key("F-1"), "points": 500,
                             "reason": "receipt.confirmed",
                             "balance": {"available": 100 + 500, "pending": 0, "held": 0}}
    # The friend's own event comes first, and is the friend's.
    _, page = await api.get("/v1/admin/events?after=0&limit=1000")
    kinds = [(e["type"], e["member_id"]) for e in page["events"]][-2:]
    assert kinds == [("receipt.confirmed", friend), ("referral.rewarded", referrer)]

    # The same receipt again, and the friend's next receipt, tell the referrer nothing more.
    assert (await api.post("/v1/receipts", first, as_="register"))[0] == 200
    await friend_buys_again(api, "F-2", 1)
    assert len(await events_of(api, "referral.rewarded")) == 1
    assert await events_of(api, "referral.reversed") == []


async def test_a_cancel_of_the_first_purchase_tells_the_referrer_it_was_taken_back(make_api, tmp_path):
    api = await referral_paid(make_api, tmp_path)
    referrer, friend = await ids(api, "referrer", "friend")
    assert (await cancel(api, "F-1"))[0] == 200
    (event,) = await events_of(api, "referral.reversed")
    assert referral_event(event) == (referrer, {
        "referred_member_id": friend, "receipt": receipt_key("F-1"), "points": 500, "reason": "receipt.cancelled",
        "balance": {"available": 100, "pending": 0, "held": 0}})
    (cancelled,) = await events_of(api, "receipt.cancelled")
    assert cancelled["member_id"] == friend
    assert cancelled["data"]["referral_reversed"] == [{"member_id": referrer, "points": 500}]
    assert cancelled["id"] < event["id"]

    # Sent again, the cancel writes no event; the next first purchase pays, and says so.
    assert (await cancel(api, "F-1"))[0] == 200
    assert len(await events_of(api, "referral.reversed")) == 1
    await friend_buys_again(api, "F-2", 1)
    paid = [referral_event(e) for e in await events_of(api, "referral.rewarded")]
    assert paid[-1] == (referrer, {
        "referred_member_id": friend, "receipt": receipt_key("F-2"), "points": 500, "reason": "receipt.confirmed",
        "balance": {"available": 100 + 500, "pending": 0, "held": 0}})
    assert len(paid) == 2


async def test_two_friends_buying_at_once_each_tell_the_referrer_the_balance_their_reward_left(make_api, tmp_path):
    """On SQLite their receipts are applied in one batch: each reward's event still says the
    balance right after it, not the batch's end."""
    api = await api_with_extra(make_api, tmp_path)
    await api.post("/v1/members", {"card": "referrer"})
    friends = [f"friend{i}" for i in range(4)]
    for card in friends:
        assert (await api.post("/v1/members", {"card": card, "referred_by": "referrer"}))[0] == 201
    answers = await asyncio.gather(*(api.post("/v1/receipts", receipt(f"G-{card}", FRIEND_BUYS, card=card),
                                              as_="register") for card in friends))
    assert all(status == 201 for status, _ in answers)
    paid = await events_of(api, "referral.rewarded")
    assert sorted(e["data"]["balance"]["available"] for e in paid) == [600, 1100, 1600, 2100]
    # In the order they were paid, each with its own friend and receipt.
    assert [e["data"]["balance"]["available"] for e in paid] == [600, 1100, 1600, 2100]
    by_friend = dict(zip(await ids(api, *friends), friends))
    assert sorted(by_friend[e["data"]["referred_member_id"]] for e in paid) == friends
    assert all(e["data"]["receipt"]["receipt_id"] == f"G-{by_friend[e['data']['referred_member_id']]}"
               for e in paid)
    assert await available(api, "referrer") == 2100


async def test_a_referrer_in_debt_hears_of_the_take_back_with_the_debt(make_api, tmp_path):
    api = await referral_paid(make_api, tmp_path)
    status, _ = await api.post("/v1/receipts", receipt("R-1", [line(1, "bakery", 120000)], card="referrer",
                                                       redeem=550), as_="register")
    assert status == 201
    assert (await cancel(api, "F-1"))[0] == 200
    (event,) = await events_of(api, "referral.reversed")
    _, member = await api.get("/v1/members/referrer")
    assert member["balance"]["available"] == 50 - 500
    assert (event["data"]["points"], event["data"]["balance"]) == (500, member["balance"])


async def test_a_whole_return_tells_the_referrer_once_a_part_tells_nothing(make_api, tmp_path):
    api = await referral_paid(make_api, tmp_path)
    referrer, friend = await ids(api, "referrer", "friend")
    assert (await a_return(api, "RET-1", 1))[0] == 201
    assert await events_of(api, "referral.reversed") == []
    assert (await a_return(api, "RET-2", 1))[0] == 201
    assert (await a_return(api, "RET-2", 1))[0] == 200             # a replay
    (event,) = await events_of(api, "referral.reversed")
    assert referral_event(event) == (referrer, {
        "referred_member_id": friend, "receipt": receipt_key("F-1"), "points": 500, "reason": "return.accepted",
        "balance": {"available": 100, "pending": 0, "held": 0}})
    whole = (await events_of(api, "return.accepted"))[-1]
    assert whole["id"] < event["id"]


async def test_a_cancel_that_pays_the_reward_again_tells_the_referrer_for_the_first_purchase_now(
        make_api, tmp_path):
    from datetime import datetime
    from server.keys import CLOCK
    api = await referral_paid(make_api, tmp_path)
    referrer, friend = await ids(api, "referrer", "friend")
    assert (await a_return(api, "RET-1", 2))[0] == 201
    await friend_buys_again(api, "F-2", 1)
    api.client.app[CLOCK].set(datetime.fromisoformat("2026-12-10T10:00:00+02:00"))
    assert (await cancel(api, "F-1"))[0] == 200
    rewarded = await events_of(api, "referral.rewarded")
    assert [e["data"]["receipt"]["receipt_id"] for e in rewarded] == ["F-1", "F-2"]
    assert referral_event(rewarded[-1]) == (referrer, {
        "referred_member_id": friend, "receipt": receipt_key("F-2"), "points": 500, "reason": "receipt.cancelled",
        "balance": {"available": 100 + 500, "pending": 0, "held": 0}})
    assert rewarded[-1]["occurred_at"].startswith("2026-12-10T08:00:00")
    # The whole return took it back once; the cancel, which paid it, took nothing.
    assert [e["data"]["receipt"]["receipt_id"] for e in await events_of(api, "referral.reversed")] == ["F-1"]

    assert (await cancel(api, "F-1"))[0] == 200                     # a replay
    assert len(await events_of(api, "referral.rewarded")) == 2
    # The reward is F-2's now: its cancel takes it back, and says so.
    assert (await cancel(api, "F-2"))[0] == 200
    taken = await events_of(api, "referral.reversed")
    assert [(e["data"]["receipt"]["receipt_id"], e["data"]["reason"]) for e in taken] == [
        ("F-1", "return.accepted"), ("F-2", "receipt.cancelled")]


async def test_the_referral_events_of_a_merged_away_referrer_are_the_member_kept(make_api, tmp_path):
    api = await api_with_extra(make_api, tmp_path)
    for card in ("referrer", "keeper"):
        await api.post("/v1/members", {"card": card})
    await api.post("/v1/members", {"card": "friend", "referred_by": "referrer"})
    referrer, keeper, friend = await ids(api, "referrer", "keeper", "friend")
    status, _ = await api.post("/v1/admin/members/merge", {
        "merge_id": "MG-1", "from_member_id": referrer, "into_member_id": keeper, "reason": "one customer"})
    assert status == 201
    await friend_buys_again(api, "F-1", 0)
    (paid,) = await events_of(api, "referral.rewarded")
    assert (paid["member_id"], paid["card_last4"], paid["data"]["points"], paid["data"]["balance"]["available"]) == (
        keeper, "eper", 500, 100 + 100 + 500)
    assert (await a_return(api, "RET-1", 2))[0] == 201
    (taken,) = await events_of(api, "referral.reversed")
    assert (taken["member_id"], taken["data"]["referred_member_id"], taken["data"]["points"],
            taken["data"]["balance"]["available"]) == (keeper, friend, 500, 100 + 100)


async def test_a_referrer_merged_away_after_the_reward_hears_of_its_take_back_on_the_member_kept(
        make_api, tmp_path):
    api = await referral_paid(make_api, tmp_path)
    await api.post("/v1/members", {"card": "keeper"})
    referrer, keeper = await ids(api, "referrer", "keeper")
    status, _ = await api.post("/v1/admin/members/merge", {
        "merge_id": "MG-1", "from_member_id": referrer, "into_member_id": keeper, "reason": "one customer"})
    assert status == 201
    assert (await cancel(api, "F-1"))[0] == 200
    (taken,) = await events_of(api, "referral.reversed")
    assert (taken["member_id"], taken["data"]["points"], taken["data"]["balance"]["available"]) == (
        keeper, 500, 100 + 100)


async def test_an_erased_referrers_referral_events_name_no_one(make_api, tmp_path):
    api = await referral_paid(make_api, tmp_path)
    assert (await api.call("PATCH", "/v1/members/referrer", {"crm_id": "CRM-R", "consent": {"sms": True}}))[0] == 200
    assert (await cancel(api, "F-1"))[0] == 200
    referrer, friend = await ids(api, "referrer", "friend")
    status, _ = await api.post(f"/v1/admin/members/{referrer}/erase", {"reason": "GDPR request"})
    assert status == 200
    for kind in ("referral.rewarded", "referral.reversed"):
        (event,) = await events_of(api, kind)
        assert (event["member_id"], event["card_last4"], event["crm_id"]) == (referrer, None, None)
        assert not any(event["consent"].values())
        # What happened stays: the friend's member id tells nothing of the referrer.
        assert (event["data"]["referred_member_id"], event["data"]["points"]) == (friend, 500)
