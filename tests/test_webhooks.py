"""Webhooks: a local receiver on 127.0.0.1 gets every event at least once, signed, in order per
member, with no full card number, through a receiver that is down, slow, answers 500 and comes
back, and through a SIGKILL of the server just after it acknowledged a receipt."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import shutil
import subprocess
import sys
import time

import aiohttp
import msgspec
import pytest
import yaml
from aiohttp import web

from conftest import KEYS, PROGRAMS, ROOT, Api, connect, database_section, line, receipt, test_config
from server import cli
from server.app import create_app
from server.config import WebhookConfig
from storage.events import TYPES
from test_crash_safety import NOW, Server, free_port

SECRET = "webhook-secret-0123456789"
CARDS = [f"70000000000{n:02d}" for n in range(4)]
# Short retries so a test sees many of them; the defaults are 1 s doubling to 60 s for 24 h.
FAST = {"retry_initial_seconds": 0.05, "retry_max_seconds": 0.3, "poll_interval_seconds": 0.02,
        "timeout_seconds": 0.5}


class Receiver:
    """A webhook receiver on 127.0.0.1 whose answer the test sets: ok, fail (500), slow, or down."""

    def __init__(self):
        self.port = free_port()
        self.mode = "ok"
        self.refuse_ids: set[int] = set()
        self.got: list[dict] = []          # every request received, answered 2xx or not
        self.delivered: list[dict] = []    # those answered 2xx
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        event = json.loads(body)
        self.got.append({"event": event, "raw": body, "headers": dict(request.headers)})
        if self.mode == "slow":
            await asyncio.sleep(2)      # past the sender's timeout: it counts as failed
        if self.mode == "fail" or event["id"] in self.refuse_ids:
            return web.Response(status=500)
        self.delivered.append(event)
        return web.Response(status=204)


def check_signed(receiver: Receiver) -> None:
    for item in receiver.got:
        expected = "sha256=" + hmac.new(SECRET.encode(), item["raw"], hashlib.sha256).hexdigest()
        assert item["headers"]["X-Loyalty-Signature"] == expected
        assert item["headers"]["X-Loyalty-Event-Id"] == str(item["event"]["id"])
        for card in CARDS:
            assert card.encode() not in item["raw"]


def check_duplicates_identical(receiver: Receiver) -> None:
    by_id: dict[int, bytes] = {}
    for item in receiver.got:
        assert by_id.setdefault(item["event"]["id"], item["raw"]) == item["raw"]


def check_order_per_member(receiver: Receiver) -> None:
    """Each member's events were first delivered in the order they were written."""
    first: dict[str, list[int]] = {}
    seen: set[int] = set()
    for event in receiver.delivered:
        if event["id"] not in seen:
            seen.add(event["id"])
            first.setdefault(event["member_id"], []).append(event["id"])
    for ids in first.values():
        assert ids == sorted(ids), ids


@pytest.fixture
def hooked_api(aiohttp_client, tmp_path):
    """hooked_api([webhook, ...], events={...}) -> Api on a fresh database, sending to those webhooks."""
    async def make(hooks: list[dict], **overrides) -> Api:
        config = test_config(tmp_path, "2026-11-24T12:00:05+02:00", **overrides)
        config = msgspec.structs.replace(config, webhooks=[msgspec.convert(h, WebhookConfig) for h in hooks])
        return Api(await aiohttp_client(create_app(config)))
    return make


def hook(receiver: Receiver, events: list[str] | None = None) -> dict:
    return {"id": "crm", "url": receiver.url, "secret": SECRET,
            "events": events or list(TYPES)}


async def eventually(check, seconds: float = 30) -> None:
    """Until check() (or the coroutine it returns) is true; generous, the machine is shared."""
    deadline = time.monotonic() + seconds
    while True:
        done = check()
        if asyncio.iscoroutine(done):
            done = await done
        if done:
            return
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.05)


async def scripted_day(api, prefix: str = "") -> None:
    for n, card in enumerate(CARDS):
        assert (await api.post("/v1/members", {"card": card}))[0] == 201
        body = receipt(f"{prefix}r{n}", [line(1, "dairy", 600_000 + n)], card=card, ts="2026-11-24T12:00:00+02:00")
        assert (await api.post("/v1/receipts", body, as_="register"))[0] == 201
    assert (await api.post("/v1/receipts/S001/K01/r0/cancel", as_="register"))[0] == 200
    back = {"return_id": f"{prefix}ret1", "store_id": "S001", "register_id": "K01",
            "receipt": {"store_id": "S001", "register_id": "K01", "receipt_id": f"{prefix}r1"},
            "lines": [{"line_no": 1, "qty": 1}]}
    assert (await api.post("/v1/returns", back, as_="register"))[0] == 201


