"""List segments, personal offers and coupon codes through the admin API."""
from __future__ import annotations

import dataclasses
from datetime import date

import pytest
from conftest import KEYS, POSTGRESQL, Api, test_config

from server import cvm, report_campaign
from server.app import create_app
from storage import coupons, offers
from storage.segments import ScoreRange, SegmentDefinition

NOW = "2026-11-24T12:00:05+02:00"
DEFS = cvm.Definitions(
    segments=[SegmentDefinition("staff", list=True), SegmentDefinition("champions", f=ScoreRange(4, 5))],
    coupons={"xmas": coupons.Campaign("xmas", 1, date(2026, 12, 20), date(2026, 12, 31))},
    personal={"comeback": True, "base": False})


@pytest.fixture
def api(aiohttp_client, tmp_path):
    async def make(defs: cvm.Definitions = DEFS) -> Api:
        app = create_app(test_config(tmp_path, NOW))
        app[cvm.DEFINITIONS] = lambda program: defs
        a = Api(await aiohttp_client(app))
        a.app = app
        for card in ("c1", "c2", "c3"):
            assert (await a.post("/v1/members", {"card": card}))[0] == 201
        return a
    return make


async def test_list_segment_members_added_and_removed_idempotently(api):
    a = await api()
    status, body = await a.put("/v1/admin/segments/staff/members", {"cards": ["c1", "c2", "c1"]})
    assert (status, body) == (200, {"segment": "staff", "members": 2})
    assert (await a.put("/v1/admin/segments/staff/members", {"cards": ["c2"]}))[1]["members"] == 2
    status, body = await a.call("DELETE", "/v1/admin/segments/staff/members", {"cards": ["c1"]})
    assert (status, body) == (200, {"segment": "staff", "members": 1})
    assert (await a.call("DELETE", "/v1/admin/segments/staff/members", {"cards": ["c1"]}))[1]["members"] == 1


async def test_segment_refusals(api):
    a = await api()
    status, body = await a.put("/v1/admin/segments/staff/members", {"cards": ["c1", "nobody"]})
    assert status == 422 and body["error"]["code"] == "unknown_card"
    assert body["error"]["details"] == [{"path": "cards[1]", "message": "is not an enrolled card"}]
    assert (await a.put("/v1/admin/segments/staff/members", {"cards": ["c1"]}))[1]["members"] == 1
    status, body = await a.put("/v1/admin/segments/champions/members", {"cards": ["c1"]})
    assert status == 422 and body["error"]["code"] == "segment_not_list"
    status, body = await a.put("/v1/admin/segments/nope/members", {"cards": ["c1"]})
    assert status == 404 and body["error"]["code"] == "unknown_segment"
    status, body = await a.put("/v1/admin/segments/staff/members", {"cards": []})
    assert status == 422 and body["error"]["details"][0]["path"] == "cards"
    status, _ = await a.put("/v1/admin/segments/staff/members", {"cards": ["c1"]}, as_="register")
    assert status == 403


async def test_offer_created_repeated_and_conflicting(api):
    a = await api()
    offer = {"offer_id": "o-1", "rule": "comeback", "cards": ["c1", "c2"], "from": "2026-12-01",
             "to": "2026-12-31", "points": 500}
    assert await a.post("/v1/admin/offers", offer) == (201, {"offer_id": "o-1", "rule": "comeback", "members": 2,
                                                             "warnings": []})
    assert await a.post("/v1/admin/offers", offer) == (200, {"offer_id": "o-1", "rule": "comeback", "members": 2,
                                                             "warnings": []})
    status, body = await a.post("/v1/admin/offers", {**offer, "points": 600})
    assert status == 409 and body["error"]["code"] == "idempotency_conflict"
    db = a.app[cvm.DATABASE]
    got = await db.read(lambda conn: [offers.offers_for(conn, m, date(2026, 12, 5)) for m in (1, 2, 3)])
    assert got == [{"comeback": 500}, {"comeback": 500}, {}]
    assert await db.read(lambda conn: offers.offers_for(conn, 1, date(2027, 1, 1))) == {}
    # One offer.assigned per member given it, written with the assignment: none for the repeat
    # nor for the refused body.
    assigned = await offer_events(a)
    assert [(e["member_id"], e["card_last4"], e["data"]) for e in assigned] == [
        (m, c, {"offer_id": "o-1", "rule": "comeback", "from": "2026-12-01", "to": "2026-12-31", "points": 500})
        for m, c in (("m_1", "c1"), ("m_2", "c2"))]


