"""Overload: a flood against a server with a tiny write queue and in-flight cap is shed with
503 overloaded (never another 5xx) and loses nothing: every receipt answered 201 is stored,
every one shed wrote nothing and goes through when sent again; memory stays flat, and it
recovers. How quickly it sheds is the benchmarks' to measure, not a test's."""
from __future__ import annotations

import asyncio
from contextlib import closing

import aiohttp

from conftest import KEYS, connect
from test_crash_safety import NOW, Server
from test_error_shape import assert_error_shape

CLIENTS = 200
ROUNDS = 6
RESENT_AT_ONCE = 1          # a register sending its shed receipts again, one after another


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


async def flood(server: Server, numbers, at_once: int | None = None) -> list[tuple[int, int, dict, str | None]]:
    """(receipt number, status, body, Retry-After) of each receipt confirmed, all at once
    unless at_once limits how many are in flight."""
    out = []
    headers = {"Authorization": f"Bearer {KEYS['register']}"}
    gate = asyncio.Semaphore(at_once or len(numbers))

    async def one(session, n):
        async with gate, session.post(server.url("/v1/receipts"), json=receipt(n), headers=headers) as resp:
            out.append((n, resp.status, await resp.json(), resp.headers.get("Retry-After")))

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        await asyncio.gather(*(one(session, n) for n in numbers))
    return out


async def single(server: Server, path: str, body: dict | None, role: str) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.request("POST" if body else "GET", server.url(path), json=body,
                                   headers={"Authorization": f"Bearer {KEYS[role]}"}) as resp:
            return resp.status


def stored_receipts(server: Server) -> set[str]:
    with closing(connect(server.db)) as conn:
        return {r[0] for r in conn.execute("SELECT receipt_id FROM receipts WHERE status = 'confirmed'")}


def test_a_flood_is_shed_without_losing_a_receipt_and_the_server_recovers(tmp_path):
    server = Server(tmp_path, server={"requests_in_flight_max": 16}, database={"write_queue_max": 2})
    server.start()
    try:
        assert asyncio.run(single(server, "/v1/members", {"card": "card-1"}, "manager")) == 201
        answers = asyncio.run(flood(server, range(10_000, 10_000 + CLIENTS)))   # warm up: imports, caches, pools
        rss_before = rss_kib(server.proc.pid)
        for r in range(ROUNDS):
            answers += asyncio.run(flood(server, range(r * CLIENTS, (r + 1) * CLIENTS)))
        rss_after = rss_kib(server.proc.pid)

        statuses = {s for _, s, *_ in answers}
        written = {f"ov-{n}" for n, s, *_ in answers if s == 201}
        shed = [(n, body, retry) for n, s, body, retry in answers if s == 503]
        print(f"{len(answers)} requests: {len(written)} written, {len(shed)} shed; "
              f"RSS {rss_before} -> {rss_after} KiB")
        assert statuses <= {201, 503}, statuses
        assert len(shed) > len(answers) // 4, "the flood was not shed"
        for _, body, retry in shed:
            assert_error_shape(body)
            assert body["error"]["code"] == "overloaded" and retry == "1"
        # Every receipt acknowledged is stored; none shed is.
        assert stored_receipts(server) == written
        assert rss_after - rss_before < 50 * 1024, (rss_before, rss_after)

        # Recovered: what was shed goes through when sent again, and the server is ready.
        again = asyncio.run(flood(server, [n for n, _, _ in shed], at_once=RESENT_AT_ONCE))
        assert sorted(s for _, s, *_ in again) == [201] * len(shed)
        assert stored_receipts(server) == {receipt(n)["receipt_id"] for n, *_ in answers}
        assert asyncio.run(single(server, "/readyz", None, "register")) == 200
    finally:
        server.kill()
