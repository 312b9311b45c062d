"""Segments, personal offers, coupon codes and control groups on the receipt path, end to
end through the API: what a register is answered, and what the ledger and the member's
record say afterwards, on SQLite and on PostgreSQL (skipped there without it)."""
from __future__ import annotations

import asyncio

import msgspec
import pytest
from conftest import Api, test_config

from test_storage_writer import WriterGate, wait_until

from server import rfm
from server.app import create_app
from server.config import DatabaseConfig
from server.keys import CLOCK, DATABASE, PROGRAMS
from storage import receipt_takes

NOW = "2026-12-10T12:00:00+02:00"
PROGRAM = """\
program: {id: boutique, name: Boutique, currency: UAH, timezone: Europe/Kyiv}
points: {value: 100, rounding: floor, activation_delay_days: 0, expiry_days: 365}
tiers: {levels: [{id: base, from: 0}]}
stores: [{id: S001}]
segments:
  define:
    - {id: staff, list: true}
    - {id: newcomers, when: {enrolled_days: {lt: 30}}}
coupons:
  - {id: winter, uses_per_code: 1, valid: {from: "2026-12-01", to: "2026-12-31"}}
  - {id: spring, uses_per_code: 1, valid: {from: "2027-03-01", to: "2027-03-31"}}
rules:
  - id: base
    reward: {percent: 2}
  - id: staff-bonus
    when: {segment: staff}
    reward: {percent: 10}
  - id: newcomer-bonus
    when: {segment: newcomers}
    scope: {categories: [hats]}
    reward: {points: 5}
  - id: winter-coupon
    when: {coupon: winter}
    reward: {points: 100}
  - id: comeback
    personal: true
    reward: {points: 30}
  - id: scarf-week
    scope: {categories: [scarves]}
    reward: {percent: 5}
    holdout: 0.2
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def api(request, aiohttp_client, tmp_path):
    async def make(cards=("c1",)) -> Api:
        program = tmp_path / "program"
        program.mkdir()
        (program / "program.yaml").write_text(PROGRAM)
        # The daily job runs when a test says (segment_job), not on the server's schedule.
        config = test_config(tmp_path, NOW, program_dir=program, jobs={"enabled": False})
        if request.param == "postgresql":
            config = msgspec.structs.replace(config, database=DatabaseConfig(url=request.getfixturevalue("pg_url")))
        app = create_app(config)
        a = Api(await aiohttp_client(app))
        a.app = app
        for card in cards:
            assert (await a.post("/v1/members", {"card": card}))[0] == 201
        return a
    return make


def receipt(rid: str, card: str = "c1", amount: int = 10_000, category: str = "coats", **extra) -> dict:
    """A one-line receipt at S001: 2 % base on `amount` minor units."""
    return {"receipt_id": rid, "store_id": "S001", "register_id": "K1", "ts": "2026-12-10T12:00:00+02:00",
            "card": card, "lines": [{"line_no": 1, "sku": "x", "category": category, "qty": 1, "price": amount,
                                     "amount": amount}], "total": amount, **extra}


async def confirm(a: Api, body: dict) -> dict:
    status, answer = await a.post("/v1/receipts", body, as_="register")
    assert status == 201, answer
    return answer


def by_rule(answer: dict) -> dict[str, int]:
    return {r["rule"]: r["points"] for r in answer["accrued"]["by_rule"]}


async def new_code(a: Api, campaign: str = "winter", card: str | None = None) -> str:
    status, body = await a.post(f"/v1/admin/coupons/{campaign}/codes", {"count": 1, **({"card": card} if card else {})})
    assert status == 201, body
    return body["codes"][0]


async def segment_job(a: Api) -> None:
    """The daily job's segment run, now: who is in the `when` segments."""
    program = a.app[PROGRAMS].current
    await rfm.run(a.app[DATABASE], program.segment_window_days, program.timezone, a.app[CLOCK].now(), force=True,
                  program=program)


async def rows(a: Api, sql: str, args=()) -> list[tuple]:
    return await a.app[DATABASE].read(lambda conn: [tuple(r) for r in conn.execute(sql, args)])