async def offer_events(a: Api) -> list[dict]:
    status, body = await a.get("/v1/admin/events?limit=1000")
    assert status == 200, body
    return [e for e in body["events"] if e["type"] == "offer.assigned"]


async def test_offer_to_a_segment_resolves_its_members_now(api):
    a = await api()
    await a.put("/v1/admin/segments/staff/members", {"cards": ["c2", "c3"]})
    body = {"offer_id": "o-staff", "rule": "comeback", "segment": "staff", "from": "2026-12-01", "to": "2026-12-02"}
    assert (await a.post("/v1/admin/offers", body))[1]["members"] == 2
    await a.put("/v1/admin/segments/staff/members", {"cards": ["c1"]})     # later members do not get it
    got = await a.app[cvm.DATABASE].read(lambda conn: [offers.offers_for(conn, m, date(2026, 12, 1)) for m in (1, 2)])
    assert got == [{}, {"comeback": None}]
    assigned = await offer_events(a)
    assert [(e["member_id"], e["data"]["offer_id"], e["data"]["points"]) for e in assigned] == [
        ("m_2", "o-staff", None), ("m_3", "o-staff", None)]


async def test_offer_refusals(api):
    a = await api()
    base = {"offer_id": "o-2", "rule": "comeback", "cards": ["c1"], "from": "2026-12-01", "to": "2026-12-31"}
    status, body = await a.post("/v1/admin/offers", {**base, "rule": "base"})
    assert status == 422 and body["error"]["code"] == "rule_not_personal"
    status, body = await a.post("/v1/admin/offers", {**base, "rule": "nope"})
    assert status == 422 and body["error"]["code"] == "unknown_rule"
    status, body = await a.post("/v1/admin/offers", {**base, "segment": "staff"})
    assert status == 422 and body["error"]["details"][0]["path"] == "cards"
    status, body = await a.post("/v1/admin/offers", {**base, "to": "2026-11-30"})
    assert status == 422 and body["error"]["details"] == [{"path": "to", "message": "must not be before from"}]
    status, body = await a.post("/v1/admin/offers", {**base, "cards": ["zzz"]})
    assert status == 422 and body["error"]["code"] == "unknown_card"
    status, body = await a.post("/v1/admin/offers", {**base, "cards": None, "segment": "nope"})
    assert status == 422 and body["error"]["code"] == "unknown_segment"


async def test_a_misspelt_segment_rule_or_campaign_is_answered_with_the_name_meant(api):
    a = await api()
    status, body = await a.put("/v1/admin/segments/staf/members", {"cards": ["c1"]})
    assert (status, body["error"]["message"]) == (404, "the program defines no segment staf, did you mean 'staff'?")
    offer = {"offer_id": "o-3", "rule": "comeback", "segment": "staff", "from": "2026-12-01", "to": "2026-12-31"}
    status, body = await a.post("/v1/admin/offers", {**offer, "rule": "comebak"})
    assert (status, body["error"]["details"]) == (422, [
        {"path": "rule", "message": "is comebak, a rule the program does not have, did you mean 'comeback'?"}])
    status, body = await a.post("/v1/admin/offers", {**offer, "segment": "staf"})
    assert (status, body["error"]["details"]) == (422, [
        {"path": "segment", "message": "is staf, a segment the program does not define, did you mean 'staff'?"}])
    status, body = await a.post("/v1/admin/coupons/xmass/codes", {"count": 1})
    assert (status, body["error"]["message"]) == (404, "the program defines no coupon campaign xmass, did you mean "
                                                       "'xmas'?")
    status, body = await a.post("/v1/admin/coupons/easter/codes", {"count": 1})     # nothing near: no guess
    assert body["error"]["message"] == "the program defines no coupon campaign easter"


async def test_coupon_codes_generated_for_a_campaign(api):
    a = await api()
    status, body = await a.post("/v1/admin/coupons/xmas/codes", {"count": 50})
    assert status == 201 and body["campaign"] == "xmas" and len(set(body["codes"])) == 50
    status, bound = await a.post("/v1/admin/coupons/xmas/codes", {"count": 1, "card": "c1"})
    privacy = a.app[cvm.PRIVACY]
    judged = await a.app[cvm.DATABASE].read(lambda conn: coupons.judge(
        conn, [body["codes"][0], bound["codes"][0]], privacy.card("c2"), date(2026, 12, 24), DEFS.coupons,
        privacy.coupon))
    assert [s for _, s in judged.statuses] == [coupons.USABLE, "other_card"]
    status, err = await a.post("/v1/admin/coupons/easter/codes", {"count": 1})
    assert status == 404 and err["error"]["code"] == "unknown_coupon_campaign"
    status, err = await a.post("/v1/admin/coupons/xmas/codes", {"count": 0})
    assert status == 422 and err["error"]["details"][0]["path"] == "count"


