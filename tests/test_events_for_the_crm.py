"""What a CRM reads in events: the member's crm_id and consent per channel as of each event,
the member-care events (card.replaced, member.merged, member.erased) written with their change,
and an erasure that leaves no personal data in the events a webhook has yet to receive."""
from __future__ import annotations

import asyncio
import json
import threading
from datetime import datetime

import msgspec
import pytest

from conftest import POSTGRESQL, PROGRAMS, Api, line, receipt, test_config
from server.app import create_app
from server.config import WebhookConfig
from server.jobs import run_all
from server.keys import DATABASE, OPS
from storage import events as storage_events
from storage import ledger
from test_webhooks import FAST, Receiver, check_signed, eventually, hook

NOW = "2026-11-24T12:00:05+02:00"
CARD_A, CARD_B, NEW_CARD = "7000000000001", "7000000000002", "7000000000099"
NO_CONSENT = {"sms": False, "viber": False, "email": False, "push": False}


async def pull(api: Api) -> list[dict]:
    status, body = await api.get("/v1/admin/events?limit=1000")
    assert status == 200, body
    return body["events"]


async def test_each_event_carries_crm_id_and_consent_as_they_were_then(make_api):
    api = await make_api(now=NOW)
    assert (await api.post("/v1/members", {"card": CARD_A}))[0] == 201
    patch = {"crm_id": "CRM-000123", "consent": {"sms": True, "email": True}}
    assert (await api.call("PATCH", f"/v1/members/{CARD_A}", patch))[0] == 200
    sale = receipt("r1", [line(1, "grocery", 10_000)], card=CARD_A)
    assert (await api.post("/v1/receipts", sale, as_="register"))[0] == 201
    # The member withdraws sms: the events from then on say so, the earlier ones stay as they were.
    assert (await api.call("PATCH", f"/v1/members/{CARD_A}", {"consent": {"sms": False}}))[0] == 200
    assert (await api.post("/v1/receipts", receipt("r2", [line(1, "grocery", 20_000)], card=CARD_A),
                           as_="register"))[0] == 201
    assert (await api.post("/v1/receipts/S001/K01/r2/cancel", as_="register"))[0] == 200
    assert (await api.call("PATCH", f"/v1/members/{CARD_A}", {"crm_id": ""}))[0] == 200
    assert (await api.put(f"/v1/admin/members/{CARD_A}/tier", {"tier": "gold", "until": "2027-06-30"}))[0] == 200

    # Sending the same consent again changes nothing: no event.
    assert (await api.call("PATCH", f"/v1/members/{CARD_A}", {"consent": {"sms": False}}))[0] == 200

    events = await pull(api)
    seen = [(e["type"], e["crm_id"], e["consent"]) for e in events]
    given = {**NO_CONSENT, "sms": True, "email": True}
    withdrawn = {**NO_CONSENT, "email": True}
    assert seen == [("member.enrolled", None, NO_CONSENT),
                    ("member.updated", "CRM-000123", given),
                    ("receipt.confirmed", "CRM-000123", given),
                    ("member.updated", "CRM-000123", withdrawn),
                    ("receipt.confirmed", "CRM-000123", withdrawn),
                    ("receipt.cancelled", "CRM-000123", withdrawn),
                    ("member.updated", None, withdrawn),
                    ("tier.changed", None, withdrawn)]
    assert [e["data"] for e in events if e["type"] == "member.updated"] == [
        {"changed": ["crm_id", "consent"]}, {"changed": ["consent"]}, {"changed": ["crm_id"]}]


async def test_a_receipt_reads_the_crm_fields_with_its_member(make_api):
    """Within one batch of confirms each event has its own member's fields."""
    api = await make_api(now=NOW)
    for n, card in enumerate((CARD_A, CARD_B)):
        assert (await api.post("/v1/members", {"card": card}))[0] == 201
        patch = {"crm_id": f"CRM-{n}", "consent": {"push": bool(n), "viber": not n}}
        assert (await api.call("PATCH", f"/v1/members/{card}", patch))[0] == 200
    sales = [api.post("/v1/receipts", receipt(f"b{n}", [line(1, "grocery", 1_000 + n)], card=(CARD_A, CARD_B)[n % 2]),
                      as_="register") for n in range(8)]
    assert {status for status, _ in await asyncio.gather(*sales)} == {201}
    for event in await pull(api):
        if event["type"] == "receipt.confirmed":
            n = 0 if event["member_id"] == "m_1" else 1
            assert event["crm_id"] == f"CRM-{n}"
            assert event["consent"] == {**NO_CONSENT, "push": bool(n), "viber": not n}