async def code_uses(a: Api) -> list[str]:
    """The receipts holding a use of a code: kept in their rows on SQLite (storage/receipt_takes.py),
    as rows of coupon_uses on PostgreSQL."""
    kept = [receipt_id for receipt_id, record in await rows(a, "SELECT receipt_id, takes FROM receipts")
            for _ in receipt_takes.decode(record).codes]
    return sorted(kept + [receipt_id for (receipt_id,) in await rows(a, "SELECT receipt_id FROM coupon_uses")])


async def test_list_and_when_segment_rules_apply_while_the_member_is_in_them(api):
    a = await api()
    assert by_rule(await confirm(a, receipt("r1"))) == {"base": 2}
    await a.put("/v1/admin/segments/staff/members", {"cards": ["c1"]})
    assert by_rule(await confirm(a, receipt("r2"))) == {"base": 2, "staff-bonus": 10}
    # a newcomer (enrolled today) buying a hat: the `when` segment's rule applies once the job saw them
    assert by_rule(await confirm(a, receipt("r3-before-the-job", category="hats"))) == {"base": 2, "staff-bonus": 10}
    await segment_job(a)
    assert by_rule(await confirm(a, receipt("r3", category="hats"))) == {"base": 2, "staff-bonus": 10,
                                                                         "newcomer-bonus": 5}
    await a.call("DELETE", "/v1/admin/segments/staff/members", {"cards": ["c1"]})
    assert by_rule(await confirm(a, receipt("r4"))) == {"base": 2}


async def test_personal_offer_gives_its_budget_remainder_then_nothing(api):
    a = await api(("c1", "c2"))
    offer = {"offer_id": "o-1", "rule": "comeback", "cards": ["c1"], "from": "2026-12-01", "to": "2026-12-31",
             "points": 40}
    assert (await a.post("/v1/admin/offers", offer))[0] == 201
    first = await confirm(a, receipt("r1"))
    assert by_rule(first) == {"base": 2, "comeback": 30}
    assert "Personal offer comeback: 30 points" in first["messages"]
    assert by_rule(await confirm(a, receipt("r2"))) == {"base": 2, "comeback": 10}     # 40 - 30 left
    assert by_rule(await confirm(a, receipt("r3"))) == {"base": 2}
    assert by_rule(await confirm(a, receipt("r4", card="c2"))) == {"base": 2}           # no offer, no rule
    _, member = await a.get("/v1/members/c1")
    assert member["offers"] == [{"rule": "comeback", "from": "2026-12-01", "to": "2026-12-31", "points_left": 0}]
    # a cancel gives the offer back what the receipt took of it
    assert (await a.post("/v1/receipts/S001/K1/r2/cancel", as_="register"))[0] == 200
    assert (await a.get("/v1/members/c1"))[1]["offers"][0]["points_left"] == 10
    assert by_rule(await confirm(a, receipt("r5"))) == {"base": 2, "comeback": 10}


async def test_coupon_applied_then_used_then_given_back_by_a_cancel(api):
    a = await api()
    code = await new_code(a)
    status, calc = await a.post("/v1/receipts/calculate", receipt("r1", coupons=[code]), as_="register")
    assert status == 200 and calc["coupons"] == [{"code": code, "status": "applied"}]   # a calculate uses nothing
    first = await confirm(a, receipt("r1", coupons=[code, "NO-SUCH-CODE"]))
    assert by_rule(first) == {"base": 2, "winter-coupon": 100}
    assert first["coupons"] == [{"code": code, "status": "applied"}, {"code": "NO-SUCH-CODE", "status": "unknown"}]
    second = await confirm(a, receipt("r2", coupons=[code.lower().replace("-", " ")]))
    assert by_rule(second) == {"base": 2} and second["coupons"][0]["status"] == "used"
    assert "coupons" not in await confirm(a, receipt("r3"))     # none sent, none answered
    assert (await a.post("/v1/receipts/S001/K1/r1/cancel", as_="register"))[0] == 200
    again = await confirm(a, receipt("r4", coupons=[code]))
    assert by_rule(again) == {"base": 2, "winter-coupon": 100} and again["coupons"][0]["status"] == "applied"
    assert await code_uses(a) == ["r4"]