async def test_a_drawn_code_meeting_a_stored_one_answers_try_again(api, monkeypatch):
    a = await api()
    _, first = await a.post("/v1/admin/coupons/xmas/codes", {"count": 1})
    drawn = iter([first["codes"][0], coupons.new_code()])
    monkeypatch.setattr(coupons, "new_code", lambda: next(drawn))
    resp = await a.client.post("/v1/admin/coupons/xmas/codes", json={"count": 2},
                               headers={"Authorization": f"Bearer {KEYS['manager']}"})
    body = await resp.json()
    assert resp.status == 503 and body["error"]["code"] == "try_again" and resp.headers["Retry-After"] == "0"
    monkeypatch.undo()
    status, again = await a.post("/v1/admin/coupons/xmas/codes", {"count": 2})
    assert status == 201 and len(set(again["codes"])) == 2 and first["codes"][0] not in again["codes"]


async def test_no_codes_are_bound_to_a_card_taken_out_of_use(api):
    a = await api()
    assert (await a.post("/v1/admin/members/m_1/replace-card", {"new_card": "c1-new"}))[0] == 201
    status, err = await a.post("/v1/admin/coupons/xmas/codes", {"count": 1, "card": "c1"})
    assert status == 422 and err["error"]["code"] == "card_replaced", err
    assert err["error"]["details"][0]["path"] == "card"
    stored = await a.app[cvm.DATABASE].read(lambda conn: conn.execute("SELECT COUNT(*) FROM coupon_codes").fetchone())
    assert stored[0] == 0
    assert (await a.post("/v1/admin/coupons/xmas/codes", {"count": 1, "card": "c1-new"}))[0] == 201


async def cards_taken_out_of_use(a: Api) -> None:
    """c1 replaced by c1-new; c2's member merged into c3's."""
    assert (await a.post("/v1/admin/members/m_1/replace-card", {"new_card": "c1-new"}))[0] == 201
    merge = {"merge_id": "MG-1", "from_member_id": "m_2", "into_member_id": "m_3", "reason": "one person"}
    assert (await a.post("/v1/admin/members/merge", merge))[0] == 201


async def test_segment_calls_say_which_cards_a_replacement_or_a_merge_took_out_of_use(api):
    a = await api()
    await cards_taken_out_of_use(a)
    for method in ("PUT", "DELETE"):
        status, body = await a.call(method, "/v1/admin/segments/staff/members", {"cards": ["c3", "c1"]})
        assert status == 422 and body["error"]["code"] == "card_replaced", body
        [replaced] = body["error"]["details"]
        assert replaced["path"] == "cards[1]" and "replaced" in replaced["message"] and "use that card" in replaced["message"]
    status, body = await a.put("/v1/admin/segments/staff/members", {"cards": ["c2", "nobody", "c1"]})
    assert status == 422 and body["error"]["code"] == "card_merged"
    assert [(d["path"], d["message"].split(" ")[-1]) for d in body["error"]["details"]] == [
        ("cards[0]", "card"), ("cards[1]", "card"), ("cards[2]", "card")]
    assert "merged into m_3" in body["error"]["details"][0]["message"]
    assert body["error"]["details"][1]["message"] == "is not an enrolled card"
    assert "replaced" in body["error"]["details"][2]["message"]
    # nothing was changed: the segment is still empty
    assert (await a.put("/v1/admin/segments/staff/members", {"cards": ["c3"]}))[1]["members"] == 1


async def test_an_offer_to_a_card_out_of_use_says_which_card_to_use_and_assigns_nothing(api):
    a = await api()
    await cards_taken_out_of_use(a)
    offer = {"offer_id": "o-9", "rule": "comeback", "cards": ["c2"], "from": "2026-12-01", "to": "2026-12-31"}
    status, body = await a.post("/v1/admin/offers", offer)
    assert status == 422 and body["error"]["code"] == "card_merged"
    assert body["error"]["details"][0]["path"] == "cards[0]" and "m_3" in body["error"]["details"][0]["message"]
    status, body = await a.post("/v1/admin/offers", {**offer, "cards": ["c3"]})
    assert (status, body["members"]) == (201, 1)     # the refused one left no offer behind