def cafe_app(tmp_path, hooks: list[dict]):
    # The test runs the jobs itself: the server's own first run, at start, could write the
    # birthday between any two of its requests on a loaded machine.
    config = test_config(tmp_path, NOW, PROGRAMS / "cafe", events=FAST, jobs={"enabled": False})
    return create_app(msgspec.structs.replace(config, webhooks=[msgspec.convert(h, WebhookConfig) for h in hooks]))


async def test_care_events_and_an_erasure_that_leaves_nothing_personal_to_deliver(aiohttp_client, tmp_path):
    receiver = Receiver()
    receiver.mode = "fail"                 # nothing is delivered before the erasure
    await receiver.start()
    try:
        app = cafe_app(tmp_path, [hook(receiver)])
        api = Api(await aiohttp_client(app))
        await _care_day(api, app)
        events = await pull(api)
        kinds = [(e["type"], e["member_id"]) for e in events]
        assert kinds == [("member.enrolled", "m_1"), ("member.updated", "m_1"), ("member.enrolled", "m_2"),
                         ("member.updated", "m_2"), ("birthday", "m_1"), ("card.replaced", "m_1"),
                         ("member.merged", "m_2"), ("member.erased", "m_1"), ("member.erased", "m_2")]
        replaced, merged, erased = events[5], events[6], events[7]
        assert replaced["data"] == {"old_card_last4": None, "new_card_last4": None}
        assert merged["data"] == {"merge_id": "MG-1", "into_member_id": "m_1", "lots_moved": 1, "points_moved": 50}
        assert erased["data"] == {"members_erased": ["m_1", "m_2"]}
        assert events[4]["data"] == {"date": None}
        assert events[1]["data"] == {"changed": ["crm_id", "consent"]}
        for event in events:
            assert (event["card_last4"], event["crm_id"], event["consent"]) == (None, None, NO_CONSENT), event
        assert events[0]["data"] == {"store_id": None, "tier": "regular"}     # what happened stays

        receiver.mode = "ok"
        await eventually(lambda: {e["id"] for e in receiver.delivered} >= {e["id"] for e in events})
        # occurred_at is left out: its microseconds can spell "0001" or "4567" by chance.
        delivered = json.dumps([{k: v for k, v in e.items() if k != "occurred_at"} for e in receiver.delivered])
        for personal in ("0001", "0002", "0099", "CRM-A", "CRM-B", "1990", "4567"):
            assert personal not in delivered, personal
        check_signed(receiver)
    finally:
        await receiver.stop()


async def _care_day(api: Api, app) -> None:
    """Two members, a birthday, a card replaced, a merge and an erasure, each checked as it
    is written (before the erasure takes the personal data out of them)."""
    enrolled = {"card": CARD_A, "phone": "+380501234567", "birthday": "1990-11-24"}
    assert (await api.post("/v1/members", enrolled))[0] == 201
    assert (await api.call("PATCH", f"/v1/members/{CARD_A}", {"crm_id": "CRM-A", "consent": {"sms": True}}))[0] == 200
    assert (await api.post("/v1/members", {"card": CARD_B}))[0] == 201
    assert (await api.call("PATCH", f"/v1/members/{CARD_B}", {"crm_id": "CRM-B", "consent": {"email": True}}))[0] == 200
    await run_all(app[DATABASE], app[OPS].program(), datetime.fromisoformat(NOW))
    birthday = (await pull(api))[-1]
    assert (birthday["type"], birthday["data"], birthday["crm_id"]) == ("birthday", {"date": "2026-11-24"}, "CRM-A")

    status, _ = await api.post("/v1/admin/members/m_1/replace-card", {"new_card": NEW_CARD, "reason": "lost"})
    assert status == 201
    assert (await api.post("/v1/admin/members/m_1/replace-card", {"new_card": NEW_CARD}))[0] == 200   # no new event
    replaced = (await pull(api))[-1]
    assert (replaced["type"], replaced["card_last4"], replaced["data"]) == (
        "card.replaced", "0099", {"old_card_last4": "0001", "new_card_last4": "0099"})
    assert (replaced["crm_id"], replaced["consent"]) == ("CRM-A", {**NO_CONSENT, "sms": True})

    merge = {"merge_id": "MG-1", "from_member_id": "m_2", "into_member_id": "m_1", "reason": "one customer"}
    assert (await api.post("/v1/admin/members/merge", merge))[0] == 201
    assert (await api.post("/v1/admin/members/merge", merge))[0] == 200                             # no new event
    merged = (await pull(api))[-1]
    assert (merged["type"], merged["member_id"], merged["card_last4"], merged["crm_id"]) == (
        "member.merged", "m_2", "0002", "CRM-B")

    status, body = await api.post("/v1/admin/members/m_1/erase", {"reason": "GDPR request"})
    assert status == 200 and body["members_erased"] == ["m_1", "m_2"]
    assert (await api.post("/v1/admin/members/m_1/erase", {"reason": "again"}))[0] == 200          # no new event