async def test_coupon_statuses_other_card_not_yet_valid_not_needed(api):
    a = await api(("c1", "c2"))
    theirs, spring, first, second = (await new_code(a, card="c2"), await new_code(a, "spring"),
                                     await new_code(a), await new_code(a))
    answer = await confirm(a, receipt("r1", coupons=[theirs, spring, first, second]))
    assert [c["status"] for c in answer["coupons"]] == ["other_card", "not_yet_valid", "applied", "not_needed"]
    assert by_rule(answer) == {"base": 2, "winter-coupon": 100}
    # the code not needed kept its use
    assert by_rule(await confirm(a, receipt("r2", coupons=[second]))) == {"base": 2, "winter-coupon": 100}


async def test_a_receipt_without_a_card_says_why_each_code_does_not_apply_and_uses_none(api):
    a = await api()
    used, theirs, spring, fresh = (await new_code(a), await new_code(a, card="c1"), await new_code(a, "spring"),
                                   await new_code(a))
    assert by_rule(await confirm(a, receipt("r1", coupons=[used]))) == {"base": 2, "winter-coupon": 100}
    codes = [used, theirs, spring, "NO-SUCH-CODE", fresh]
    expected = [{"code": used, "status": "used"}, {"code": theirs, "status": "other_card"},
                {"code": spring, "status": "not_yet_valid"}, {"code": "NO-SUCH-CODE", "status": "unknown"},
                {"code": fresh, "status": "not_needed"}]       # it earns nothing, so no code is needed
    cardless = {k: v for k, v in receipt("r2", coupons=codes).items() if k != "card"}
    status, calc = await a.post("/v1/receipts/calculate", cardless, as_="register")
    assert status == 200 and calc["coupons"] == expected
    answer = await confirm(a, cardless)
    assert answer["coupons"] == expected and answer["accrued"]["points"] == 0
    assert by_rule(await confirm(a, receipt("r3", coupons=[fresh]))) == {"base": 2, "winter-coupon": 100}


async def test_a_code_bound_to_a_card_follows_the_member_to_a_new_card_and_through_a_merge(api):
    a = await api(("c1", "c2"))
    replaced, merged = await new_code(a, card="c1"), await new_code(a, card="c2")
    status, answer = await a.post("/v1/admin/members/m_1/replace-card", {"new_card": "c1-new"})
    assert status == 201, answer
    status, answer = await a.post("/v1/admin/members/merge", {"merge_id": "mg-1", "from_member_id": "m_2",
                                                              "into_member_id": "m_1", "reason": "one customer"})
    assert status == 201, answer
    answer = await confirm(a, receipt("r1", card="c1-new", coupons=[replaced]))
    assert answer["coupons"] == [{"code": replaced, "status": "applied"}]
    assert by_rule(answer) == {"base": 2, "winter-coupon": 100}
    answer = await confirm(a, receipt("r2", card="c1-new", coupons=[merged]))
    assert answer["coupons"] == [{"code": merged, "status": "applied"}]
    assert (await a.post("/v1/members", {"card": "c3"}))[0] == 201
    # still bound: another member's card cannot use them
    spare = await new_code(a, card="c1-new")
    assert (await confirm(a, receipt("r3", card="c3", coupons=[spare])))["coupons"][0]["status"] == "other_card"


async def test_an_erasure_leaves_no_hash_of_the_card_a_code_was_bound_to(api):
    a = await api(("c1",))
    code = await new_code(a, card="c1")
    card_hashes = await rows(a, "SELECT card FROM cards")
    status, answer = await a.post("/v1/admin/members/m_1/erase", {"reason": "asked to"})
    assert status == 200, answer
    assert await rows(a, "SELECT card FROM coupon_codes WHERE card = ?", card_hashes[0]) == []
    # the card enrolled afresh is someone else: the code is not theirs
    assert (await a.post("/v1/members", {"card": "c1"}))[0] == 201
    assert (await confirm(a, receipt("r1", coupons=[code])))["coupons"][0]["status"] == "other_card"


