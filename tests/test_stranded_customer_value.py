"""The upgrade (m039 on SQLite, p015 on PostgreSQL) moves what merges and card replacements
made by earlier versions left behind to where today's put it: the personal offers and list
segments of a member merged away go to the member at the end of its chain of merges, and
coupon codes bound to a card taken out of use go to the card that replaced it or the
surviving member's card. Nothing already in place changes, nor the ledger.

The stranded state is made the way those versions made it: merges and a replacement through
the API with the steps they lacked (moving offers and list segments, rebinding codes) turned
off. The upgrade is then run as a server start runs it, by forgetting that it was applied."""
from __future__ import annotations

import pytest

from backend import POSTGRESQL, connect
from conftest import Api, test_config
from server.app import create_app
from storage import coupons, member_care, segments
from test_merge_keeps_customer_value import assert_ledger_verifies, confirm, offer, points_left, sale

NOW = "2026-12-10T12:00:00+02:00"
PROGRAM = """\
program: {id: boutique, name: Boutique, currency: UAH, timezone: Europe/Kyiv}
points: {value: 100, rounding: floor, activation_delay_days: 0, expiry_days: 365}
tiers: {levels: [{id: base, from: 0}]}
stores: [{id: S001}]
segments:
  define:
    - {id: staff, list: true}
    - {id: vip, list: true}
coupons:
  - {id: gift}
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
  - id: gift-bonus
    when: {coupon: gift}
    reward: {points: 40}
"""
# The rows the upgrade may change, and the ledger it must leave alone, as a user's answers
# do not show them all.
TABLES = {"offer_members": "member_id, offer_id", "offer_charges": "store_id, register_id, receipt_id, offer_id",
          "segment_members": "segment_id, member_id", "segment_spans": "id", "coupon_codes": "code",
          "segments_generation": "id", "postings": "id", "lots": "id", "receipts": "store_id, register_id, receipt_id"}
MIGRATION = "p015_stranded_customer_value" if POSTGRESQL else "m039_stranded_customer_value"
APPLIED = "_loyalty_migrations" if POSTGRESQL else "_sqlite_migrations"


async def serve(aiohttp_client, tmp_path) -> Api:
    program = tmp_path / "program"
    program.mkdir(exist_ok=True)
    (program / "program.yaml").write_text(PROGRAM)
    app = create_app(test_config(tmp_path, NOW, program_dir=program, jobs={"enabled": False}))
    api = Api(await aiohttp_client(app))
    api.app = app
    return api


async def member_id(api: Api, card: str) -> str:
    status, member = await api.get(f"/v1/members/{card}")
    assert status == 200, member
    return member["member_id"]


async def merge(api: Api, merge_id: str, old: str, keep: str) -> None:
    body = {"merge_id": merge_id, "from_member_id": await member_id(api, old),
            "into_member_id": await member_id(api, keep), "reason": "one customer"}
    status, answer = await api.post("/v1/admin/members/merge", body)
    assert status == 201, answer


async def code_for(api: Api, card: str) -> str:
    status, answer = await api.post("/v1/admin/coupons/gift/codes", {"count": 1, "card": card})
    assert status == 201, answer
    return answer["codes"][0]


async def customers(api: Api) -> dict:
    """c1 (m_1) merged into c2 (m_2), m_2 into c3 (m_3), c4 (m_4) replaced by c5, and c6 (m_5)
    merged into c3 with today's merge. Returns the codes bound to c1, c4 and c6."""
    for card in ("c1", "c2", "c3", "c4", "c6"):
        assert (await api.post("/v1/members", {"card": card}))[0] == 201
    await offer(api, "back-c1", "comeback", ["c1"], 100)
    await offer(api, "thanks-both", "thanks", ["c1", "c3"], 50)
    assert await confirm(api, sale("r1", "c1")) == {"base": 2, "comeback": 30, "thanks": 20}
    assert await confirm(api, sale("r2", "c3")) == {"base": 2, "thanks": 20}
    assert await confirm(api, sale("r3", "c3")) == {"base": 2, "thanks": 20}
    for segment, cards in (("staff", ["c1"]), ("vip", ["c2", "c3"])):
        assert (await api.put(f"/v1/admin/segments/{segment}/members", {"cards": cards}))[0] == 200
    return {card: await code_for(api, card) for card in ("c1", "c4", "c6")}


def leave_stranded(monkeypatch) -> None:
    """Merges and replacements as earlier versions made them."""
    monkeypatch.setattr(member_care, "move_offers", lambda conn, source, target: 0)
    monkeypatch.setattr(segments, "take_over_lists", lambda conn, source, target, now: [])
    monkeypatch.setattr(coupons, "rebind_codes", lambda conn, old_card, new_card: None)


async def strand(api: Api, monkeypatch) -> None:
    await merge(api, "MG-6", "c6", "c3")        # today's: nothing left behind
    leave_stranded(monkeypatch)
    await merge(api, "MG-1", "c1", "c2")
    await merge(api, "MG-2", "c2", "c3")
    status, answer = await api.post(f"/v1/admin/members/{await member_id(api, 'c4')}/replace-card",
                                    {"new_card": "c5"})
    assert status == 201, answer
    monkeypatch.undo()