async def test_every_event_arrives_signed_in_order_through_500s_slowness_and_an_outage(hooked_api):
    receiver = Receiver()
    receiver.mode = "fail"
    await receiver.start()
    try:
        api = await hooked_api([hook(receiver)], events=FAST)
        await scripted_day(api)
        await eventually(lambda: len(receiver.got) >= 8)         # answered 500 and retried
        receiver.mode = "slow"
        await eventually(lambda: len(receiver.got) >= 12)
        receiver.mode = "ok"
        await receiver.stop()                                     # down: connections refused
        await asyncio.sleep(0.5)
        await receiver.start()                                    # back
        written = (await api.get("/v1/admin/events"))[1]["events"]
        await eventually(lambda: {e["id"] for e in receiver.delivered} >= {e["id"] for e in written})
        # Four members up to silver; r0 cancelled and r1 returned take two back down.
        assert [e["type"] for e in written].count("tier.changed") == 6
        check_signed(receiver)
        check_duplicates_identical(receiver)
        check_order_per_member(receiver)
        await eventually(lambda: _shows(api, "loyalty_events_backlog 0.0"))
        text = await _metrics(api)
        failed = re.search(r'^loyalty_webhook_deliveries_total\{result="failed"\} (\S+)$', text, re.M)
        assert float(failed[1]) >= 8
    finally:
        await receiver.stop()


async def test_a_dead_letter_does_not_hold_back_later_events_and_retry_sends_it_again(hooked_api, tmp_path):
    receiver = Receiver()
    await receiver.start()
    try:
        api = await hooked_api([hook(receiver)], events={**FAST, "retry_for_seconds": 0.5})
        receiver.refuse_ids = {1}             # the member's first event, member.enrolled, always fails
        await scripted_day(api)
        written = (await api.get("/v1/admin/events"))[1]["events"]
        later = {e["id"] for e in written} - {1}
        await eventually(lambda: {e["id"] for e in receiver.delivered} >= later)
        await eventually(lambda: _shows(api, 'loyalty_webhook_dead_letters 1.0'))
        assert 1 not in {e["id"] for e in receiver.delivered}
        text = await _metrics(api)
        assert 'loyalty_webhook_deliveries_total{result="dead"} 1.0' in text

        receiver.refuse_ids = set()
        config = tmp_path / "retry.yaml"
        config.write_text(yaml.safe_dump({"database": database_section(tmp_path / "loyalty.db"),
                                          "privacy": {"hmac_key": "tests-hmac-key-0123456789"}}))
        # Off the loop, as from a shell: the command waits for its commit.
        assert await asyncio.to_thread(cli.main, ["events", "retry", "--config", str(config), "--webhook", "crm"]) == 0
        await eventually(lambda: 1 in {e["id"] for e in receiver.delivered})
        first = [item for item in receiver.got if item["event"]["id"] == 1]
        assert len(first) > 1 and len({item["raw"] for item in first}) == 1     # the same event, same id
        await eventually(lambda: _shows(api, 'loyalty_webhook_dead_letters 0.0'))
    finally:
        await receiver.stop()


@pytest.mark.parametrize("event", [0, 2**63])
async def test_retry_of_an_event_id_no_event_can_have_is_one_line(make_api, tmp_path, capsys, event):
    await make_api()        # the database, made as the server makes it
    config = tmp_path / "retry.yaml"
    config.write_text(yaml.safe_dump({"database": database_section(tmp_path / "loyalty.db"),
                                      "privacy": {"hmac_key": "tests-hmac-key-0123456789"}}))
    argv = ["events", "retry", "--config", str(config), "--event", str(event)]
    assert await asyncio.to_thread(cli.main, argv) == 2
    assert capsys.readouterr().err == "--event must be the id of an event, 1 to 9223372036854775807\n"


async def _shows(api, sample: str) -> bool:
    return sample in await _metrics(api)


async def _metrics(api) -> str:
    status, text = await api.get("/metrics")
    assert status == 200
    return text


def _events_in(server: Server) -> list[int]:
    with connect(server.db) as conn:
        return [r[0] for r in conn.execute("SELECT id FROM events ORDER BY id")]


# The test program's additions for a day with every event type: a birthday gift, a referral
# reward, a personal rule.
DAY_CAMPAIGNS = """
events:
  - {id: birthday-gift, on: birthday, reward: {points: 10}}
  - {id: referral, on: referred_first_purchase, reward: {points: 50}}
rules:
  - id: comeback
    personal: true
    reward: {points: 30}
"""
NEW_CARD, PHONE = "7100000000001", "+380501234567"


