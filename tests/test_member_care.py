"""Member care through the API: the CRM's fields, finding a member by phone, replacing a card,
merging two members and erasing one's personal data; each recorded in the admin audit log,
the ledger verifying after each."""
from __future__ import annotations

import msgspec

from conftest import KEYS, _h, line, receipt
from server.keys import DATABASE, PRIVACY
from storage import admin_audit, audit, ledger
from storage.accounts import ADJUSTMENT
from storage.ledger import PostingRef
from test_error_shape import assert_error_shape

NOW = "2026-11-24T12:00:05+02:00"
SUPPORT_KEY = "test-support-desk"
KEY_LIST = [{"id": "manager", "sha256": _h(KEYS["manager"]), "role": "manager"},
            {"id": "register-S001", "sha256": _h(KEYS["register"]), "role": "register", "stores": ["S001"]},
            {"id": "desk-1", "sha256": _h(SUPPORT_KEY), "role": "support", "name": "Iryna Support"}]


async def care_api(make_api):
    return await make_api(now=NOW, auth={"keys": KEY_LIST})


async def as_support(api, method, path, body=None):
    return await api.call(method, path, body, as_=None, headers={"Authorization": f"Bearer {SUPPORT_KEY}"})


def db_of(api):
    return api.client.server.app[DATABASE]


async def assert_ledger_verifies(api):
    report = await db_of(api).read(audit.verify)
    assert report.ok, report.problems
    assert (await db_of(api).read(admin_audit.verify)).ok
    return report


async def audited(api) -> list[tuple]:
    rows = reversed(await db_of(api).read(admin_audit.rows))
    return [(r["key_id"], r["method"], r["path"], r["status"]) for r in rows]


def refused(status, body, expected_status, code):
    assert status == expected_status, body
    assert_error_shape(body)
    assert body["error"]["code"] == code, body
    return body["error"]


async def enroll(api, card, **fields):
    status, member = await api.post("/v1/members", {"card": card, **fields})
    assert status == 201, member
    return member


async def test_consent_and_crm_id_are_set_by_patch_and_shown_in_the_member_answer(make_api):
    api = await care_api(make_api)
    await enroll(api, "7000000000001")
    await enroll(api, "7000000000002")
    _, fresh = await api.get("/v1/members/7000000000001")
    assert fresh["crm_id"] is None
    assert fresh["consent"] == {"sms": False, "viber": False, "email": False, "push": False}

    status, m = await api.patch("/v1/members/7000000000001", {"consent": {"sms": True, "email": True},
                                                              "crm_id": "CRM-0001"})
    assert status == 200, m
    assert m["crm_id"] == "CRM-0001" and m["consent"] == {"sms": True, "viber": False, "email": True, "push": False}
    # Only the channels given change.
    await api.patch("/v1/members/7000000000001", {"consent": {"email": False}})
    _, m = await api.get("/v1/members/7000000000001", as_="register")
    assert m["consent"] == {"sms": True, "viber": False, "email": False, "push": False}
    assert m["consent_updated_at"].startswith("2026-11-24")

    # Another member's crm_id: 409, and nothing of that request is kept (its phone included).
    status, err = await api.patch("/v1/members/7000000000002", {"crm_id": "CRM-0001", "phone": "+380501112233"})
    refused(status, err, 409, "crm_id_taken")
    _, other = await api.get("/v1/members/7000000000002")
    assert other["crm_id"] is None and other["profile"]["phone_last4"] is None
    # An empty crm_id clears it.
    _, m = await api.patch("/v1/members/7000000000001", {"crm_id": ""})
    assert m["crm_id"] is None
    status, err = await api.patch("/v1/members/7000000000001", {"consent": {"fax": True}})
    refused(status, err, 422, "validation_error")


