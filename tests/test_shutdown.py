"""SIGTERM drains: /readyz turns 503, requests in flight finish and commit, the process exits 0."""
from __future__ import annotations

import asyncio
import signal
import time

import aiohttp

from conftest import KEYS, connect
from test_crash_safety import NOW, Server

WORKERS = 24
LINES = 300          # big receipts: each confirm takes a while, so many are in flight at SIGTERM


def big_receipt(n: int) -> dict:
    lines = [{"line_no": i, "sku": f"sku-{i}", "category": "dairy" if i % 2 else "grocery", "qty": 1,
              "price": 1000 + i, "amount": 1000 + i} for i in range(1, LINES + 1)]
    return {"receipt_id": f"sd-{n}", "store_id": "S001", "register_id": "K01", "ts": NOW,
            "card": f"card-{n % 4}", "lines": lines, "total": sum(x["amount"] for x in lines)}


async def run_until_sigterm(server: Server) -> tuple[dict[str, int], list[int], int]:
    answered: dict[str, int] = {}
    readiness: list[int] = []
    counter = iter(range(10**9))
    sigterm_sent = asyncio.Event()

    async def worker(session):
        while True:
            body = big_receipt(next(counter))
            try:
                async with session.post(server.url("/v1/receipts"), json=body,
                                        headers={"Authorization": f"Bearer {KEYS['register']}"}) as resp:
                    await resp.read()
                    answered[body["receipt_id"]] = resp.status
            except (aiohttp.ClientError, asyncio.TimeoutError):
                if sigterm_sent.is_set():
                    return         # the listener is closed
                raise

    async def probe(session):
        await sigterm_sent.wait()
        while True:
            try:
                async with session.get(server.url("/readyz")) as resp:
                    readiness.append(resp.status)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return
            await asyncio.sleep(0.05)

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(server.url("/readyz")) as resp:
            readiness.append(resp.status)
        for i in range(4):
            async with session.post(server.url("/v1/members"), json={"card": f"card-{i}"},
                                    headers={"Authorization": f"Bearer {KEYS['manager']}"}) as resp:
                assert resp.status == 201
        tasks = [asyncio.create_task(worker(session)) for _ in range(WORKERS)]
        tasks.append(asyncio.create_task(probe(session)))
        await asyncio.sleep(1.0)
        answered_before_sigterm = len(answered)
        server.proc.send_signal(signal.SIGTERM)
        sigterm_sent.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
    return answered, readiness, answered_before_sigterm


def test_sigterm_finishes_and_commits_requests_in_flight(tmp_path):
    server = Server(tmp_path, server={"drain_seconds": 0.6, "shutdown_timeout_seconds": 20})
    server.start()
    try:
        answered, readiness, before = asyncio.run(run_until_sigterm(server))
        started = time.monotonic()
        code = server.proc.wait(30)
        assert code == 0, server.log.read_text()[-3000:]
        assert time.monotonic() - started < 25
    finally:
        server.kill()
    assert readiness[0] == 200
    assert 503 in readiness[1:], readiness          # draining is visible to a load balancer
    assert set(answered.values()) <= {201}, answered
    assert len(answered) > before                   # work went on being answered after SIGTERM
    conn = connect(server.db)
    stored = {r[0] for r in conn.execute("SELECT receipt_id FROM receipts")}
    lost = [rid for rid in answered if rid not in stored]
    assert not lost, f"answered but not committed: {lost}"
    for rid in answered:
        accrued = conn.execute("SELECT COALESCE(SUM(points), 0) FROM postings WHERE receipt_id = ?",
                               (rid,)).fetchone()[0]
        assert accrued > 0, rid
    conn.close()
    log = server.log.read_text()
    assert "stopping" in log and "stopped" in log