async def test_a_referrer_card_out_of_use_is_refused_naming_the_card_to_use(api):
    a = await api()
    await cards_taken_out_of_use(a)
    for referrer, code in (("c1", "card_replaced"), ("c2", "card_merged")):
        status, body = await a.post("/v1/members", {"card": "c9", "referred_by": referrer})
        assert status == 422 and body["error"]["code"] == code, body
        assert body["error"]["details"][0]["path"] == "referred_by"
    status, body = await a.get("/v1/members/c9")
    assert status == 404 and body["error"]["code"] == "unknown_card"     # nothing was enrolled
    assert (await a.post("/v1/members", {"card": "c9", "referred_by": "c1-new"}))[0] == 201


async def test_an_offer_or_codes_with_dates_already_past_are_taken_with_warnings(api):
    """Not refused: a receipt sent late is judged at its ts, when they were valid."""
    periods = {"comeback": report_campaign.CampaignRule("comeback", None, date(2026, 11, 1), date(2026, 11, 30))}
    a = await api(dataclasses.replace(
        DEFS, rules=periods, coupons={**DEFS.coupons, "autumn": coupons.Campaign("autumn", 1, None, date(2026, 11, 1))}))
    offer = {"offer_id": "o-past", "rule": "comeback", "cards": ["c1"], "from": "2026-10-01", "to": "2026-10-31"}
    status, body = await a.post("/v1/admin/offers", offer)
    assert (status, body["members"]) == (201, 1)
    assert body["warnings"] == [
        "the offer ends 2026-10-31, before today (2026-11-24): it applies only to receipts dated up to then",
        "the rule's period starts 2026-11-01, after the offer ends (2026-10-31): the offer never applies"]
    status, body = await a.post("/v1/admin/offers", {**offer, "offer_id": "o-late", "from": "2026-12-01",
                                                     "to": "2026-12-31"})
    assert status == 201 and body["warnings"] == [
        "the rule's period ends 2026-11-30, before the offer starts (2026-12-01): the offer never applies"]
    status, body = await a.post("/v1/admin/offers", {**offer, "offer_id": "o-wide", "from": "2026-11-20",
                                                     "to": "2026-12-10"})
    assert status == 201 and body["warnings"] == [
        "the offer ends 2026-12-10, after the rule's period (2026-11-30): it applies up to 2026-11-30"]
    status, body = await a.post("/v1/admin/offers", {**offer, "offer_id": "o-fine", "from": "2026-11-24",
                                                     "to": "2026-11-30"})
    assert (status, body["warnings"]) == (201, [])
    # the warnings are said again when the same offer is sent again
    status, body = await a.post("/v1/admin/offers", offer)
    assert status == 200 and len(body["warnings"]) == 2

    status, body = await a.post("/v1/admin/coupons/autumn/codes", {"count": 2})
    assert status == 201 and len(body["codes"]) == 2
    assert body["warnings"] == ["the campaign's codes are valid until 2026-11-01, before today (2026-11-24): they "
                                "apply only to receipts dated up to then"]
    status, body = await a.post("/v1/admin/coupons/xmas/codes", {"count": 1})
    assert (status, body["warnings"]) == (201, [])


@pytest.mark.skipif(not POSTGRESQL, reason="members are locked by row only on PostgreSQL; SQLite's one writer "
                                           "reads the cards and writes in one go")
@pytest.mark.parametrize("write", ["offer", "list segment"])
async def test_an_offer_or_a_list_segment_for_a_card_merged_after_its_look_up_is_refused_not_left_behind(
        api, monkeypatch, write):
    """A card looked up just before a merge of its member committed: the merge moved the
    member's offers and list segments before this write, so what it wrote stayed on the
    member merged away, which no card reaches, and the customer never had it. Refused as the
    card now is, as when the merge came first."""
    from server.keys import DATABASE
    a = await api()
    merge = {"merge_id": "MG-1", "from_member_id": "m_2", "into_member_id": "m_3", "reason": "one person"}
    assert (await a.post("/v1/admin/members/merge", merge))[0] == 201
    real, looked_up = cvm.member_id_of_card, []

    def before_the_merge(conn, digest):
        looked_up.append(digest)
        return 2 if len(looked_up) == 1 else real(conn, digest)

    monkeypatch.setattr(cvm, "member_id_of_card", before_the_merge)
    if write == "offer":
        status, body = await a.post("/v1/admin/offers", {"offer_id": "o-1", "rule": "comeback", "cards": ["c2"],
                                                         "from": "2026-12-01", "to": "2026-12-31"})
    else:
        status, body = await a.put("/v1/admin/segments/staff/members", {"cards": ["c2"]})
    assert (status, body.get("error", {}).get("code")) == (422, "card_merged"), body
    left = await a.app[DATABASE].read(lambda conn: conn.execute(
        "SELECT (SELECT COUNT(*) FROM offer_members WHERE member_id = 2), "
        "(SELECT COUNT(*) FROM segment_members WHERE member_id = 2)").fetchone())
    assert tuple(left) == (0, 0)