async def test_support_finds_members_by_phone_however_it_is_written(make_api):
    api = await care_api(make_api)
    a = await enroll(api, "7000000000011", phone="+380 (50) 123-45-67")
    b = await enroll(api, "7000000000012", phone="+380501234567")
    await enroll(api, "7000000000013", phone="+380509999999")
    status, found = await as_support(api, "POST", "/v1/admin/members/search", {"phone": "380-50-123-45-67"})
    assert status == 200, found
    assert [m["member_id"] for m in found["members"]] == [a["member_id"], b["member_id"]]
    assert found["members"][0]["cards_last4"] == ["0011"] and found["members"][0]["phone_last4"] == "4567"
    assert found["members"][0]["balance"]["available"] == 100
    _, none = await as_support(api, "POST", "/v1/admin/members/search", {"phone": "+380500000000"})
    assert none["members"] == []
    # The phone travels in the body: the audit log keeps its keyed digest, never the number.
    rows = await audited(api)
    assert rows == [("desk-1", "POST", "/v1/admin/members/search", 200)] * 2
    assert "4567" not in str(await db_of(api).read(admin_audit.rows))


async def test_a_replaced_card_is_refused_and_the_new_one_has_everything(make_api):
    api = await care_api(make_api)
    member = await enroll(api, "7000000000021")
    await api.post("/v1/admin/adjustments", {"card": "7000000000021", "points": 40, "reason": "r",
                                             "adjustment_id": "A-1"})
    body = receipt("R-1", [line(1, "grocery", 50000)], card="7000000000021")
    assert (await api.post("/v1/receipts", body, as_="register"))[0] == 201
    _, before = await api.get("/v1/members/7000000000021/statement")

    path = f"/v1/admin/members/{member['member_id']}/replace-card"
    status, done = await as_support(api, "POST", path, {"new_card": "7000000000099", "reason": "card lost"})
    assert status == 201, done
    assert done["card_last4"] == "0099" and done["replaced_card_last4"] == "0021" and done["cards_last4"] == ["0099"]
    status, again = await as_support(api, "POST", path, {"new_card": "7000000000099", "reason": "card lost"})
    assert status == 200 and again == {**done, "replayed": True}

    _, now_ = await api.get("/v1/members/7000000000099")
    assert now_["member_id"] == member["member_id"]
    assert now_["balance"] == {"available": 140, "pending": 10, "held": 0}
    _, after = await api.get("/v1/members/7000000000099/statement")
    assert after["postings"] == before["postings"]

    err = refused(*await api.get("/v1/members/7000000000021", as_="register"), 404, "card_replaced")
    assert "ending 0099" in err["message"]
    refused(*await api.post("/v1/receipts", receipt("R-2", [line(1, "grocery", 100)], card="7000000000021"),
                            as_="register"), 422, "card_replaced")
    refused(*await api.post("/v1/admin/adjustments", {"card": "7000000000021", "points": 5, "reason": "r",
                                                      "adjustment_id": "A-2"}), 422, "card_replaced")
    refused(*await api.post("/v1/members", {"card": "7000000000021"}), 409, "card_replaced")
    # A card enrolled to someone else, or one taken out of use, is not given as a new card.
    await enroll(api, "7000000000022")
    refused(*await api.post(path, {"new_card": "7000000000022"}), 409, "card_already_enrolled")
    refused(*await api.post(path, {"new_card": "7000000000021"}), 409, "card_retired")
    refused(*await api.post("/v1/admin/members/m_999/replace-card", {"new_card": "7000000000098"}),
            404, "unknown_member")
    await assert_ledger_verifies(api)
    assert ("desk-1", "POST", path, 201) in await audited(api)


