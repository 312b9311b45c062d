"""A merge of two members who are one customer keeps what customer value management gave
either of them: the personal offers (budgets and use as they were, one offer where both held
it, never more budget than either had), the list segments, and the cancels and returns of the
member merged away answered with the balance of the member that now holds its points, and the
reward for a friend it referred."""
from __future__ import annotations

from conftest import Api, test_config

from server.app import create_app
from server.keys import DATABASE
from storage import admin_audit, audit

NOW = "2026-12-10T12:00:00+02:00"
PROGRAM = """\
program: {id: boutique, name: Boutique, currency: UAH, timezone: Europe/Kyiv}
points: {value: 100, rounding: floor, activation_delay_days: 0, expiry_days: 365}
tiers: {levels: [{id: base, from: 0}]}
stores: [{id: S001}]
segments:
  define:
    - {id: staff, list: true}
events:
  - {id: referral, on: referred_first_purchase, reward: {points: 500}}
rules:
  - id: base
    reward: {percent: 2}
  - id: staff-bonus
    when: {segment: staff}
    reward: {percent: 10}
  - id: comeback
    personal: true
    reward: {points: 30}
  - id: thanks
    personal: true
    reward: {points: 20}
"""


async def serve(aiohttp_client, tmp_path, cards=("c1", "c2")) -> Api:
    program = tmp_path / "program"
    program.mkdir()
    (program / "program.yaml").write_text(PROGRAM)
    app = create_app(test_config(tmp_path, NOW, program_dir=program, jobs={"enabled": False}))
    api = Api(await aiohttp_client(app))
    api.app = app
    for card in cards:
        status, member = await api.post("/v1/members", {"card": card})
        assert status == 201, member
    return api


def sale(rid: str, card: str, amount: int = 10_000) -> dict:
    return {"receipt_id": rid, "store_id": "S001", "register_id": "K1", "ts": NOW, "card": card,
            "lines": [{"line_no": 1, "sku": "x", "category": "coats", "qty": 1, "price": amount,
                       "amount": amount}], "total": amount}


async def confirm(api: Api, body: dict) -> dict[str, int]:
    status, answer = await api.post("/v1/receipts", body, as_="register")
    assert status == 201, answer
    return {r["rule"]: r["points"] for r in answer["accrued"]["by_rule"]}


async def offer(api: Api, offer_id: str, rule: str, cards: list[str], points: int) -> None:
    status, body = await api.post("/v1/admin/offers", {"offer_id": offer_id, "rule": rule, "cards": cards,
                                                       "from": "2026-12-01", "to": "2026-12-31", "points": points})
    assert status == 201, body


async def merge(api: Api, merge_id: str, old: str, keep: str) -> None:
    ids = [(await api.get(f"/v1/members/{card}"))[1]["member_id"] for card in (old, keep)]
    status, body = await api.post("/v1/admin/members/merge", {"merge_id": merge_id, "from_member_id": ids[0],
                                                              "into_member_id": ids[1], "reason": "one customer"})
    assert status == 201, body


async def points_left(api: Api, card: str) -> dict[str, int | None]:
    _, member = await api.get(f"/v1/members/{card}")
    return {o["rule"]: o["points_left"] for o in member["offers"]}


async def assert_ledger_verifies(api: Api) -> None:
    report = await api.app[DATABASE].read(audit.verify)
    assert report.ok, report.problems
    assert (await api.app[DATABASE].read(admin_audit.verify)).ok


async def test_offers_go_to_the_surviving_member_and_one_held_by_both_keeps_the_larger_budget_left(
        aiohttp_client, tmp_path):
    api = await serve(aiohttp_client, tmp_path)
    await offer(api, "back-c1", "comeback", ["c1"], 100)
    await offer(api, "thanks-both", "thanks", ["c1", "c2"], 50)
    assert await confirm(api, sale("r1", "c1")) == {"base": 2, "comeback": 30, "thanks": 20}
    assert await confirm(api, sale("r2", "c2")) == {"base": 2, "thanks": 20}
    assert await confirm(api, sale("r3", "c2")) == {"base": 2, "thanks": 20}
    assert await points_left(api, "c1") == {"comeback": 70, "thanks": 30}
    assert await points_left(api, "c2") == {"thanks": 10}

    await merge(api, "MG-1", "c1", "c2")
    # The offer only c1 had, with what is left of it; the one both had: 30 left (c1's), not 40.
    assert await points_left(api, "c2") == {"comeback": 70, "thanks": 30}
    # A cancel of c1's receipt gives back to the budgets it took from, now the survivor's.
    status, _ = await api.post("/v1/receipts/S001/K1/r1/cancel", as_="register")
    assert status == 200
    assert await points_left(api, "c2") == {"comeback": 100, "thanks": 50}
    # c2's own budget of `thanks` was not kept: cancelling what took from it adds nothing.
    assert (await api.post("/v1/receipts/S001/K1/r2/cancel", as_="register"))[0] == 200
    assert await points_left(api, "c2") == {"comeback": 100, "thanks": 50}
    assert await confirm(api, sale("r4", "c2")) == {"base": 2, "comeback": 30, "thanks": 20}
    assert await points_left(api, "c2") == {"comeback": 70, "thanks": 30}
    await assert_ledger_verifies(api)


