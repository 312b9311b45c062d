"""Overload: a flood against a server with a tiny write queue and in-flight cap is shed at
once with 503 overloaded (never another 5xx), memory stays flat, and it recovers."""
from __future__ import annotations

import asyncio
import statistics
import time

import aiohttp

from conftest import KEYS
from test_crash_safety import NOW, Server

CLIENTS = 200
ROUNDS = 6


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for row in f:
            if row.startswith("VmRSS:"):
                return int(row.split()[1])
    raise RuntimeError("no VmRSS")


def receipt(n: int) -> dict:
    lines = [{"line_no": 1, "sku": "x", "category": "dairy", "qty": 1, "price": 1000, "amount": 1000}]
    return {"receipt_id": f"ov-{n}", "store_id": "S001", "register_id": "K01", "ts": NOW, "card": "card-1",
            "lines": lines, "total": 1000}


async def flood(server: Server, first: int) -> list[tuple[int, float, dict, str | None]]:
    out = []
    headers = {"Authorization": f"Bearer {KEYS['register']}"}

    async def one(session, n):
        started = time.perf_counter()
        async with session.post(server.url("/v1/receipts"), json=receipt(n), headers=headers) as resp:
            body = await resp.json()
            out.append((resp.status, time.perf_counter() - started, body, resp.headers.get("Retry-After")))

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        await asyncio.gather(*(one(session, first + n) for n in range(CLIENTS)))
    return out


async def single(server: Server, path: str, body: dict | None, role: str) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.request("POST" if body else "GET", server.url(path), json=body,
                                   headers={"Authorization": f"Bearer {KEYS[role]}"}) as resp:
            return resp.status


def test_flood_is_shed_quickly_and_the_server_recovers(tmp_path):
    server = Server(tmp_path, server={"requests_in_flight_max": 16}, database={"write_queue_max": 2})
    server.start()
    try:
        assert asyncio.run(single(server, "/v1/members", {"card": "card-1"}, "manager")) == 201
        asyncio.run(flood(server, 10_000))              # warm up: imports, caches, pools
        rss_before = rss_kib(server.proc.pid)
        answers = []
        for r in range(ROUNDS):
            answers += asyncio.run(flood(server, r * CLIENTS))
        rss_after = rss_kib(server.proc.pid)

        statuses = {s for s, *_ in answers}
        print(f"{len(answers)} requests: {sum(s == 201 for s, *_ in answers)} written, "
              f"{sum(s == 503 for s, *_ in answers)} shed; RSS {rss_before} -> {rss_after} KiB")
        assert statuses <= {201, 503}, statuses
        shed = [(t, body, retry) for s, t, body, retry in answers if s == 503]
        assert len(shed) > len(answers) // 4, "the flood was not shed"
        assert {body["error"]["code"] for _, body, _ in shed} == {"overloaded"}
        assert all(retry == "1" for _, _, retry in shed)
        assert statistics.median(t for t, _, _ in shed) < 0.5
        assert rss_after - rss_before < 50 * 1024, (rss_before, rss_after)

        # Recovered: a single request goes through and the server is ready.
        assert asyncio.run(single(server, "/v1/receipts", receipt(99_999), "register")) == 201
        assert asyncio.run(single(server, "/readyz", None, "register")) == 200
    finally:
        server.kill()