async def test_a_card_cannot_replace_itself_but_a_real_replacement_sent_again_is_a_replay(make_api):
    api = await care_api(make_api)
    member = await enroll(api, "7000000000041")
    path = f"/v1/admin/members/{member['member_id']}/replace-card"

    async def replacements() -> int:
        return (await db_of(api).read(lambda c: c.execute(
            "SELECT count(*) FROM events WHERE type = 'card.replaced'").fetchone()))[0]

    err = refused(*await as_support(api, "POST", path, {"new_card": "7000000000041", "reason": "lost"}),
                  422, "validation_error")
    assert err["details"][0]["path"] == "new_card" and "already this member's card ending 0041" in err["message"]
    refused(*await api.post(path, {"new_card": "7000000000041", "old_card_last4": "0041"}), 422, "validation_error")
    status, still = await api.get("/v1/members/7000000000041")
    assert status == 200 and still["cards_last4"] == ["0041"] and await replacements() == 0

    # A real replacement sent again, with or without the card it replaced, stays a replay.
    status, done = await api.post(path, {"new_card": "7000000000042", "old_card_last4": "0041"})
    assert status == 201 and done["replaced_card_last4"] == "0041", done
    for body in ({"new_card": "7000000000042"}, {"new_card": "7000000000042", "old_card_last4": "0041"}):
        status, again = await api.post(path, body)
        assert status == 200 and again == {**done, "replayed": True}, again
    # The new card naming itself as the old one was never asked: refused, not a replay.
    err = refused(*await api.post(path, {"new_card": "7000000000042", "old_card_last4": "0042"}),
                  422, "validation_error")
    assert err["details"][0]["path"] == "new_card"
    # Nor is another card the member already had.
    await db_of(api).write(lambda c: c.execute(
        "INSERT INTO cards (card, card_last4, member_id, created_at) VALUES (?, '0043', ?, 'z')",
        (api.client.server.app[PRIVACY].card("7000000000043"), int(member["member_id"][2:]))))
    err = refused(*await api.post(path, {"new_card": "7000000000043", "old_card_last4": "0042"}),
                  422, "validation_error")
    assert err["details"][0]["path"] == "new_card"
    _, now_ = await api.get("/v1/members/7000000000042")
    assert now_["cards_last4"] == ["0042", "0043"] and await replacements() == 1
    await assert_ledger_verifies(api)


async def test_which_card_is_replaced_must_be_said_when_the_member_has_several(make_api):
    api = await care_api(make_api)
    member = await enroll(api, "7000000000031")
    path = f"/v1/admin/members/{member['member_id']}/replace-card"
    assert (await api.post(path, {"new_card": "7000000000032"}))[0] == 201
    # Give the member a second card by hand (as an import of two cards would), then replace one.
    await db_of(api).write(lambda c: c.execute(
        "INSERT INTO cards (card, card_last4, member_id, created_at) VALUES ('x-hash', '7777', ?, 'z')",
        (int(member["member_id"][2:]),)))
    err = refused(*await api.post(path, {"new_card": "7000000000033"}), 422, "validation_error")
    assert err["details"][0]["path"] == "old_card_last4" and "0032, 7777" in err["details"][0]["message"]
    status, done = await api.post(path, {"new_card": "7000000000033", "old_card_last4": "7777"})
    assert status == 201 and done["cards_last4"] == ["0032", "0033"]


async def test_a_merge_moves_every_point_through_the_ledger_and_retires_the_cards(make_api):
    api = await care_api(make_api)
    old = await enroll(api, "7000000000041")
    keep = await enroll(api, "7000000000042")
    await api.post("/v1/admin/adjustments", {"card": "7000000000041", "points": 60, "reason": "r",
                                             "adjustment_id": "A-1"})
    assert (await api.post("/v1/receipts", receipt("R-1", [line(1, "grocery", 50000)], card="7000000000041"),
                           as_="register"))[0] == 201
    liability = (await assert_ledger_verifies(api)).liability
    merge = {"merge_id": "MG-1", "from_member_id": old["member_id"], "into_member_id": keep["member_id"],
             "reason": "one customer, two cards"}
    status, done = await api.post("/v1/admin/members/merge", merge)
    assert status == 201, done
    assert done["points_moved"] == 170 and done["lots_moved"] == 3 and done["cards_retired_last4"] == ["0041"]

    _, kept = await api.get("/v1/members/7000000000042")
    assert kept["balance"] == {"available": 260, "pending": 10, "held": 0}
    assert kept["expiring"] == [{"date": "2027-11-24", "points": 270}]
    _, statement = await api.get("/v1/members/7000000000042/statement")
    transfers = [p for p in statement["postings"] if p["kind"] == "transfer"]
    assert sorted(p["points"] for p in transfers) == [10, 60, 100]
    assert {p["counter_account"] for p in transfers} == {f"member:{old['member_id'][2:]}"}
    report = await assert_ledger_verifies(api)
    assert report.liability == liability

    err = refused(*await api.post("/v1/receipts", receipt("R-2", [line(1, "grocery", 100)], card="7000000000041"),
                                  as_="register"), 422, "card_merged")
    assert keep["member_id"] in err["message"]
    refused(*await api.get("/v1/members/7000000000041"), 404, "card_merged")

    status, again = await api.post("/v1/admin/members/merge", merge)
    assert status == 200 and again["replayed"] is True and again["points_moved"] == 170
    refused(*await api.post("/v1/admin/members/merge", {**merge, "reason": "other"}), 409, "idempotency_conflict")
    refused(*await api.post("/v1/admin/members/merge", {**merge, "merge_id": "MG-2"}), 422, "member_merged")
    refused(*await api.post("/v1/admin/members/merge", {**merge, "merge_id": "MG-3",
                                                        "from_member_id": keep["member_id"]}), 422, "validation_error")
    status, _ = await as_support(api, "POST", "/v1/admin/members/merge", {**merge, "merge_id": "MG-4"})
    assert status == 403
    await assert_ledger_verifies(api)
    assert [r[3] for r in await audited(api) if r[2] == "/v1/admin/members/merge"] == [201, 200, 409, 422, 422, 403]


