"""tier.changed after a confirm announces the tier the member holds at arrival once the
receipt counts, whatever its ts: receipts stamped after it, receipts that left the window
since its ts, a receipt older than the window, returns. After every confirm the tier last
announced is the tier the member's view shows."""
from __future__ import annotations

import random
from datetime import datetime, timedelta

from conftest import line, receipt

NOW = "2026-11-24T12:00:05+02:00"      # the market program: silver from 5,000.00 over 365 days
CARD = "7000000000001"


async def changes(api) -> list[tuple[str, str]]:
    status, body = await api.get("/v1/admin/events?limit=100")
    assert status == 200, body
    return [(e["data"]["from"], e["data"]["to"]) for e in body["events"] if e["type"] == "tier.changed"]


async def confirm(api, receipt_id: str, ts: str, amount: int) -> None:
    status, body = await api.post("/v1/receipts", receipt(receipt_id, [line(1, "grocery", amount)], card=CARD, ts=ts),
                                  as_="register")
    assert status == 201, body
    _, member = await api.get(f"/v1/members/{CARD}")
    announced = await changes(api)
    assert (announced[-1][1] if announced else "base") == member["tier"]["id"]


async def test_a_receipt_stamped_before_one_already_stored_counts_both(make_api):
    api = await make_api(now=NOW)
    assert (await api.post("/v1/members", {"card": CARD}))[0] == 201
    await confirm(api, "r1", "2026-11-24T12:00:03+02:00", 300_000)
    # Its own tier (at its ts) does not see r1; the member's tier now sees both: 5,500.00.
    await confirm(api, "r2", "2026-11-24T12:00:00+02:00", 250_000)
    assert await changes(api) == [("base", "silver")]


async def test_a_late_receipt_does_not_count_what_left_the_window_since_its_ts(make_api):
    api = await make_api(now=NOW)
    assert (await api.post("/v1/members", {"card": CARD}))[0] == 201
    await confirm(api, "old", "2025-11-20T12:00:00+02:00", 400_000)     # out of today's window already
    # At its ts, 2025-11-20's 4,000.00 and this 2,000.00 would be silver; today only 2,000.00 count.
    await confirm(api, "late", "2026-11-14T12:00:00+02:00", 200_000)
    assert await changes(api) == []
    await confirm(api, "today", "2026-11-24T12:00:00+02:00", 300_000)
    assert await changes(api) == [("base", "silver")]


async def test_a_receipt_older_than_the_window_moves_no_tier(make_api):
    api = await make_api(now=NOW)
    assert (await api.post("/v1/members", {"card": CARD}))[0] == 201
    await confirm(api, "ancient", "2025-11-01T12:00:00+02:00", 900_000)
    assert await changes(api) == []


async def test_a_return_since_lowers_what_the_next_receipt_adds_to(make_api):
    api = await make_api(now=NOW)
    assert (await api.post("/v1/members", {"card": CARD}))[0] == 201
    await confirm(api, "big", "2026-11-24T11:00:00+02:00", 600_000)
    ret = {"return_id": "x1", "store_id": "S001", "register_id": "K01",
           "receipt": {"store_id": "S001", "register_id": "K01", "receipt_id": "big"},
           "lines": [{"line_no": 1, "qty": 1}]}
    assert (await api.post("/v1/returns", ret, as_="register"))[0] == 201
    # Stamped before the returned receipt: 1,000.00 net, base; no change announced.
    await confirm(api, "small", "2026-11-24T10:00:00+02:00", 100_000)
    assert await changes(api) == [("base", "silver"), ("silver", "base")]


async def test_any_order_of_receipts_and_returns_keeps_the_announced_tier_the_members(make_api):
    """Seeded: receipts stamped anywhere from 400 days back to 4 minutes ahead, some returned."""
    rng = random.Random(17)
    api = await make_api(now=NOW)
    assert (await api.post("/v1/members", {"card": CARD}))[0] == 201
    now = datetime.fromisoformat(NOW)
    for n in range(40):
        ts = now - timedelta(minutes=rng.randint(-4, 400 * 24 * 60))
        await confirm(api, f"s{n}", ts.isoformat(), rng.choice((50_000, 150_000, 400_000, 900_000)))
        if rng.random() < 0.25:
            ret = {"return_id": f"x{n}", "store_id": "S001", "register_id": "K01",
                   "receipt": {"store_id": "S001", "register_id": "K01", "receipt_id": f"s{rng.randint(0, n)}"},
                   "lines": [{"line_no": 1, "qty": 1}]}
            await api.post("/v1/returns", ret, as_="register")      # 422 when that one was returned already
    assert len(await changes(api)) >= 2