async def test_a_whole_return_gives_the_coupon_back_a_partial_one_does_not(api):
    a = await api()
    code = await new_code(a)
    body = receipt("r1", coupons=[code])
    body["lines"][0].update(qty=2, amount=20_000, price=10_000)
    body["total"] = 20_000
    await confirm(a, body)
    ref = {"store_id": "S001", "register_id": "K1", "receipt_id": "r1"}

    async def give_back(rid: str):
        status, answer = await a.post("/v1/returns", {"return_id": rid, "store_id": "S001", "register_id": "K1",
                                                      "receipt": ref, "lines": [{"line_no": 1, "qty": 1}]},
                                      as_="register")
        assert status == 201, answer
    await give_back("ret-1")
    assert await rows(a, "SELECT uses FROM coupon_codes") == [(1,)]
    await give_back("ret-2")
    assert await rows(a, "SELECT uses FROM coupon_codes") == [(0,)]
    assert (await confirm(a, receipt("r2", coupons=[code])))["coupons"][0]["status"] == "applied"


async def test_a_cancel_after_a_whole_return_gives_nothing_back_twice(api):
    a = await api()
    code = await new_code(a)
    offer = {"offer_id": "back-once", "rule": "comeback", "from": "2026-12-01", "to": "2026-12-31", "cards": ["c1"],
             "points": 40}
    assert (await a.post("/v1/admin/offers", offer))[0] == 201
    assert by_rule(await confirm(a, receipt("r1", coupons=[code]))) == {"base": 2, "winter-coupon": 100, "comeback": 30}
    status, answer = await a.post("/v1/returns", {
        "return_id": "ret-1", "store_id": "S001", "register_id": "K1",
        "receipt": {"store_id": "S001", "register_id": "K1", "receipt_id": "r1"}, "lines": [{"line_no": 1, "qty": 1}]},
        as_="register")
    assert status == 201, answer
    assert (await a.get("/v1/members/c1"))[1]["offers"][0]["points_left"] == 40
    assert (await confirm(a, receipt("r2", coupons=[code])))["coupons"][0]["status"] == "applied"
    assert (await a.post("/v1/receipts/S001/K1/r1/cancel", as_="register"))[0] == 200
    # r1 gave back its code and its 30 points once, with the return: r2's use and charge stand
    assert (await a.get("/v1/members/c1"))[1]["offers"][0]["points_left"] == 10
    assert (await confirm(a, receipt("r3", coupons=[code])))["coupons"][0]["status"] == "used"
    assert await code_uses(a) == ["r2"]


async def test_twenty_receipts_racing_for_one_single_use_code_one_gets_it(api):
    cards = [f"c{n}" for n in range(20)]
    a = await api(cards)
    code = await new_code(a)
    db = a.app[DATABASE]
    if db.backend == "sqlite":
        # The writer held until all twenty wait, so they are planned as one batch.
        gate = WriterGate()
        held = await gate.close_on(db)
        tasks = [asyncio.create_task(confirm(a, receipt(f"r{n}", card=card, coupons=[code])))
                 for n, card in enumerate(cards)]
        await wait_until(lambda: db.queue_depth() == len(cards))
        gate.release.set()
        await held
    else:   # twenty transactions at once on the pool's connections, racing for the code's row
        tasks = [asyncio.create_task(confirm(a, receipt(f"r{n}", card=card, coupons=[code])))
                 for n, card in enumerate(cards)]
    answers = await asyncio.gather(*tasks)
    statuses = sorted(answer["coupons"][0]["status"] for answer in answers)
    assert statuses == ["applied"] + ["used"] * 19
    assert sum(by_rule(answer).get("winter-coupon", 0) for answer in answers) == 100
    issued = await rows(a, "SELECT SUM(points) FROM posting_rules WHERE rule_id = 'winter-coupon'")
    assert issued == [(100,)]
    assert await rows(a, "SELECT uses FROM coupon_codes") == [(1,)]


