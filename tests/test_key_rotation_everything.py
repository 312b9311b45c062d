"""`privacy rotate-key` leaves nothing under an earlier key: besides cards and phones it
wraps coupon codes, the cards codes are bound to, and the card hash inside every stored
receipt body (whose fingerprint follows). Before it has run, a server with the new key
still finds every code and the card it is bound to; codes bound to a card replaced, merged or
erased before or while it runs end bound, under the new key, to the card that took its place
(or to no one's)."""
from __future__ import annotations

import asyncio
import hashlib

import pytest
import yaml
from conftest import FIRST_PRIVACY, ROTATED_PRIVACY, Api, connect, rotate_keys, serve_program

from storage import member_care, receipt_takes
from storage.ledger import unpack

NOW = "2026-12-10T12:00:00+02:00"
PROGRAM = """\
program: {id: boutique, name: Boutique, currency: UAH, timezone: Europe/Kyiv}
points: {value: 100, rounding: floor, activation_delay_days: 0, expiry_days: 365}
tiers: {levels: [{id: base, from: 0}]}
stores: [{id: S001}]
coupons:
  - {id: winter, uses_per_code: 1, valid: {from: "2026-12-01", to: "2026-12-31"}}
rules:
  - id: base
    reward: {percent: 2}
  - id: winter-coupon
    when: {coupon: winter}
    reward: {points: 100}
"""


async def serve(aiohttp_client, tmp_path, privacy) -> Api:
    return await serve_program(aiohttp_client, tmp_path, NOW, PROGRAM, privacy)


def sale(receipt_id: str, card: str, codes: list[str]) -> dict:
    return {"receipt_id": receipt_id, "store_id": "S001", "register_id": "K1", "ts": NOW, "card": card,
            "coupons": codes, "lines": [{"line_no": 1, "sku": "x", "category": "coats", "qty": 1, "price": 10_000,
                                         "amount": 10_000}], "total": 10_000}


async def statuses(api: Api, body: dict, expected: int = 201) -> list[str]:
    status, answer = await api.post("/v1/receipts", body, as_="register")
    assert status == expected, answer
    return [c["status"] for c in answer["coupons"]]


async def rotate(tmp_path) -> None:
    assert await rotate_keys(tmp_path, NOW, 2) == 0


def hashes_left(tmp_path) -> list[str]:
    """Every stored hash of a card or code not under key k2."""
    with connect(tmp_path / "loyalty.db") as conn:
        stored = [r[0] for r in conn.execute(
            "SELECT card FROM cards UNION ALL SELECT code FROM coupon_codes UNION ALL "
            "SELECT card FROM coupon_codes WHERE card IS NOT NULL UNION ALL SELECT code FROM coupon_uses")]
        stored += [code for (record,) in conn.execute("SELECT takes FROM receipts WHERE takes IS NOT NULL")
                   for code in receipt_takes.decode(record).codes]
        bodies = [unpack(r[0]) for r in conn.execute("SELECT body FROM receipts WHERE member_id IS NOT NULL")]
        for (body, fingerprint) in conn.execute("SELECT body, body_sha256 FROM receipts"):
            assert hashlib.sha256(unpack(body)).digest() == fingerprint
    stored += [yaml.safe_load(body)["card"] for body in bodies]
    return [h for h in stored if not h.startswith("~k2~")]


async def test_codes_bodies_and_bound_cards_are_wrapped_and_still_work(aiohttp_client, tmp_path):
    first = await serve(aiohttp_client, tmp_path, FIRST_PRIVACY)
    for card in ("c1", "c2"):
        assert (await first.post("/v1/members", {"card": card}))[0] == 201
    codes = {}
    for name, card in (("bound", "c1"), ("free", None), ("spare", "c1")):
        bound = {"card": card} if card else {}
        status, body = await first.post("/v1/admin/coupons/winter/codes", {"count": 1, **bound})
        assert status == 201, body
        codes[name] = body["codes"][0]
    assert await statuses(first, sale("r1", "c1", [codes["free"]])) == ["applied"]
    await first.client.close()

    # The new key in force, nothing wrapped yet: codes and the card a code is bound to are found.
    before = await serve(aiohttp_client, tmp_path, ROTATED_PRIVACY)
    assert await statuses(before, sale("r2", "c2", [codes["bound"]])) == ["other_card"]
    assert await statuses(before, sale("r3", "c1", [codes["bound"]])) == ["applied"]
    await before.client.close()
    assert hashes_left(tmp_path)

    await rotate(tmp_path)
    assert hashes_left(tmp_path) == []

    after = await serve(aiohttp_client, tmp_path, ROTATED_PRIVACY)
    # A receipt confirmed before is a replay, under its wrapped fingerprint.
    status, again = await after.post("/v1/receipts", sale("r1", "c1", [codes["free"]]), as_="register")
    assert status == 200 and again["replayed"] is True
    assert (await after.post("/v1/receipts", sale("r1", "c1", []), as_="register"))[0] == 409
    # The code's use moved with it: used, until a cancel gives it back.
    assert await statuses(after, sale("r4", "c2", [codes["free"]])) == ["used"]
    assert (await after.post("/v1/receipts/S001/K1/r1/cancel", as_="register"))[0] == 200
    assert await statuses(after, sale("r5", "c2", [codes["free"]])) == ["applied"]
    assert await statuses(after, sale("r6", "c2", [codes["spare"]])) == ["other_card"]
    assert await statuses(after, sale("r7", "c1", [codes["spare"]])) == ["applied"]