def rows(tmp_path) -> dict:
    conn = connect(tmp_path / "loyalty.db")
    try:
        return {table: [tuple(r) for r in conn.execute(f"SELECT * FROM {table} ORDER BY {key}")]
                for table, key in TABLES.items()}
    finally:
        conn.close()


async def upgrade(api: Api, aiohttp_client, tmp_path) -> Api:
    """The server stopped, started again on a database the upgrade has not run on yet."""
    await api.client.close()
    conn = connect(tmp_path / "loyalty.db")
    with conn:
        conn.execute(f"DELETE FROM {APPLIED} WHERE name = ?", (MIGRATION,))
        conn.commit()
    conn.close()
    return await serve(aiohttp_client, tmp_path)


async def coupon_status(api: Api, rid: str, card: str, code: str) -> tuple[str, dict[str, int]]:
    status, answer = await api.post("/v1/receipts", {**sale(rid, card), "coupons": [code]}, as_="register")
    assert status == 201, answer
    return answer["coupons"][0]["status"], {r["rule"]: r["points"] for r in answer["accrued"]["by_rule"]}


async def test_the_upgrade_moves_what_earlier_merges_and_replacements_left_behind(
        aiohttp_client, tmp_path, monkeypatch):
    api = await serve(aiohttp_client, tmp_path)
    codes = await customers(api)
    await strand(api, monkeypatch)
    # As earlier versions left it: c3 has only its own offer and segment, the customer counts
    # twice in vip, and the codes of c1 and c4 belong to cards no register can present again.
    assert await points_left(api, "c3") == {"thanks": 10}
    assert (await api.get("/v1/members/c3"))[1]["segments"] == ["vip"]
    assert (await api.put("/v1/admin/segments/vip/members", {"cards": ["c3"]}))[1]["members"] == 2
    assert (await coupon_status(api, "r4", "c3", codes["c1"]))[0] == "other_card"
    assert (await coupon_status(api, "r5", "c5", codes["c4"]))[0] == "other_card"
    before = rows(tmp_path)

    api = await upgrade(api, aiohttp_client, tmp_path)
    upgraded = rows(tmp_path)
    # The ledger as it was (a receipt's row may keep what it took of an offer in another form).
    assert {table: upgraded[table] for table in ("postings", "lots")} == {table: before[table] for table in ("postings", "lots")}
    # c1's offers went through c2 to c3: the one both held keeps the larger budget left
    # (c1's 30, not the sum), with its dates.
    assert await points_left(api, "c3") == {"comeback": 70, "thanks": 30}
    _, survivor = await api.get("/v1/members/c3")
    assert [(o["rule"], o["from"], o["to"]) for o in survivor["offers"]] == [
        ("comeback", "2026-12-01", "2026-12-31"), ("thanks", "2026-12-01", "2026-12-31")]
    assert survivor["segments"] == ["staff", "vip"]
    for segment in ("staff", "vip"):
        status, size = await api.put(f"/v1/admin/segments/{segment}/members", {"cards": ["c3"]})
        assert status == 200 and size["members"] == 1, (segment, size)
    assert await confirm(api, sale("r6", "c3")) == {"base": 2, "staff-bonus": 10, "comeback": 30, "thanks": 20}
    assert await coupon_status(api, "r7", "c3", codes["c1"]) == (
        "applied", {"base": 2, "staff-bonus": 10, "comeback": 30, "thanks": 10, "gift-bonus": 40})
    # A cancel of c1's receipt gives back to the budgets it took from, now c3's.
    assert (await api.post("/v1/receipts/S001/K1/r1/cancel", as_="register"))[0] == 200
    assert await points_left(api, "c3") == {"comeback": 40, "thanks": 20}
    assert (await coupon_status(api, "r8", "c5", codes["c4"]))[0] == "applied"
    assert (await coupon_status(api, "r9", "c3", codes["c6"]))[0] == "applied"
    await assert_ledger_verifies(api)

    after = rows(tmp_path)
    api = await upgrade(api, aiohttp_client, tmp_path)
    assert rows(tmp_path) == after, "a second run changed something"
    assert (await api.get("/v1/members/c3"))[1]["segments"] == ["staff", "vip"]


async def test_a_database_with_nothing_left_behind_is_not_changed(aiohttp_client, tmp_path):
    api = await serve(aiohttp_client, tmp_path)
    await customers(api)
    await merge(api, "MG-1", "c1", "c2")
    await merge(api, "MG-2", "c2", "c3")
    status, _ = await api.post(f"/v1/admin/members/{await member_id(api, 'c4')}/replace-card", {"new_card": "c5"})
    assert status == 201
    before = rows(tmp_path)
    api = await upgrade(api, aiohttp_client, tmp_path)
    assert rows(tmp_path) == before
    await assert_ledger_verifies(api)