async def test_a_merge_carries_a_debt_along_and_the_ledger_still_verifies(make_api):
    api = await care_api(make_api)
    old = await enroll(api, "7000000000051")
    keep = await enroll(api, "7000000000052")
    source = int(old["member_id"][2:])

    def owe_30(conn):
        # A return of 30 points the member had already spent: the lot goes below zero.
        at = PostingRef(effective_at="2026-11-24T10:00:00.000000Z", created_at="2026-11-24T10:00:00.000000Z")
        lot = ledger.credit(conn, source, 50, "2026-11-24", None, "adjustment", ADJUSTMENT, at)
        ledger.spend(conn, source, 150, "2026-11-24", "adjustment", ADJUSTMENT, at)
        ledger.post(conn, source, lot, "reversal", -30, ADJUSTMENT, at)
    await db_of(api).write(owe_30)
    _, owing = await api.get("/v1/members/7000000000051")
    assert owing["balance"]["available"] == -30
    merge = {"merge_id": "MG-D", "from_member_id": old["member_id"], "into_member_id": keep["member_id"],
             "reason": "duplicate"}
    status, done = await api.post("/v1/admin/members/merge", merge)
    assert status == 201 and done["points_moved"] == -30
    _, kept = await api.get("/v1/members/7000000000052")
    assert kept["balance"]["available"] == 70
    await assert_ledger_verifies(api)


async def test_a_return_and_a_cancel_of_a_merged_members_receipt_take_back_from_where_its_points_went(make_api):
    api = await care_api(make_api)
    old = await enroll(api, "7000000000061")
    keep = await enroll(api, "7000000000062")
    sale = receipt("R-M", [line(1, "grocery", 50000, qty=2, price=25000)], card="7000000000061", redeem=40)
    assert (await api.post("/v1/receipts", sale, as_="register"))[0] == 201        # 9 points, pending; 40 spent
    merge = {"merge_id": "MG-R", "from_member_id": old["member_id"], "into_member_id": keep["member_id"],
             "reason": "one customer"}
    assert (await api.post("/v1/admin/members/merge", merge))[0] == 201
    _, kept = await api.get("/v1/members/7000000000062")
    assert kept["balance"] == {"available": 160, "pending": 9, "held": 0}
    ref = {"store_id": "S001", "register_id": "K01", "receipt_id": "R-M"}
    status, back = await api.post("/v1/returns", {"return_id": "RT-M", "store_id": "S001", "register_id": "K01",
                                                  "receipt": ref, "lines": [{"line_no": 1, "qty": 1}]},
                                  as_="register")
    assert status == 201 and (back["reversed"]["points"], back["refunded"]["points"]) == (4, 20), back
    _, kept = await api.get("/v1/members/7000000000062")
    assert kept["balance"] == {"available": 180, "pending": 5, "held": 0}
    assert (await api.post("/v1/receipts/S001/K01/R-M/cancel", as_="register"))[0] == 200
    _, kept = await api.get("/v1/members/7000000000062")
    assert kept["balance"] == {"available": 200, "pending": 0, "held": 0}
    source = int(old["member_id"][2:])
    left = await db_of(api).read(lambda conn: [lot.remaining for lot in ledger.lots_of(conn, source)])
    assert not any(left)        # nothing owed or left behind on the member merged away
    await assert_ledger_verifies(api)


