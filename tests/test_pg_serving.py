"""The server on PostgreSQL (`database.url`): the same answers as on SQLite, and several
server processes on one database.

Each test gets an empty database of a throwaway cluster (tests/pg_cluster.py) and skips,
saying why, without PostgreSQL.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import msgspec
import pytest
import yaml
from conftest import KEYS, MARKET, Api, line, receipt, test_config
from test_crash_safety import NOW, Server

from server.app import create_app
from server.config import DatabaseConfig
from storage.audit import verify
from storage.pg.connection import connect

ROOT = Path(__file__).resolve().parent.parent
CARD = "7000000000002"
SAME_RECEIPT_SENT = 8           # at once, spread over the servers: one writes it, the rest replay it
ANSWER_TIMEOUT_S = 60           # generous: the machine is shared


async def a_day_at_the_till(api: Api) -> list:
    """A gold member with points pays part of a receipt with them, returns one of its lines,
    buys again and cancels that: every answer, in order."""
    answers = [await api.post("/v1/members", {"card": CARD}),
               await api.put(f"/v1/admin/members/{CARD}/tier", {"tier": "gold", "until": "2027-12-31"}),
               await api.post("/v1/admin/adjustments", {"card": CARD, "points": 4900, "reason": "migration",
                                                        "adjustment_id": "adj-1"})]
    basket = receipt("B-1", [line(1, "alcohol", 30000, sku="wine-1"), line(2, "dairy", 20000, sku="cheese-1"),
                             line(3, "grocery", 50000, sku="coffee-1")], card=CARD, redeem=1000)
    answers.append(await api.post("/v1/receipts", basket, as_="register"))
    answers.append(await api.post("/v1/receipts", basket, as_="register"))          # a retry: replayed
    answers.append(await api.post("/v1/returns", {
        "return_id": "RET-1", "store_id": "S001", "register_id": "K01",
        "receipt": {"store_id": "S001", "register_id": "K01", "receipt_id": "B-1"},
        "lines": [{"line_no": 3, "qty": 1}]}, as_="register"))
    answers.append(await api.post("/v1/receipts", receipt("B-2", [line(1, "dairy", 12000, sku="milk-1")],
                                                          card=CARD, redeem=50), as_="register"))
    answers.append(await api.post("/v1/receipts/S001/K01/B-2/cancel", as_="register"))
    answers.append(await api.get(f"/v1/members/{CARD}"))
    answers.append(await api.get(f"/v1/members/{CARD}/statement"))
    return answers


async def test_confirm_return_and_cancel_answer_on_postgresql_as_on_sqlite(aiohttp_client, tmp_path, pg_url):
    sqlite_config = test_config(tmp_path / "sqlite", NOW)
    pg_config = msgspec.structs.replace(test_config(tmp_path / "pg", NOW), database=DatabaseConfig(url=pg_url))
    (tmp_path / "sqlite").mkdir()
    on_sqlite = await a_day_at_the_till(Api(await aiohttp_client(create_app(sqlite_config))))
    on_postgresql = await a_day_at_the_till(Api(await aiohttp_client(create_app(pg_config))))
    assert [status for status, _ in on_sqlite] == [201, 200, 201, 201, 200, 201, 201, 200, 200, 200]
    assert without_moments(on_postgresql) == without_moments(on_sqlite)
    conn = connect(pg_url)
    try:
        report = verify(conn)
        receipts = conn.execute("SELECT receipt_id, status FROM receipts ORDER BY receipt_id").fetchall()
    finally:
        conn.close()
    assert report.problems == [] and report.liability == on_sqlite[-2][1]["balance"]["available"] + \
        on_sqlite[-2][1]["balance"]["pending"]
    assert receipts == [("B-1", "confirmed"), ("B-2", "cancelled")]


# Fields that say when a request was served (the test clock runs on from its start).
MOMENTS = {"enrolled_at", "as_of", "at", "recorded_at"}


def without_moments(value):
    if isinstance(value, dict):
        return {k: without_moments(v) for k, v in value.items() if k not in MOMENTS}
    if isinstance(value, (list, tuple)):
        return [without_moments(v) for v in value]
    return value


def on_postgresql(server: Server, url: str) -> Server:
    """The harness's server with `database: {url: ...}` in place of its SQLite file."""
    config = yaml.safe_load(server.config.read_text())
    config["database"] = {"url": url}
    server.config.write_text(yaml.safe_dump(config))
    return server


