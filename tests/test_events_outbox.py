"""The events outbox: each change writes its event in its own transaction, a warehouse pulls
them with GET /v1/admin/events, the daily jobs announce expiring and expired points once per
lot, and a card shows only as its last four digits."""
from __future__ import annotations

import json
import re
import sqlite3
from datetime import datetime, timedelta

import pytest

from conftest import MARKET, ROOT, line, receipt, test_config
from rules import load_program
from server.config import ConfigError, config_from_dict
from server.databases import for_command
from server.jobs import run_all
from storage import events

NOW = "2026-11-24T12:00:05+02:00"
CARD = "7000000000001"


async def pull(api, after=0, limit=100):
    status, body = await api.get(f"/v1/admin/events?after={after}&limit={limit}")
    assert status == 200, body
    return body


async def test_a_scripted_day_writes_each_event_once_in_order(make_api):
    api = await make_api(now=NOW)
    assert (await api.post("/v1/members", {"card": CARD}))[0] == 201
    status, _ = await api.post("/v1/receipts", receipt("r1", [line(1, "dairy", 600_000)], card=CARD),
                               as_="register")
    assert status == 201
    # The same receipt again is a replay: no second event.
    assert (await api.post("/v1/receipts", receipt("r1", [line(1, "dairy", 600_000)], card=CARD),
                           as_="register"))[0] == 200
    ret = {"return_id": "ret1", "store_id": "S001", "register_id": "K01",
           "receipt": {"store_id": "S001", "register_id": "K01", "receipt_id": "r1"},
           "lines": [{"line_no": 1, "qty": 1}]}
    assert (await api.post("/v1/returns", ret, as_="register"))[0] == 201
    assert (await api.post("/v1/receipts", receipt("r2", [line(1, "grocery", 10_000)], card=CARD),
                           as_="register"))[0] == 201
    assert (await api.post("/v1/receipts/S001/K01/r2/cancel", as_="register"))[0] == 200
    # An anonymous receipt concerns no member: no event.
    assert (await api.post("/v1/receipts", receipt("r3", [line(1, "grocery", 10_000)]), as_="register"))[0] == 201

    page = await pull(api)
    kinds = [(e["type"], e["data"].get("to")) for e in page["events"]]
    assert kinds == [("member.enrolled", None), ("receipt.confirmed", None), ("tier.changed", "silver"),
                     ("return.accepted", None), ("tier.changed", "base"), ("receipt.confirmed", None),
                     ("receipt.cancelled", None)]
    ids = [e["id"] for e in page["events"]]
    assert ids == sorted(ids) and page["next_after"] == ids[-1]
    for event in page["events"]:
        assert event["member_id"] == "m_1" and event["card_last4"] == "0001"
        assert CARD not in json.dumps(event)
    confirmed = page["events"][1]
    assert confirmed["data"]["receipt"] == {"store_id": "S001", "register_id": "K01", "receipt_id": "r1"}
    assert confirmed["data"]["total"] == 600_000 and confirmed["data"]["accrued_points"] > 0
    assert page["events"][2]["data"] == {"from": "base", "to": "silver", "reason": "receipt.confirmed"}
    # Paging: after an id, at most limit.
    second = await pull(api, after=ids[1], limit=2)
    assert [e["id"] for e in second["events"]] == ids[2:4] and second["next_after"] == ids[3]
    assert (await pull(api, after=ids[-1]))["events"] == []


async def test_a_manual_tier_is_a_tier_change(make_api):
    api = await make_api(now=NOW)
    await api.post("/v1/members", {"card": CARD})
    assert (await api.put(f"/v1/admin/members/{CARD}/tier", {"tier": "gold", "until": "2027-06-30"}))[0] == 200
    assert (await api.put(f"/v1/admin/members/{CARD}/tier", {"tier": "gold", "until": "2027-07-31"}))[0] == 200
    changes = [e["data"] for e in (await pull(api))["events"] if e["type"] == "tier.changed"]
    assert changes == [{"from": "base", "to": "gold", "reason": "assigned"}]


async def test_a_refused_receipt_writes_no_event(make_api):
    api = await make_api(now=NOW)
    await api.post("/v1/members", {"card": CARD})
    status, body = await api.post("/v1/receipts", receipt("r1", [line(1, "dairy", 1000)], card=CARD, redeem=10_000),
                                  as_="register")
    assert status == 422, body
    assert [e["type"] for e in (await pull(api))["events"]] == ["member.enrolled"]


async def test_the_pull_refuses_bad_parameters_in_the_error_shape(make_api):
    api = await make_api(now=NOW)
    for query, path in (("after=-1", "after"), ("after=x", "after"), ("limit=0", "limit"), ("limit=1001", "limit")):
        status, body = await api.get(f"/v1/admin/events?{query}")
        assert status == 422 and body["error"]["details"][0]["path"] == path, (query, body)
    assert (await api.get("/v1/admin/events", as_="register"))[0] == 403


async def test_expiring_points_are_announced_once_per_lot_then_expired(tmp_path):
    config = test_config(tmp_path, NOW)
    program = load_program(MARKET)
    db = for_command(config)
    db.open()
    try:
        now = datetime.fromisoformat(NOW)
        lot_expires = (now + timedelta(days=5)).date().isoformat()
        await db.write(lambda conn: _member_with_lot(conn, lot_expires, now))
        first = await run_all(db, program, now, expiring_days=7)
        again = await run_all(db, program, now, expiring_days=7)     # the next interval: once per lot
        assert (first["expiring_lots"], again["expiring_lots"]) == (1, 0)
        page = await db.read(lambda conn: events.page(conn, 0, 100))
        assert [(e["type"], e["data"]) for e in page] == [
            ("points.expiring", {"lot_id": 1, "points": 300, "expires_on": lot_expires})]
        # Ten days on, the lot has expired: one points.expired, and no new expiring.
        await run_all(db, program, now + timedelta(days=10), expiring_days=7)
        await run_all(db, program, now + timedelta(days=11), expiring_days=7)
        page = await db.read(lambda conn: events.page(conn, 0, 100))
        assert [e["type"] for e in page] == ["points.expiring", "points.expired"]
        assert page[1]["data"]["points"] == 300 and page[1]["card_last4"] == "4321"
    finally:
        db.close()
    program.close()