async def erased(a: Api, member_id: str) -> None:
    status, body = await a.post(f"/v1/admin/members/{member_id}/erase", {"reason": "customer asked"})
    assert status == 200, body


async def test_an_erased_member_leaves_its_list_segments_and_gets_no_offer_to_them(api):
    a = await api()
    assert (await a.put("/v1/admin/segments/staff/members", {"cards": ["c1", "c3"]}))[1]["members"] == 2
    merge = {"merge_id": "MG-1", "from_member_id": "m_2", "into_member_id": "m_3", "reason": "one person"}
    assert (await a.post("/v1/admin/members/merge", merge))[0] == 201
    await erased(a, "m_3")
    # The segment counts only the member a card still reaches; m_3 left it when erased.
    assert (await a.put("/v1/admin/segments/staff/members", {"cards": ["c1"]}))[1]["members"] == 1
    body = {"offer_id": "o-staff", "rule": "comeback", "segment": "staff", "from": "2026-12-01", "to": "2026-12-02"}
    assert (await a.post("/v1/admin/offers", body))[1]["members"] == 1
    assert [e["member_id"] for e in await offer_events(a)] == ["m_1"]


async def test_an_offer_to_a_computed_segment_skips_members_erased_since_its_last_run(api):
    """The daily job takes an erased member out of the rfm and when segments at its next
    run; an offer assigned before that reaches only members a card reaches, and the member
    merged into the erased one (erased with it) is not given it in its place either."""
    from server.keys import CLOCK, DATABASE
    from storage import segments
    a = await api()
    db, now = a.app[DATABASE], a.app[CLOCK].now()

    def ran(conn):
        run_id = segments.start_run(conn, now.date(), 180, now)
        segments.write_changes(conn, run_id, now, segments.Changes([("champions", m) for m in (1, 2, 3)], []))
        segments.finish_run(conn, run_id, 3, now)
    await db.write(ran)
    merge = {"merge_id": "MG-1", "from_member_id": "m_2", "into_member_id": "m_3", "reason": "one person"}
    assert (await a.post("/v1/admin/members/merge", merge))[0] == 201
    await erased(a, "m_3")
    body = {"offer_id": "o-champ", "rule": "comeback", "segment": "champions", "from": "2026-12-01",
            "to": "2026-12-02"}
    assert (await a.post("/v1/admin/offers", body))[1]["members"] == 1
    assert [e["member_id"] for e in await offer_events(a)] == ["m_1"]
    got = await db.read(lambda conn: [offers.offers_for(conn, m, date(2026, 12, 1)) for m in (1, 2, 3)])
    assert got == [{"comeback": None}, {}, {}]


async def test_an_erased_members_offers_end_on_the_day_of_its_erasure(api):
    """Those the member merged into it brought too; offers over by then stay as they were,
    and other members keep theirs."""
    from server.keys import DATABASE
    a = await api()
    for offer_id, first, last in (("o-past", "2026-11-01", "2026-11-10"), ("o-now", "2026-11-20", "2026-12-31"),
                                  ("o-later", "2026-12-01", "2026-12-31")):
        body = {"offer_id": offer_id, "rule": "comeback", "cards": ["c1", "c2"], "from": first, "to": last}
        assert (await a.post("/v1/admin/offers", body))[0] == 201
    merge = {"merge_id": "MG-1", "from_member_id": "m_2", "into_member_id": "m_3", "reason": "one person"}
    assert (await a.post("/v1/admin/members/merge", merge))[0] == 201
    await erased(a, "m_3")

    def held(conn):
        return {m: [tuple(r) for r in conn.execute(
            "SELECT offer_id, from_date, to_date FROM offer_members WHERE member_id = ? ORDER BY offer_id", (m,))]
            for m in (1, 3)}
    assert await a.app[DATABASE].read(held) == {
        1: [("o-later", "2026-12-01", "2026-12-31"), ("o-now", "2026-11-20", "2026-12-31"),
            ("o-past", "2026-11-01", "2026-11-10")],
        3: [("o-now", "2026-11-20", "2026-11-24"), ("o-past", "2026-11-01", "2026-11-10")]}
    got = await a.app[DATABASE].read(lambda conn: [offers.offers_for(conn, m, date(2026, 12, 5)) for m in (1, 3)])
    assert got == [{"comeback": None}, {}]