async def bind(api: Api, card: str) -> str:
    status, body = await api.post("/v1/admin/coupons/winter/codes", {"count": 1, "card": card})
    assert status == 201, body
    return body["codes"][0]


async def member_id(api: Api, card: str) -> str:
    return (await api.get(f"/v1/members/{card}"))[1]["member_id"]


async def replace_merge_and_erase(api: Api) -> None:
    """c1 replaced by c1-new, c2's member merged into c3's, c4's member erased."""
    status, body = await api.post(f"/v1/admin/members/{await member_id(api, 'c1')}/replace-card",
                                  {"new_card": "c1-new"})
    assert status == 201, body
    status, body = await api.post("/v1/admin/members/merge", {
        "merge_id": "MG-1", "from_member_id": await member_id(api, "c2"),
        "into_member_id": await member_id(api, "c3"), "reason": "one customer"})
    assert status == 201, body
    status, body = await api.post(f"/v1/admin/members/{await member_id(api, 'c4')}/erase", {"reason": "asked"})
    assert status == 200, body


async def codes_after_rotation(aiohttp_client, tmp_path, codes: dict[str, list[str]]) -> None:
    """Each code used once the rotation is done: c1's by its new card, c2's by the member it
    was merged into, the erased member's by nobody (its card enrolled afresh included)."""
    assert hashes_left(tmp_path) == []
    after = await serve(aiohttp_client, tmp_path, ROTATED_PRIVACY)
    assert (await after.post("/v1/members", {"card": "c4"}))[0] == 201
    for n, code in enumerate(codes["c4"]):
        assert await statuses(after, sale(f"e{n}", "c4", [code])) == ["other_card"]
    for card, user in (("c1", "c1-new"), ("c2", "c3")):
        for n, code in enumerate(codes[card]):
            assert await statuses(after, sale(f"{card}-{n}", "c5", [code])) == ["other_card"]
            assert await statuses(after, sale(f"{user}-{n}", user, [code])) == ["applied"], (card, n)


async def test_codes_bound_under_either_key_follow_a_replacement_a_merge_and_an_erasure(aiohttp_client, tmp_path):
    first = await serve(aiohttp_client, tmp_path, FIRST_PRIVACY)
    for card in ("c1", "c2", "c3", "c4", "c5"):
        assert (await first.post("/v1/members", {"card": card}))[0] == 201
    codes = {card: [await bind(first, card)] for card in ("c1", "c2", "c4")}
    await first.client.close()
    # The new key in force, nothing wrapped yet: codes bound now are bound under it.
    before = await serve(aiohttp_client, tmp_path, ROTATED_PRIVACY)
    for card in codes:
        codes[card].append(await bind(before, card))
    await replace_merge_and_erase(before)
    await before.client.close()
    await rotate(tmp_path)
    await codes_after_rotation(aiohttp_client, tmp_path, codes)


# The service desk works before the rotation wraps the cards (the codes' cards are wrapped,
# the cards not yet), or once it has (before the retired cards).
@pytest.mark.parametrize("before", ["cards", "retired_cards"])
async def test_codes_follow_cards_taken_out_of_use_while_the_rotation_runs(aiohttp_client, tmp_path, monkeypatch,
                                                                           before):
    first = await serve(aiohttp_client, tmp_path, FIRST_PRIVACY)
    for card in ("c1", "c2", "c3", "c4", "c5"):
        assert (await first.post("/v1/members", {"card": card}))[0] == 201
    codes = {card: [await bind(first, card)] for card in ("c1", "c2", "c4")}
    await first.client.close()
    serving = await serve(aiohttp_client, tmp_path, ROTATED_PRIVACY)
    # Beside it, the rotation; the service desk replaces, merges and erases meanwhile.
    loop, count_stale, done = asyncio.get_running_loop(), member_care.count_stale, []

    def desk_meanwhile(conn, table, *args):
        if table == before and not done:
            done.append(asyncio.run_coroutine_threadsafe(replace_merge_and_erase(serving), loop).result(30))
        return count_stale(conn, table, *args)
    monkeypatch.setattr(member_care, "count_stale", desk_meanwhile)
    await rotate(tmp_path)
    assert done
    monkeypatch.undo()
    await serving.client.close()
    await codes_after_rotation(aiohttp_client, tmp_path, codes)
