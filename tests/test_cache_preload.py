"""database.preload: the members' hot rows are read into the write connection's cache at
start; receipts are served meanwhile and /readyz says ready once it is done."""
from __future__ import annotations

import asyncio
import threading

import pytest

from conftest import line, receipt
from storage import preload

pytestmark = pytest.mark.sqlite_only(reason="preloads SQLite's page cache; PostgreSQL keeps its own (server/app.py)")

NOW = "2026-11-24T12:00:05+02:00"
CARDS = [f"70000000000{n:02d}" for n in range(1, 8)]


async def enrolled(make_api):
    api = await make_api(now=NOW)
    for card in CARDS:
        status, _ = await api.post("/v1/members", {"card": card})
        assert status == 201
    await api.client.close()


async def ready_status(api) -> tuple[int, dict]:
    return await api.get("/readyz", as_=None)


async def test_not_ready_while_preloading_but_receipts_are_served(make_api, monkeypatch):
    await enrolled(make_api)
    release, reached = threading.Event(), threading.Event()
    real_step = preload.member_step

    def held_step(conn, first, last):
        reached.set()
        release.wait(10)      # on the writer thread: the preload stays unfinished until released
        real_step(conn, first, last)

    monkeypatch.setattr(preload, "member_step", held_step)
    api = await make_api(now=NOW, database={"preload": True})
    assert await asyncio.to_thread(reached.wait, 10)
    status, body = await ready_status(api)
    assert status == 503 and body["error"]["code"] == "unavailable" and "preload" in body["error"]["message"]
    confirming = asyncio.create_task(api.post("/v1/receipts", receipt("P-1", [line(1, "bakery", 100_000)],
                                                                        card=CARDS[0]), as_="register"))
    release.set()
    status, r = await confirming
    assert status == 201 and r["member_id"] == "m_1" and r["accrued"]["points"] > 0
    for _ in range(100):
        status, body = await ready_status(api)
        if status == 200:
            break
        await asyncio.sleep(0.05)
    assert status == 200 and body["status"] == "ready"


async def test_every_member_and_card_is_read_in_steps(make_api, monkeypatch):
    await enrolled(make_api)
    monkeypatch.setattr(preload, "MEMBERS_PER_STEP", 3)
    monkeypatch.setattr(preload, "CARDS_PER_STEP", 2)
    ranges, cards = [], []
    real_member, real_card = preload.member_step, preload.card_step

    def member_step(conn, first, last):
        ranges.append((first, last))
        real_member(conn, first, last)

    def card_step(conn, after, count):
        last = real_card(conn, after, count)
        cards.append(last)
        return last

    monkeypatch.setattr(preload, "member_step", member_step)
    monkeypatch.setattr(preload, "card_step", card_step)
    api = await make_api(now=NOW, database={"preload": True})
    for _ in range(100):
        if (await ready_status(api))[0] == 200:
            break
        await asyncio.sleep(0.05)
    assert ranges == [(1, 3), (4, 6), (7, 9)]
    assert len(cards) == 5 and cards[-1] is None            # 7 cards, 2 a step, then the end
    assert cards[:-1] == sorted(cards[:-1])