async def test_control_group_member_gets_nothing_from_the_rule_and_it_is_recorded(api):
    # sha256("boutique:scarf-week:m_1") puts m_1 in a 20 % control group, m_2 not (test_holdout.py).
    a = await api(("c1", "c2"))
    held = await confirm(a, receipt("r1", card="c1", category="scarves"))
    treated = await confirm(a, receipt("r2", card="c2", category="scarves"))
    assert by_rule(held) == {"base": 2} and by_rule(treated) == {"base": 2, "scarf-week": 5}
    assert await rows(a, "SELECT receipt_id, rule_id, member_id, points FROM holdout_points") == [
        ("r1", "scarf-week", 1, 5)]
    assert (await a.get("/v1/members/c1"))[1]["held_out_of"] == ["scarf-week"]
    assert (await a.get("/v1/members/c2"))[1]["held_out_of"] == []


async def test_member_answer_lists_segments_rfm_offers_and_control_groups(api):
    a = await api()
    await a.put("/v1/admin/segments/staff/members", {"cards": ["c1"]})
    await segment_job(a)
    await a.post("/v1/admin/offers", {"offer_id": "o-1", "rule": "comeback", "cards": ["c1"], "from": "2026-12-01",
                                      "to": "2026-12-31"})
    status, member = await a.get("/v1/members/c1")
    assert status == 200
    assert member["segments"] == ["staff", "newcomers"]
    assert member["rfm"] is None        # no scoring run yet
    assert member["offers"] == [{"rule": "comeback", "from": "2026-12-01", "to": "2026-12-31", "points_left": None}]
    assert member["held_out_of"] == ["scarf-week"]


async def test_the_member_answer_lists_no_offer_of_a_rule_the_program_no_longer_has(api):
    a = await api()
    assert (await a.post("/v1/admin/offers", {"offer_id": "o-1", "rule": "comeback", "cards": ["c1"],
                                              "from": "2026-12-01", "to": "2026-12-31"}))[0] == 201
    program = a.app[PROGRAMS].directory / "program.yaml"
    program.write_text(PROGRAM.replace("  - id: comeback\n    personal: true\n    reward: {points: 30}\n", ""))
    status, reload = await a.post("/v1/admin/rules/reload")
    assert status == 200, reload
    assert by_rule(await confirm(a, receipt("r1"))) == {"base": 2}      # the offer gives nothing now
    assert (await a.get("/v1/members/c1"))[1]["offers"] == []


@pytest.mark.parametrize("coupons, path", [(["x" * 65], "coupons[0]"), ([""], "coupons[0]"), ([7], "coupons[0]"),
                                           ("ABC", "coupons"), (["A"] * 33, "coupons")])
async def test_bad_coupon_lists_are_refused_with_their_path(api, coupons, path):
    a = await api()
    status, body = await a.post("/v1/receipts", receipt("r1", coupons=coupons), as_="register")
    assert status == 422 and body["error"]["code"] == "validation_error"
    assert body["error"]["details"][0]["path"] == path
    assert await rows(a, "SELECT COUNT(*) FROM receipts") == [(0,)]


async def test_a_code_given_back_by_a_cancel_racing_a_new_use_is_used_at_most_once(api):
    a = await api(("c1", "c2", "c3"))
    code = await new_code(a)
    assert (await confirm(a, receipt("r1", card="c1", coupons=[code])))["coupons"][0]["status"] == "applied"
    (cs, cancel), (rs, second) = await asyncio.gather(
        a.post("/v1/receipts/S001/K1/r1/cancel", as_="register"),
        a.post("/v1/receipts", receipt("r2", card="c2", coupons=[code]), as_="register"))
    assert (cs, cancel["status"], rs) == (200, "cancelled", 201), (cancel, second)
    # The cancel came first and the code was free again, or came after and r2 found it used.
    status = second["coupons"][0]["status"]
    assert status in ("applied", "used")
    assert await code_uses(a) == (["r2"] if status == "applied" else [])
    third = await confirm(a, receipt("r3", card="c3", coupons=[code]))
    assert third["coupons"][0]["status"] == ("used" if status == "applied" else "applied")
    assert await rows(a, "SELECT uses FROM coupon_codes") == [(1,)]