@pytest.mark.sqlite_only(reason="counts the statements through SQLite's set_trace_callback")
async def test_a_confirmed_receipts_event_costs_no_query_for_the_crm_fields(aiohttp_client, tmp_path):
    """They come with the member row the receipt reads anyway: the only statements that name
    crm_id are that read and the event's insert."""
    app = create_app(test_config(tmp_path, NOW))
    api = Api(await aiohttp_client(app))
    assert (await api.post("/v1/members", {"card": CARD_A}))[0] == 201
    assert (await api.call("PATCH", f"/v1/members/{CARD_A}", {"crm_id": "CRM-1", "consent": {"sms": True}}))[0] == 200
    statements: list[str] = []
    await app[DATABASE].write(lambda conn: conn.set_trace_callback(statements.append))
    try:
        sale = receipt("q1", [line(1, "dairy", 700_000)], card=CARD_A)     # up to silver: tier.changed too
        assert (await api.post("/v1/receipts", sale, as_="register"))[0] == 201
    finally:
        await app[DATABASE].write(lambda conn: conn.set_trace_callback(None))
    naming = [" ".join(s.split())[:40] for s in statements if "crm_id" in s]
    assert len(naming) == 3 and naming[0].startswith("SELECT") and all(
        s.startswith("INSERT INTO events") for s in naming[1:]), naming
    events = await pull(api)
    assert [(e["type"], e["crm_id"]) for e in events[-2:]] == [("receipt.confirmed", "CRM-1"),
                                                               ("tier.changed", "CRM-1")]


async def test_an_event_written_after_the_erasures_read_is_forgotten_too(make_api):
    """The erasure finds the member's events on a reader, then, holding the writer, only the
    events written since: one written in between is scrubbed as well."""
    api = await make_api(now=NOW)
    for card in (CARD_A, CARD_B):
        assert (await api.post("/v1/members", {"card": card}))[0] == 201
    assert (await api.call("PATCH", f"/v1/members/{CARD_A}", {"crm_id": "CRM-A", "consent": {"sms": True}}))[0] == 200
    db = api.client.server.app[DATABASE]
    seen = await db.read(lambda conn: storage_events.seen(conn, [1]))
    assert (await api.post("/v1/receipts", receipt("late", [line(1, "grocery", 1_000)], card=CARD_A),
                           as_="register"))[0] == 201
    await db.write(lambda conn: storage_events.forget_member(conn, 1, seen))
    events = await pull(api)
    assert [(e["member_id"], e["type"], e["card_last4"], e["crm_id"]) for e in events] == [
        ("m_1", "member.enrolled", None, None), ("m_2", "member.enrolled", "0002", None),
        ("m_1", "member.updated", None, None), ("m_1", "receipt.confirmed", None, None)]


@pytest.mark.skipif(not POSTGRESQL, reason="SQLite's one writer commits events in the order of their ids")
async def test_an_event_of_the_member_committing_below_a_newer_id_while_the_erasure_reads_is_forgotten_too(
        make_api, monkeypatch):
    """PostgreSQL's writers take event ids in one order and commit in another: an event of
    the member whose transaction was still open when the erasure's reader looked, below an
    id another write had committed, was neither among the events the reader found nor above
    the newest id it saw, and kept naming the member erased."""
    api = await make_api(now=NOW, jobs={"enabled": False})
    assert (await api.post("/v1/members", {"card": CARD_A}))[0] == 201
    assert (await api.call("PATCH", f"/v1/members/{CARD_A}", {"crm_id": "CRM-A"}))[0] == 200
    db = api.client.server.app[DATABASE]
    written, commit = threading.Event(), threading.Event()

    def slow_to_commit(conn):      # a write of the member, under its lock, as every such write is
        ledger.lock_member(conn, 1)
        storage_events.emit(conn, "member.updated", 1, {"changed": ["crm_id"]}, NOW)
        written.set()
        commit.wait(10)
    slow = asyncio.ensure_future(db.write(slow_to_commit))
    assert await asyncio.to_thread(written.wait, 10)
    assert (await api.post("/v1/members", {"card": CARD_B}))[0] == 201      # a newer event id, committed first
    seen = storage_events.seen

    def then_commit(conn, member_ids, *args):
        try:
            return seen(conn, member_ids, *args)
        finally:
            commit.set()        # before the erasure takes the member's lock, which it then waits for
    monkeypatch.setattr(storage_events, "seen", then_commit)
    status, body = await api.post("/v1/admin/members/m_1/erase", {"reason": "asked"})
    assert status == 200, body
    await slow
    named = await db.read(lambda conn: [tuple(r) for r in conn.execute(
        "SELECT type, card_last4, crm_id FROM events WHERE member_id = 1 ORDER BY id")])
    assert named == [("member.enrolled", None, None), ("member.updated", None, None),
                     ("member.updated", None, None), ("member.erased", None, None)], named
