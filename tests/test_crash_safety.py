"""Kill -9 the real server under load, many times: nothing acknowledged is lost or doubled.

Each cycle starts `loyalty serve` on the same database, drives concurrent confirms,
returns and adjustments, kills the process with SIGKILL at a random moment and starts it
again. Every request is then retried with its original body: an acknowledged one must
come back `replayed` with the same result, an unacknowledged one either replays (it was
committed before the kill) or is written now. Finally the database itself is checked.

`make test` runs a short form; `make crashtest` runs CRASH_CYCLES (default 50).
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import yaml

from conftest import KEYS, MARKET, _h, connect, database_section
from storage.ledger import unpack

CYCLES = int(os.environ.get("CRASH_CYCLES", "3"))
MEMBERS = 12
WORKERS = 16
NOW = "2026-11-24T12:00:00+02:00"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`loyalty serve` as a child process; `extra` sets more config sections. Its database is
    `db`, the SQLite file, or on PostgreSQL the database conftest's database_section maps it to."""

    def __init__(self, tmp: Path, **extra):
        self.port = free_port()
        self.db = tmp / "loyalty.db"
        self.config = tmp / "config.yaml"
        self.log = tmp / "server.log"
        config = {
            "server": {"host": "127.0.0.1", "port": self.port},
            "database": database_section(self.db),
            "rules": {"dir": str(MARKET), "watch": False},
            "clock": {"start": NOW},
            "auth": {"keys": [
                {"id": "register-S001", "sha256": _h(KEYS["register"]), "role": "register", "stores": ["S001"]},
                {"id": "register-S002", "sha256": _h(KEYS["register2"]), "role": "register", "stores": ["S002"]},
                {"id": "manager", "sha256": _h(KEYS["manager"]), "role": "manager"}]},
            # The load here is one key's: the rate limit is not what this test is about.
            "limits": {"requests_per_second_per_key": 1_000_000, "burst": 1_000_000},
        }
        for section, values in extra.items():
            config.setdefault(section, {}).update(values)
        self.config.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--config", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        raise RuntimeError("server did not start:\n" + self.log.read_text()[-2000:])

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