def _member_with_lot(conn: sqlite3.Connection, expires_on: str, now: datetime) -> None:
    from storage import accounts, ledger
    from storage.ledger import PostingRef, iso
    member_id = ledger.insert_member(conn, card="hmac-of-card", card_last4="4321", phone_hmac=None, phone_last4=None,
                                     birthday=None, tags="[]", referred_by=None, store_id=None, now=iso(now))
    at = PostingRef(effective_at=iso(now), created_at=iso(now), rules_version="test", ref="adjustment:t")
    ledger.credit(conn, member_id, 300, now.date(), datetime.fromisoformat(expires_on).date(), "adjustment",
                  accounts.ADJUSTMENT, at)


async def test_delivered_events_go_after_the_retention_period(tmp_path):
    config = test_config(tmp_path, NOW)
    db = for_command(config)
    db.open()
    try:
        now = datetime.fromisoformat(NOW)
        await db.write(lambda conn: _member_with_lot(conn, "2027-11-24", now))
        await db.write(lambda conn: [events.start_fanout(conn, "w"),
                                     events.emit(conn, "birthday", 1, {"date": "2026-11-24"}, now),
                                     events.emit(conn, "birthday", 1, {"date": "2026-11-25"}, now),
                                     events.fan_out(conn, [events.Hook("w", ["birthday"])], 10, 1000.0)])
        # The first delivered, the second dead: only a delivered event may go.
        await db.write(lambda conn: events.record(conn, [
            events.Outcome("w", 1, "delivered", 1, 1000.0, 1000.0, None, 1000.0),
            events.Outcome("w", 2, "dead", 9, 1000.0, 1000.0, "HTTP 500", 1000.0)]))
        later = now + timedelta(days=31)
        await db.write(lambda conn: events.emit(conn, "birthday", 1, {"date": "2026-12-24"}, later))
        gone = await db.write(lambda conn: events.purge(conn, later - timedelta(days=30), ["w"], 100))
        assert gone == 1
        assert [e["id"] for e in await db.read(lambda conn: events.page(conn, 0, 10))] == [2, 3]
        owed = await db.read(lambda conn: [tuple(r) for r in conn.execute("SELECT event_id, state FROM event_deliveries")])
        assert owed == [(2, "dead")]
        # A webhook gone from the config holds nothing back; the newest event always stays,
        # so the next id is still one more than any id a warehouse has seen.
        gone = await db.write(lambda conn: events.purge(conn, later + timedelta(days=60), [], 100))
        assert gone == 1
        assert [e["id"] for e in await db.read(lambda conn: events.page(conn, 0, 10))] == [3]
        assert await db.read(lambda conn: conn.execute("SELECT COUNT(*) FROM event_deliveries").fetchone()[0]) == 0
        new_id = await db.write(lambda conn: events.emit(conn, "birthday", 1, {"date": "2027-11-24"}, later))
        assert new_id == 4
    finally:
        db.close()


async def test_an_assigned_offer_is_one_event_per_member_and_offer(tmp_path):
    config = test_config(tmp_path, NOW)
    db = for_command(config)
    db.open()
    try:
        now = datetime.fromisoformat(NOW)
        await db.write(lambda conn: _member_with_lot(conn, "2027-11-24", now))
        for _ in range(2):
            written = await db.write(lambda conn: events.offers_assigned(
                conn, "coffee-2for1", "coffee", "2026-12-01", "2026-12-31", 500, [1], now))
        assert written == 0
        page = await db.read(lambda conn: events.page(conn, 0, 10))
        assert [(e["type"], e["member_id"], e["card_last4"], e["data"]) for e in page] == [
            ("offer.assigned", "m_1", "4321", {"offer_id": "coffee-2for1", "rule": "coffee", "from": "2026-12-01",
                                               "to": "2026-12-31", "points": 500})]
    finally:
        db.close()


@pytest.mark.parametrize("hooks, key, reason", [
    ([{"id": "a", "url": "http://127.0.0.1:9/x", "secret": "s" * 16, "events": ["receipt.paid"]}],
     "webhooks[0].events[0]", "must be one of: birthday, card.replaced, member.enrolled"),
    ([{"id": "a", "url": "http://127.0.0.1:9/x", "secret": "short", "events": ["birthday"]}],
     "webhooks[0].secret", "16"),
    ([{"id": "a", "url": "ftp://host/x", "secret": "s" * 16, "events": ["birthday"]}], "webhooks[0].url", "http"),
    ([{"id": "a", "url": "http://127.0.0.1:9/x", "secret": "s" * 16, "events": ["birthday"]},
      {"id": "a", "url": "http://127.0.0.1:9/y", "secret": "s" * 16, "events": ["birthday"]}],
     "webhooks[1].id", "repeats"),
])
def test_a_wrong_webhook_stops_start_up_naming_the_key(hooks, key, reason):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"webhooks": hooks})
    assert e.value.key == key and reason in e.value.reason, e.value


def test_the_integrators_page_lists_every_event_type():
    page = (ROOT / "docs" / "integrators.md").read_text()
    section = page[page.index("## Events and webhooks"):]
    listed = re.findall(r"^\| `([a-z.]+)` \|", section, re.M)
    assert listed == list(events.TYPES)
