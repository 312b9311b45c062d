"""`limit: {per_member: {count, per: period}}` counts uses over the rule's `period`; a rule
without a period is in force for good, so all its uses count: rules.md's own `comeback`
(a personal rule, once per member, no period) loads and gives its points once."""
from __future__ import annotations

from conftest import line, receipt, serve_program

NOW = "2026-12-10T12:00:00+02:00"
PROGRAM = """\
program: {id: shop, name: Shop, currency: UAH, timezone: Europe/Kyiv}
points: {value: 100, rounding: floor, activation_delay_days: 0, expiry_days: 365}
tiers: {levels: [{id: base, from: 0}]}
stores: [{id: S001}]
rules:
  - id: comeback
    personal: true
    reward: {points: 300}
    limit: {per_member: {count: 1, per: period}}
"""


def sale(receipt_id: str, ts: str) -> dict:
    return receipt(receipt_id, [line(1, "coats", 10000)], card="c1", ts=ts)


async def test_a_rule_without_a_period_limited_per_period_fires_once_for_good(aiohttp_client, tmp_path):
    api = await serve_program(aiohttp_client, tmp_path, NOW, PROGRAM)
    assert (await api.post("/v1/members", {"card": "c1"}))[0] == 201
    status, _ = await api.post("/v1/admin/offers", {"offer_id": "o1", "rule": "comeback", "cards": ["c1"],
                                                    "from": "2026-01-01", "to": "2027-12-31"})
    assert status == 201
    status, first = await api.post("/v1/receipts", sale("r1", "2026-12-10T11:00:00+02:00"), as_="register")
    assert status == 201 and first["accrued"]["by_rule"] == [{"rule": "comeback", "points": 300}]
    # Another day, another month, even a receipt stamped before it: the one use is taken.
    for receipt_id, ts in (("r2", "2026-12-10T11:30:00+02:00"), ("r3", "2026-03-01T10:00:00+02:00")):
        status, later = await api.post("/v1/receipts", sale(receipt_id, ts), as_="register")
        assert status == 201 and later["accrued"]["points"] == 0
    # A cancel gives the use back.
    assert (await api.post("/v1/receipts/S001/K01/r1/cancel", as_="register"))[0] == 200
    status, again = await api.post("/v1/receipts", sale("r4", "2026-12-10T11:50:00+02:00"), as_="register")
    assert status == 201 and again["accrued"]["by_rule"] == [{"rule": "comeback", "points": 300}]