def post(server: Server, path: str, body: dict, key: str) -> tuple[int, dict]:
    request = urllib.request.Request(server.url(path), data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=ANSWER_TIMEOUT_S) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_same_receipt_sent_to_two_servers_at_once_is_written_once(tmp_path, pg_url):
    servers = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        servers.append(on_postgresql(Server(tmp_path / name), pg_url))
    try:
        for server in servers:      # one after the other: the second finds the migrations done
            server.start()
        assert post(servers[0], "/v1/members", {"card": CARD}, KEYS["manager"])[0] == 201
        body = receipt("R-1", [line(1, "dairy", 9100, qty=2, sku="4820000000011", price=4550)], card=CARD)
        answers: list[tuple[int, dict]] = []
        start = threading.Barrier(SAME_RECEIPT_SENT)

        def send(server: Server) -> None:
            start.wait()
            answers.append(post(server, "/v1/receipts", body, KEYS["register"]))
        threads = [threading.Thread(target=send, args=(servers[i % 2],)) for i in range(SAME_RECEIPT_SENT)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(ANSWER_TIMEOUT_S)
        statuses = sorted(status for status, _ in answers)
        assert statuses == [200] * (SAME_RECEIPT_SENT - 1) + [201], answers
        first = next(answer for status, answer in answers if status == 201)
        assert all(answer == {**first, "replayed": True} for status, answer in answers if status == 200)
        # A hold taken through one server is seen by the other, whose clock started later.
        held = post(servers[0], "/v1/receipts/calculate", receipt("R-2", [line(1, "dairy", 30000)], card=CARD,
                                                                      redeem=100), KEYS["register"])
        assert held[0] == 200 and held[1]["balance"]["held"] == 100, held
        other = post(servers[1], "/v1/receipts/calculate", receipt("R-3", [line(1, "dairy", 30000)], card=CARD,
                                                                       redeem=100, register="K02"), KEYS["register"])
        assert other[0] == 422 and other[1]["error"]["code"] == "insufficient_points", other   # the 100 are held
    finally:
        for server in servers:
            server.kill()
    conn = connect(pg_url)
    try:
        assert conn.execute("SELECT COUNT(*) FROM receipts").fetchone() == (1,)
        assert conn.execute("SELECT COUNT(*) FROM postings WHERE receipt_id = 'R-1'").fetchone() == (1,)
    finally:
        conn.close()
    audit = subprocess.run([sys.executable, "-m", "server.cli", "audit", "verify", "--config",
                            str(servers[0].config)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "ok: " in audit.stdout


BUDGETED = """
rules:
  - id: launch
    reward: {points: 30}
    budget: {points: 50}
"""
SERVERS = 3


def test_servers_sharing_a_database_never_overspend_a_member_nor_a_budget(tmp_path, pg_url):
    """Redemptions of one member and receipts of many members firing a budgeted rule, at once
    over three servers, with a hold one of them took: the member's points are spent at most
    once, the hold is kept for its receipt, and the budget is never exceeded."""
    program = tmp_path / "program"
    shutil.copytree(MARKET, program)
    (program / "launch.yaml").write_text(BUDGETED)
    servers = []
    for name in "abc"[:SERVERS]:
        (tmp_path / name).mkdir()
        servers.append(on_postgresql(Server(tmp_path / name, rules={"dir": str(program), "watch": False}), pg_url))
    try:
        for server in servers:
            server.start()
        assert post(servers[0], "/v1/members", {"card": CARD}, KEYS["manager"])[0] == 201
        assert post(servers[1], "/v1/admin/adjustments", {"card": CARD, "points": 900, "reason": "r",
                                                          "adjustment_id": "A-1"}, KEYS["manager"])[0] == 201
        for n in range(6):
            assert post(servers[n % SERVERS], "/v1/members", {"card": f"70000000001{n:02d}"}, KEYS["manager"])[0] == 201
        held = receipt("H-1", [line(1, "grocery", 100000)], card=CARD, redeem=400, register="K99")
        status, calc = post(servers[0], "/v1/receipts/calculate", held, KEYS["register"])
        assert status == 200 and calc["hold"]["points"] == 400, calc
        bodies = [receipt(f"R-{n}", [line(1, "grocery", 100000)], card=CARD, redeem=300, register=f"K{n:02d}")
                  for n in range(6)]
        bodies += [receipt(f"O-{n}", [line(1, "bakery", 1000)], card=f"70000000001{n:02d}", register=f"K{n:02d}")
                   for n in range(6)]

        answers = asyncio.run(at_once(servers, "/v1/receipts", bodies))
        assert all(status in (201, 422) for status, _ in answers), answers
        assert all(body["error"]["code"] == "insufficient_points" for status, body in answers if status == 422)
        spent = sum(body["redeemed"]["points"] for status, body in answers if status == 201)
        assert spent <= 1000 - 400, answers
        launch = sum(r["points"] for status, body in answers if status == 201
                     for r in body["accrued"]["by_rule"] if r["rule"] == "launch")
        assert launch == 50, answers
        # The hold taken through the first server is kept for its receipt, confirmed through the last.
        status, confirmed = post(servers[-1], "/v1/receipts", held, KEYS["register"])
        assert status == 201 and confirmed["redeemed"]["points"] == 400, confirmed
        assert confirmed["balance"]["available"] == 1000 - 400 - spent
        # One receipt's line returned through every server at once, six times under one return
        # id and twice under another: one return, its copies replayed, the other refused.
        returns = [{"return_id": return_id, "store_id": "S001", "register_id": "K99",
                    "receipt": {"store_id": "S001", "register_id": "K99", "receipt_id": "H-1"},
                    "lines": [{"line_no": 1, "qty": 1}]} for return_id in ["RET-1"] * 6 + ["RET-2"] * 2]
        returned = asyncio.run(at_once(servers, "/v1/returns", returns))
        outcomes = sorted((status, body["return"]["return_id"] if status < 300 else body["error"]["code"])
                          for status, body in returned)
        assert outcomes in ([(200, "RET-1")] * 5 + [(201, "RET-1")] + [(422, "return_exceeds_sold")] * 2,
                            [(200, "RET-2"), (201, "RET-2")] + [(422, "return_exceeds_sold")] * 6), returned
    finally:
        for server in servers:
            server.kill()
    audit = subprocess.run([sys.executable, "-m", "server.cli", "audit", "verify", "--config",
                            str(servers[0].config)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert audit.returncode == 0, audit.stdout + audit.stderr


async def at_once(servers, path: str, bodies: list[dict]) -> list[tuple[int, dict]]:
    """Each body posted to `path` at the same time, through the servers in turn, as registers."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEYS['register']}"}) as session:
        async def send(n: int, body: dict) -> tuple[int, dict]:
            async with session.post(servers[n % len(servers)].url(path), json=body) as answer:
                return answer.status, await answer.json()
        return await asyncio.gather(*(send(n, body) for n, body in enumerate(bodies)))