async def test_every_event_of_a_scripted_day_arrives_through_an_outage_and_a_sigkill(tmp_path):
    """Every event type, at least once, signed, with no card number or phone, in order per
    member; the receiver down from mid-morning and the server SIGKILLed just after a 201."""
    program = tmp_path / "program"
    shutil.copytree(PROGRAMS / "market", program)
    (program / "campaigns" / "day.yaml").write_text(DAY_CAMPAIGNS)
    receiver = Receiver()
    await receiver.start()
    server = Server(tmp_path, events=FAST, rules={"dir": str(program), "watch": False},
                    jobs={"interval_seconds": 0.2})
    config = yaml.safe_load(server.config.read_text())
    config["webhooks"] = [hook(receiver)]
    server.config.write_text(yaml.safe_dump(config))
    await asyncio.to_thread(server.start)
    try:
        async with aiohttp.ClientSession() as session:
            async def call(path, body, role="manager", method="POST") -> int:
                async with session.request(method, server.url(path), json=body,
                                           headers={"Authorization": f"Bearer {KEYS[role]}"}) as resp:
                    return resp.status
            acked = []

            async def sale(receipt_id: str, card: str, amount: int) -> None:
                body = receipt(receipt_id, [line(1, "dairy", amount)], card=card, ts=NOW)
                assert await call("/v1/receipts", body, "register") == 201
                acked.append(receipt_id)

            # Morning: enrolments (one has a birthday today, one was referred by it, so that
            # its first purchase pays a referral reward and the return of all of it takes it
            # back), the CRM's fields, a personal offer.
            assert await call("/v1/members", {"card": CARDS[0], "phone": PHONE, "birthday": "1990-11-24"}) == 201
            assert await call("/v1/members", {"card": CARDS[1], "referred_by": CARDS[0]}) == 201
            for card in CARDS[2:]:
                assert await call("/v1/members", {"card": card}) == 201
            crm = {"crm_id": "CRM-1", "consent": {"sms": True}}
            assert await call(f"/v1/members/{CARDS[0]}", crm, method="PATCH") == 200
            offer = {"offer_id": "o1", "rule": "comeback", "cards": CARDS[:2], "from": "2026-11-24", "to": "2026-11-30"}
            assert await call("/v1/admin/offers", offer) == 201
            await eventually(lambda: "birthday" in _types_in(server))         # the server's own jobs
            await eventually(lambda: {e["id"] for e in receiver.delivered} >= set(_events_in(server)))
            # The receiver goes down for the rest of the morning.
            await receiver.stop()
            for n, card in enumerate(CARDS):
                await sale(f"d{n}", card, 600_000 + n)                         # up to silver
            assert await call("/v1/receipts/S001/K01/d0/cancel", None, "register") == 200
            back = {"return_id": "ret1", "store_id": "S001", "register_id": "K01",
                    "receipt": {"store_id": "S001", "register_id": "K01", "receipt_id": "d1"},
                    "lines": [{"line_no": 1, "qty": 1}]}
            assert await call("/v1/returns", back, "register") == 201
            assert await call("/v1/admin/members/m_3/replace-card", {"new_card": NEW_CARD}) == 201
            merge = {"merge_id": "MG-1", "from_member_id": "m_4", "into_member_id": "m_3", "reason": "one customer"}
            assert await call("/v1/admin/members/merge", merge) == 201
            await sale("d9", CARDS[1], 5_000)
            server.kill()                                                     # just after that 201
            await asyncio.to_thread(server.start)
            await receiver.start()                                            # and the receiver is back
            await sale("d10", NEW_CARD, 7_000)
            # A year on, the points expire: the jobs announce it a few days before, then expire them.
            for moment in ("2027-11-20T03:00:00+02:00", "2027-11-25T03:00:00+02:00"):
                run = await asyncio.to_thread(subprocess.run, [
                    sys.executable, "-m", "server.cli", "jobs", "run", "--config", str(server.config),
                    "--now", moment, "--force"], capture_output=True, text=True, timeout=120, cwd=ROOT)
                assert run.returncode == 0, run.stdout + run.stderr
            await eventually(lambda: {e["id"] for e in receiver.delivered} >= set(_events_in(server)), seconds=60)
            # Evening: an erasure, once everything before it is delivered and recorded, so any
            # event sent again is sent with the body it had.
            await eventually(lambda: _owed(server) == 0, seconds=60)
            assert await call("/v1/admin/members/m_2/erase", {"reason": "asked"}) == 200
            await eventually(lambda: {e["id"] for e in receiver.delivered} >= set(_events_in(server)), seconds=60)
        assert {e["type"] for e in receiver.delivered} == set(TYPES)
        confirmed = {e["data"]["receipt"]["receipt_id"] for e in receiver.delivered if e["type"] == "receipt.confirmed"}
        assert confirmed == set(acked)
        check_signed(receiver)
        for item in receiver.got:
            assert NEW_CARD.encode() not in item["raw"] and PHONE[1:].encode() not in item["raw"]
        check_duplicates_identical(receiver)
        check_order_per_member(receiver)
    finally:
        server.kill()
        await receiver.stop()


def _types_in(server: Server) -> set[str]:
    with connect(server.db) as conn:
        return {r[0] for r in conn.execute("SELECT DISTINCT type FROM events")}


def _owed(server: Server) -> int:
    with connect(server.db) as conn:
        return conn.execute("SELECT COUNT(*) FROM event_deliveries").fetchone()[0]