class Load:
    """Generates requests and remembers every answer that was a 2xx."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.sent: dict[str, tuple[str, dict, str]] = {}       # id -> (path, body, role)
        self.acked: dict[str, dict] = {}                        # id -> answer body
        self.confirmed: list[str] = []
        self.n = 0

    def next_request(self) -> tuple[str, str, dict, str]:
        self.n += 1
        kind = self.rng.random()
        if kind < 0.15 and self.confirmed:
            receipt_id = self.rng.choice(self.confirmed)
            rid = f"ret-{self.n}"
            body = {"return_id": rid, "store_id": "S001", "register_id": "K01",
                    "receipt": {"store_id": "S001", "register_id": "K01", "receipt_id": receipt_id},
                    "lines": [{"line_no": 1, "qty": 1}]}
            return rid, "/v1/returns", body, "register"
        if kind < 0.25:
            rid = f"adj-{self.n}"
            body = {"card": f"card-{self.rng.randrange(MEMBERS)}", "points": self.rng.choice([50, 200, -10]),
                    "reason": "crash test", "adjustment_id": rid}
            return rid, "/v1/admin/adjustments", body, "manager"
        rid = f"r-{self.n}"
        amount = self.rng.randrange(1000, 150000)
        body = {"receipt_id": rid, "store_id": "S001", "register_id": "K01", "ts": NOW,
                "card": f"card-{self.rng.randrange(MEMBERS)}",
                "lines": [{"line_no": 1, "sku": "x", "category": self.rng.choice(["dairy", "grocery"]),
                           "qty": 2, "price": amount // 2, "amount": amount}],
                "total": amount, "redeem_points": self.rng.choice([0, 0, 0, 20])}
        return rid, "/v1/receipts", body, "register"


async def send(session, server: Server, path: str, body: dict, role: str):
    async with session.post(server.url(path), json=body,
                            headers={"Authorization": f"Bearer {KEYS[role]}"}) as resp:
        return resp.status, await resp.json()


async def drive(server: Server, load: Load, seconds: float) -> None:
    stop = time.monotonic() + seconds

    async def worker(session):
        while time.monotonic() < stop:
            rid, path, body, role = load.next_request()
            load.sent[rid] = (path, body, role)
            try:
                status, answer = await send(session, server, path, body, role)
            except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError):
                return            # the server is gone
            assert status < 500, (status, answer)
            if status in (200, 201):
                load.acked[rid] = answer
                if path == "/v1/receipts":
                    load.confirmed.append(rid)

    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(WORKERS)))


async def enroll(server: Server) -> None:
    async with aiohttp.ClientSession() as session:
        for i in range(MEMBERS):
            status, _ = await send(session, server, "/v1/members", {"card": f"card-{i}"}, "manager")
            assert status in (201, 409)
            await send(session, server, "/v1/admin/adjustments",
                       {"card": f"card-{i}", "points": 1000, "reason": "seed", "adjustment_id": f"seed-{i}"},
                       "manager")


async def retry_everything(server: Server, load: Load, unavailable_s: float = 0.0) -> None:
    """unavailable_s: how long a request answered 503 `storage_unavailable` is sent again,
    after its Retry-After, as a till does (a server whose database just came back may still
    be waiting out its reconnect back-off); 0: such an answer fails the test."""
    async with aiohttp.ClientSession() as session:
        for rid, (path, body, role) in list(load.sent.items()):
            deadline = time.monotonic() + unavailable_s
            status, answer = await send(session, server, path, body, role)
            while (status == 503 and answer["error"]["code"] == "storage_unavailable"
                   and time.monotonic() < deadline):
                await asyncio.sleep(0.5)
                status, answer = await send(session, server, path, body, role)
            if rid in load.acked:
                assert status == 200 and answer.get("replayed") is True, (rid, status, answer)
                strip = {"replayed", "balance"}
                assert {k: v for k, v in answer.items() if k not in strip} == \
                       {k: v for k, v in load.acked[rid].items() if k not in strip}, rid
            else:
                # Never acknowledged: committed before the kill (replay) or refused for a business
                # reason (422), or written now (201). Never a 409: the body is the same.
                assert status in (200, 201, 422), (rid, status, answer)
                if status in (200, 201):
                    load.acked[rid] = answer
                    if path == "/v1/receipts" and status == 201:
                        load.confirmed.append(rid)


def check_database(db: Path, load: Load) -> None:
    conn = connect(db)
    try:
        check_ledger(conn, load)
    finally:
        conn.close()


def check_ledger(conn, load: Load) -> None:
    """What was acknowledged is stored once, with the postings its answer gave. `conn` is
    sqlite3's or storage.pg.connection's: the SQL is what both accept."""
    receipts = {r[0]: json.loads(stored(r[1])) for r in conn.execute("SELECT receipt_id, result FROM receipts")}
    for rid, answer in load.acked.items():
        if rid.startswith("r-"):
            assert rid in receipts, f"acknowledged receipt {rid} is missing"
    for rid, result in receipts.items():
        accrued = conn.execute("SELECT COALESCE(SUM(points), 0) FROM postings WHERE receipt_id = ? "
                               "AND kind = 'accrual'", (rid,)).fetchone()[0]
        redeemed = conn.execute("SELECT COALESCE(SUM(points), 0) FROM postings WHERE receipt_id = ? "
                                "AND kind = 'redemption'", (rid,)).fetchone()[0]
        assert accrued == result["accrued"]["points"], rid
        assert -redeemed == result["redeemed"]["points"], rid
    orphans = conn.execute("SELECT COUNT(*) FROM postings p WHERE receipt_id IS NOT NULL AND NOT EXISTS "
                           "(SELECT 1 FROM receipts r WHERE r.store_id = p.store_id AND r.register_id = "
                           "p.register_id AND r.receipt_id = p.receipt_id)").fetchone()[0]
    assert orphans == 0, "postings without their receipt"
    adjustments = dict(conn.execute("SELECT adjustment_id, points FROM adjustments"))
    for rid in load.acked:
        if rid.startswith("adj-"):
            assert rid in adjustments, f"acknowledged adjustment {rid} is missing"
    for rid, points in adjustments.items():
        posted = conn.execute("SELECT SUM(points) FROM postings WHERE ref = ?", (f"adjustment:{rid}",)).fetchone()[0]
        assert posted == points, rid
    for ref, result in conn.execute("SELECT store_id || '/' || register_id || '/' || return_id, result "
                                    "FROM returns"):
        answer = json.loads(stored(result))
        reversed_ = conn.execute("SELECT COALESCE(SUM(points), 0) FROM postings WHERE ref = ? AND kind = 'reversal'",
                                 (ref,)).fetchone()[0]
        refunded = conn.execute("SELECT COALESCE(SUM(points), 0) FROM postings WHERE ref = ? AND kind = 'refund'",
                                (ref,)).fetchone()[0]
        assert -reversed_ == answer["reversed"]["points"] and refunded == answer["refunded"]["points"], ref
    negative = conn.execute("SELECT COUNT(*) FROM (SELECT lot_id, SUM(points) s FROM postings "
                            "WHERE kind IN ('accrual','adjustment','event','redemption','refund') "
                            "GROUP BY lot_id HAVING SUM(points) < 0) overspent").fetchone()[0]
    assert negative == 0, "a lot was overspent"


def stored(result: str | bytes) -> str | bytes:
    """A stored answer as JSON: SQLite keeps a return's as text, PostgreSQL as bytea, and a
    receipt's may be packed on either."""
    return result if isinstance(result, str) else unpack(bytes(result))


def test_sigkill_under_load_loses_and_doubles_nothing(tmp_path):
    server = Server(tmp_path)
    load = Load(seed=int(os.environ.get("CRASH_SEED", "7")))
    try:
        server.start()
        asyncio.run(enroll(server))
        for cycle in range(CYCLES):
            asyncio.run(drive_then_kill(server, load, load.rng.uniform(0.3, 1.2)))
            server.start()
            asyncio.run(retry_everything(server, load))
        server.kill()
        check_database(server.db, load)
        assert len(load.acked) > CYCLES * 10
    finally:
        server.kill()


async def drive_then_kill(server: Server, load: Load, seconds: float) -> None:
    driving = asyncio.create_task(drive(server, load, seconds + 5))
    await asyncio.sleep(seconds)
    server.kill()
    await driving