async def test_receipts_of_one_member_at_once_never_take_more_than_the_offer_budget(api):
    a = await api(("c1",))
    offer = {"offer_id": "o-1", "rule": "comeback", "cards": ["c1"], "from": "2026-12-01", "to": "2026-12-31",
             "points": 100}
    assert (await a.post("/v1/admin/offers", offer))[0] == 201
    answers = await asyncio.gather(*(confirm(a, receipt(f"r{n}")) for n in range(6)))
    given = sorted(by_rule(answer).get("comeback", 0) for answer in answers)
    assert given == [0, 0, 0, 10, 30, 30, 30][1:], given      # 100 in 30s, then the 10 left
    _, member = await a.get("/v1/members/c1")
    assert [o["points_left"] for o in member["offers"]] == [0]


async def test_the_same_offer_sent_at_once_is_made_once(api):
    a = await api(("c1", "c2"))
    offer = {"offer_id": "o-1", "rule": "comeback", "cards": ["c1", "c2"], "from": "2026-12-01", "to": "2026-12-31",
             "points": 40}
    answers = await asyncio.gather(*(a.post("/v1/admin/offers", offer) for _ in range(6)))
    assert sorted(s for s, _ in answers) == [200] * 5 + [201], answers
    assert all(body == {"offer_id": "o-1", "rule": "comeback", "members": 2, "warnings": []} for _, body in answers), answers


async def test_the_same_list_segment_change_sent_at_once_answers_one_size(api):
    a = await api(("c1", "c2"))
    answers = await asyncio.gather(*(a.put("/v1/admin/segments/staff/members", {"cards": ["c1", "c2"]})
                                     for _ in range(6)))
    assert answers == [(200, {"segment": "staff", "members": 2})] * 6, answers


@pytest.mark.parametrize("moved", ["replaced", "merged"])
async def test_codes_asked_for_a_card_taken_out_of_use_meanwhile_are_refused_not_bound_to_it(api, monkeypatch,
                                                                                             moved):
    """Codes for a card that a replacement or a merge takes out of use just after the card
    was checked: refused as the card now is. Bound to it, no register could ever present them
    (the replacement or merge rebound the member's codes before these were written)."""
    from server import cvm
    a = await api(("c1", "c2"))
    move = (("/v1/admin/members/m_1/replace-card", {"new_card": "c1-new"}) if moved == "replaced" else
            ("/v1/admin/members/merge", {"merge_id": "mg-1", "from_member_id": "m_1", "into_member_id": "m_2",
                                         "reason": "one customer"}))
    real, ran = cvm.member_care.refuse_retired, []

    async def then_moved(app, card, *args, **kwargs):
        await real(app, card, *args, **kwargs)
        if not ran:
            ran.append(await a.post(*move))

    monkeypatch.setattr(cvm.member_care, "refuse_retired", then_moved)
    status, body = await a.post("/v1/admin/coupons/winter/codes", {"count": 1, "card": "c1"})
    assert ran[0][0] == 201, ran
    assert (status, body.get("error", {}).get("code")) == (422, f"card_{moved}"), body
    assert await rows(a, "SELECT code FROM coupon_codes") == []


async def test_an_offer_to_a_segment_holding_a_member_merged_away_goes_to_the_member_that_took_it_over(api):
    """The daily job decided the segment before the merge; the member merged away has no card
    any more, so an offer recorded on it would reach no one. A merge moves offers to the
    member that stays: so does an offer resolved through the segment afterwards."""
    a = await api(cards=("c1", "c2", "c3"))
    await segment_job(a)        # all three enrolled today: newcomers
    merge = {"merge_id": "MG-1", "from_member_id": "m_2", "into_member_id": "m_3", "reason": "one customer"}
    assert (await a.post("/v1/admin/members/merge", merge))[0] == 201
    offer = {"offer_id": "o-new", "rule": "comeback", "segment": "newcomers", "from": "2026-12-01", "to": "2026-12-31"}
    status, body = await a.post("/v1/admin/offers", offer)
    assert (status, body["members"]) == (201, 2), body
    assert await rows(a, "SELECT member_id FROM offer_members WHERE offer_id = 'o-new' ORDER BY member_id") == [
        (1,), (3,)]
    assert by_rule(await confirm(a, receipt("R-1", card="c3")))["comeback"] == 30