async def test_the_survivor_keeps_its_own_budget_when_more_is_left_of_it(aiohttp_client, tmp_path):
    api = await serve(aiohttp_client, tmp_path)
    await offer(api, "thanks-both", "thanks", ["c1", "c2"], 50)
    assert await confirm(api, sale("r1", "c1")) == {"base": 2, "thanks": 20}
    await merge(api, "MG-1", "c1", "c2")
    assert await points_left(api, "c2") == {"thanks": 50}
    # What c1's receipt took was of the budget not kept: its cancel gives nothing back.
    assert (await api.post("/v1/receipts/S001/K1/r1/cancel", as_="register"))[0] == 200
    assert await points_left(api, "c2") == {"thanks": 50}
    await assert_ledger_verifies(api)


async def test_the_survivor_joins_the_list_segments_of_the_member_merged_away(aiohttp_client, tmp_path):
    api = await serve(aiohttp_client, tmp_path)
    status, body = await api.put("/v1/admin/segments/staff/members", {"cards": ["c1"]})
    assert status == 200 and body["members"] == 1
    # c2's segments are read (and kept in memory) before the merge.
    assert await confirm(api, sale("r1", "c2")) == {"base": 2}
    await merge(api, "MG-1", "c1", "c2")
    assert await confirm(api, sale("r2", "c2")) == {"base": 2, "staff-bonus": 10}
    assert (await api.get("/v1/members/c2"))[1]["segments"] == ["staff"]
    # One customer, one member of the segment: the member merged away left it.
    status, body = await api.put("/v1/admin/segments/staff/members", {"cards": ["c2"]})
    assert status == 200 and body["members"] == 1
    await assert_ledger_verifies(api)


async def test_a_return_and_a_cancel_of_the_merged_members_receipt_answer_the_survivors_balance(
        aiohttp_client, tmp_path):
    api = await serve(aiohttp_client, tmp_path)
    await confirm(api, sale("r1", "c1", 20_000))                 # 4 points for c1
    await confirm(api, sale("r2", "c2", 50_000))                 # 10 points for c2
    await merge(api, "MG-1", "c1", "c2")
    _, keep = await api.get("/v1/members/c2")
    assert keep["balance"] == {"available": 14, "pending": 0, "held": 0}
    ref = {"store_id": "S001", "register_id": "K1", "receipt_id": "r1"}
    status, back = await api.post("/v1/returns", {"return_id": "t1", "store_id": "S001", "register_id": "K1",
                                                  "receipt": ref, "lines": [{"line_no": 1, "qty": 1}]},
                                  as_="register")
    assert status == 201 and back["reversed"]["points"] == 4, back
    assert back["member_id"] == keep["member_id"]
    assert back["balance"] == {"available": 10, "pending": 0, "held": 0}
    status, cancelled = await api.post("/v1/receipts/S001/K1/r1/cancel", as_="register")
    assert status == 200 and cancelled["balance"] == {"available": 10, "pending": 0, "held": 0}, cancelled
    # Sent again after the cancel: the stored answer with the balance now, the survivor's.
    status, again = await api.post("/v1/receipts", sale("r1", "c1", 20_000), as_="register")
    assert status == 200 and again["cancelled"] is True and again["balance"]["available"] == 10, again
    _, stream = await api.get("/v1/admin/events?after=0&limit=100")
    told = {e["type"]: (e["member_id"], e["data"]["balance"]) for e in stream["events"]
            if e["type"] in ("return.accepted", "receipt.cancelled")}
    assert told == {kind: (keep["member_id"], {"available": 10, "pending": 0, "held": 0})
                    for kind in ("return.accepted", "receipt.cancelled")}
    await assert_ledger_verifies(api)


async def test_a_referral_by_the_member_merged_away_rewards_the_survivor(aiohttp_client, tmp_path):
    api = await serve(aiohttp_client, tmp_path)
    status, friend = await api.post("/v1/members", {"card": "c3", "referred_by": "c1"})
    assert status == 201, friend
    await merge(api, "MG-1", "c1", "c2")
    await confirm(api, sale("r1", "c3"))                            # the friend's first purchase
    _, keep = await api.get("/v1/members/c2")
    assert keep["balance"] == {"available": 500, "pending": 0, "held": 0}
    _, statement = await api.get("/v1/members/c2/statement")
    assert [p["rule"] for p in statement["postings"]] == ["referral"], statement
    await assert_ledger_verifies(api)
