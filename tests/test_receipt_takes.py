"""What a receipt took of coupon codes and personal offer budgets is kept in its own row
(receipts.takes, m038); a cancel or a return of the whole receipt gives exactly that back,
also for receipts confirmed before the upgrade, whose takes are rows of coupon_uses and
offer_charges, and for codes whose hashes a key rotation has moved since."""
from __future__ import annotations

import sqlite3

import pytest
from conftest import FIRST_PRIVACY, ROTATED_PRIVACY, Api, connect, serve_program

from storage import receipt_takes

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
  - id: comeback
    personal: true
    reward: {points: 30}
"""
SQLITE_ONLY = pytest.mark.sqlite_only(reason="SQLite keeps a receipt's takes in its row; PostgreSQL writes them as "
                                             "rows of their own, as before")


async def serve(aiohttp_client, tmp_path, privacy=FIRST_PRIVACY) -> Api:
    return await serve_program(aiohttp_client, tmp_path, NOW, PROGRAM, privacy)


def sale(receipt_id: str, codes: list[str]) -> dict:
    return {"receipt_id": receipt_id, "store_id": "S001", "register_id": "K1", "ts": NOW, "card": "c1",
            "coupons": codes, "lines": [{"line_no": 1, "sku": "x", "category": "coats", "qty": 1, "price": 10_000,
                                         "amount": 10_000}], "total": 10_000}


async def confirm(api: Api, receipt_id: str, codes: list[str]) -> dict:
    status, answer = await api.post("/v1/receipts", sale(receipt_id, codes), as_="register")
    assert status == 201, answer
    return answer


async def code_and_offer(api: Api) -> str:
    """c1 enrolled, holding a `comeback` offer of 40 points; a winter code."""
    assert (await api.post("/v1/members", {"card": "c1"}))[0] == 201
    assert (await api.post("/v1/admin/offers", {"offer_id": "o1", "rule": "comeback", "from": "2026-12-01",
                                                "to": "2026-12-31", "cards": ["c1"], "points": 40}))[0] == 201
    status, body = await api.post("/v1/admin/coupons/winter/codes", {"count": 1})
    assert status == 201, body
    return body["codes"][0]


async def points_left(api: Api) -> int:
    return (await api.get("/v1/members/c1"))[1]["offers"][0]["points_left"]


def to_before_m038(path) -> None:
    """The database as the version before m038 leaves it: r1's code use and offer charge as
    rows of their own, no takes column."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        (record,) = conn.execute("SELECT takes FROM receipts WHERE receipt_id = 'r1'").fetchone()
        taken = receipt_takes.decode(record)
        assert len(taken.codes) == 1 and taken.charges == [("o1", 30)]
        conn.execute("BEGIN")
        conn.execute("INSERT INTO coupon_uses (store_id, register_id, receipt_id, code, used_at) "
                     "VALUES ('S001', 'K1', 'r1', ?, '2026-12-10T10:00:00.000000Z')", (taken.codes[0],))
        conn.execute("INSERT INTO offer_charges (store_id, register_id, receipt_id, member_id, offer_id, points) "
                     "VALUES ('S001', 'K1', 'r1', 1, 'o1', 30)")
        conn.execute("ALTER TABLE receipts DROP COLUMN takes")
        conn.execute("DELETE FROM _sqlite_migrations WHERE name = 'm038_takes_in_receipts'")
        conn.execute("COMMIT")
    finally:
        conn.close()


@SQLITE_ONLY
async def test_a_receipt_confirmed_before_the_upgrade_gives_back_from_its_rows(aiohttp_client, tmp_path):
    api = await serve(aiohttp_client, tmp_path)
    code = await code_and_offer(api)
    assert (await confirm(api, "r1", [code]))["coupons"][0]["status"] == "applied"
    await api.client.close()
    to_before_m038(tmp_path / "loyalty.db")

    api = await serve(aiohttp_client, tmp_path)        # m038 runs at start
    assert await points_left(api) == 10
    assert (await confirm(api, "r2", [code]))["coupons"][0]["status"] == "used"     # and 10 points of the offer
    assert await points_left(api) == 0
    assert (await api.post("/v1/receipts/S001/K1/r1/cancel", as_="register"))[0] == 200
    assert await points_left(api) == 30
    assert (await confirm(api, "r3", [code]))["coupons"][0]["status"] == "applied"     # kept in r3's row
    assert await points_left(api) == 0
    await api.client.close()
    with connect(tmp_path / "loyalty.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM coupon_uses").fetchone() == (0,)
        assert conn.execute("SELECT COUNT(*) FROM offer_charges").fetchone() == (0,)
        kept = {rid: receipt_takes.decode(t) for rid, t in conn.execute("SELECT receipt_id, takes FROM receipts")}
    assert kept["r1"] == receipt_takes.NONE and len(kept["r3"].codes) == 1 and kept["r3"].charges == [("o1", 30)]


async def test_a_code_used_under_an_earlier_key_is_given_back_under_the_new_one(aiohttp_client, tmp_path):
    """The new key in force, `rotate-key` not run yet: the receipt's code was used under the
    first key, and a cancel gives it back to the code's row, which stays under it."""
    api = await serve(aiohttp_client, tmp_path)
    code = await code_and_offer(api)
    await confirm(api, "r1", [code])
    await api.client.close()

    api = await serve(aiohttp_client, tmp_path, ROTATED_PRIVACY)
    assert (await confirm(api, "r2", [code]))["coupons"][0]["status"] == "used"
    assert (await api.post("/v1/receipts/S001/K1/r1/cancel", as_="register"))[0] == 200
    assert (await confirm(api, "r3", [code]))["coupons"][0]["status"] == "applied"