async def test_erasure_removes_personal_data_and_keeps_the_ledger(make_api):
    api = await care_api(make_api)
    member = await enroll(api, "7000000000061", phone="+380501234567", birthday="1990-05-17", tags=["vip"])
    await api.patch("/v1/members/7000000000061", {"crm_id": "CRM-61", "consent": {"sms": True}})
    assert (await api.post("/v1/receipts", receipt("R-1", [line(1, "grocery", 50000)], card="7000000000061"),
                           as_="register"))[0] == 201
    path = f"/v1/admin/members/{member['member_id']}/replace-card"
    assert (await api.post(path, {"new_card": "7000000000062"}))[0] == 201
    # The same customer's second membership, merged into this one, goes with it.
    twin = await enroll(api, "7000000000064", phone="+380671112233")
    merge = {"merge_id": "MG-T", "from_member_id": twin["member_id"], "into_member_id": member["member_id"],
             "reason": "twin"}
    assert (await api.post("/v1/admin/members/merge", merge))[0] == 201
    liability = (await assert_ledger_verifies(api)).liability
    erase = f"/v1/admin/members/{member['member_id']}/erase"
    assert (await as_support(api, "POST", erase, {"reason": "customer asked"}))[0] == 403

    status, done = await api.post(erase, {"reason": "customer asked"})
    assert status == 200, done
    assert done["cards_removed"] == 3 and done["receipts_scrubbed"] == 1
    assert done["members_erased"] == [member["member_id"], twin["member_id"]]
    for card in ("7000000000061", "7000000000062", "7000000000064"):
        refused(*await api.get(f"/v1/members/{card}"), 404, "unknown_card")
    for phone in ("+380501234567", "+380671112233"):
        _, found = await api.post("/v1/admin/members/search", {"phone": phone})
        assert found["members"] == []
    member_id = int(member["member_id"][2:])
    row = await db_of(api).read(lambda c: c.execute(
        "SELECT phone_hmac, phone_last4, birthday, tags, crm_id, consent_sms, erased_at FROM members WHERE id = ?",
        (member_id,)).fetchone())
    assert tuple(row[:6]) == (None, None, None, "[]", None, 0) and row[6]
    left = await db_of(api).read(lambda c: c.execute(
        "SELECT (SELECT COUNT(*) FROM cards WHERE member_id = ?), (SELECT COUNT(*) FROM retired_cards "
        "WHERE member_id = ?)", (member_id, member_id)).fetchone())
    assert tuple(left) == (0, 0)
    body = await db_of(api).read(lambda c: c.execute("SELECT body FROM receipts WHERE member_id = ?",
                                                     (member_id,)).fetchone()[0])
    assert msgspec.json.decode(ledger.unpack(body))["card"] is None
    _, stream = await api.get("/v1/admin/events?after=0&limit=1000")
    mine = [e for e in stream["events"] if e["member_id"] in (member["member_id"], twin["member_id"])]
    assert mine and all(e["card_last4"] is None for e in mine)
    # The receipt is still there, its answer replayed to the register that sends it again.
    status, replay = await api.post("/v1/receipts", receipt("R-1", [line(1, "grocery", 50000)], card="7000000000061"),
                                    as_="register")
    assert status == 200 and replay["replayed"] is True
    report = await assert_ledger_verifies(api)
    assert report.liability == liability

    status, again = await api.post(erase, {"reason": "customer asked"})
    assert status == 200 and again["replayed"] is True and again["erased_at"] == done["erased_at"]
    other = await enroll(api, "7000000000063")
    refused(*await api.post("/v1/admin/members/merge", {"merge_id": "MG-E", "from_member_id": member["member_id"],
                                                        "into_member_id": other["member_id"], "reason": "x"}), 422,
            "member_erased")
    assert [r[3] for r in await audited(api) if r[2] == erase] == [403, 200, 200]
    # The card number may be enrolled afresh: nothing links it to the erased member.
    assert (await api.post("/v1/members", {"card": "7000000000061"}))[0] == 201
