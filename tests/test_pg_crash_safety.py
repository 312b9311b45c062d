"""Faults under load on PostgreSQL, against real `loyalty serve` processes: a server killed
with SIGKILL, PostgreSQL restarted, the primary lost and its synchronous standby promoted.
Nothing acknowledged is lost or doubled.

Registers (tills) send receipts, returns and adjustments to two servers on one database. As
a till does, each sends a request again, with the same body, after a broken connection or a
503 (to the other server), until it has an answer that is not a fault. Afterwards every
request is sent once more: an acknowledged one must come back replayed with the same answer.
Then the ledger: every acknowledged receipt, return and adjustment stored once with its
postings, each member's balance the sum of its postings, and `loyalty audit verify` exit 0.

`make test` runs a short form (CRASH_CYCLES=2 kills); `make crashtest` runs more.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from conftest import KEYS, line, receipt
from pg_cluster import Cluster, bins_or_skip, running
from test_crash_safety import MEMBERS, Load, Server, check_ledger, enroll, retry_everything
from test_pg_serving import on_postgresql

from storage.pg.connection import connect

ROOT = Path(__file__).resolve().parent.parent
CYCLES = int(os.environ.get("CRASH_CYCLES", "2"))
TILLS = 8
# Generous: the machine is shared, and a request waits out a database that is down.
ANSWER_TIMEOUT_S = 30
# A till gives a request up (the test fails) when no server has answered it this long.
DELIVER_DEADLINE_S = 120
# A 503 names its Retry-After; a till waits less, so the test does not run for minutes.
RETRY_PAUSE_S = 0.1
# Answers that tell a till to send the same request again.
RETRYABLE_CODES = {"storage_unavailable", "unavailable"}


@dataclass
class Faults:
    """What the tills were told while something was down."""
    refused: dict[str, int] = field(default_factory=dict)   # 503 code: how many
    broken: int = 0                                         # connections that broke
    acked: int = 0                                          # 2xx answers

    def refuse(self, code: str) -> None:
        self.refused[code] = self.refused.get(code, 0) + 1


class Tills:
    """TILLS registers driving `load` against `servers` until stop() and every request
    they sent has its answer."""

    def __init__(self, servers: list[Server], load: Load):
        self.servers, self.load, self.faults = servers, load, Faults()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Tills:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ANSWER_TIMEOUT_S))
        self._tasks = [asyncio.create_task(self._till(i)) for i in range(TILLS)]
        return self

    async def __aexit__(self, *exc_info) -> None:
        self._stop.set()
        try:
            await asyncio.gather(*self._tasks)
        finally:
            await self._session.close()

    async def acked_at_least(self, n: int, within_s: float = DELIVER_DEADLINE_S) -> None:
        """Waits until n more requests than now have been acknowledged."""
        target, deadline = self.faults.acked + n, time.monotonic() + within_s
        while self.faults.acked < target:
            assert time.monotonic() < deadline, f"{self.faults.acked} acknowledged, wanted {target}: {self.faults}"
            assert not any(t.done() and t.exception() for t in self._tasks), [t.exception() for t in self._tasks]
            await asyncio.sleep(0.05)

    async def _till(self, number: int) -> None:
        while not self._stop.is_set():
            rid, path, body, role = self.load.next_request()
            self.load.sent[rid] = (path, body, role)
            await self._deliver(number, rid, path, body, role)

    async def _deliver(self, number: int, rid: str, path: str, body: dict, role: str) -> None:
        deadline = time.monotonic() + DELIVER_DEADLINE_S
        for attempt in range(1_000_000):
            assert time.monotonic() < deadline, f"{rid} got no answer in {DELIVER_DEADLINE_S} s: {self.faults}"
            server = self.servers[(number + attempt) % len(self.servers)]
            try:
                async with self._session.post(server.url(path), json=body,
                                              headers={"Authorization": f"Bearer {KEYS[role]}"}) as resp:
                    status, answer, retry_after = resp.status, await resp.json(), resp.headers.get("Retry-After")
            except (aiohttp.ClientError, asyncio.TimeoutError):
                self.faults.broken += 1         # the server is down, or was killed mid-answer
                await asyncio.sleep(RETRY_PAUSE_S)
                continue
            if status == 503:
                code = answer["error"]["code"]
                assert code in RETRYABLE_CODES and retry_after and set(answer["error"]) >= {"message", "details"}, \
                    (rid, answer, retry_after)
                self.faults.refuse(code)
                await asyncio.sleep(RETRY_PAUSE_S)
                continue
            assert status < 500 and status != 409, (rid, status, answer)
            if status in (200, 201):
                self.load.acked[rid] = answer
                self.faults.acked += 1
                if path == "/v1/receipts":
                    self.load.confirmed.append(rid)
            return


def pg_servers(tmp_path: Path, url: str, count: int = 2) -> list[Server]:
    servers = []
    for i in range(count):
        (tmp_path / f"s{i}").mkdir()
        servers.append(on_postgresql(Server(tmp_path / f"s{i}"), url))
    return servers


def check_postgresql(url: str, servers: list[Server], load: Load) -> None:
    """The ledger as check_ledger sees it, the balances the servers answer equal to the
    members' postings, and `loyalty audit verify`."""
    conn = connect(url)
    try:
        check_ledger(conn, load)
        postings = dict(conn.execute("SELECT m.id, COALESCE(SUM(p.points), 0) FROM members m "
                                     "LEFT JOIN postings p ON p.member_id = m.id GROUP BY m.id").fetchall())
    finally:
        conn.close()
    for i in range(MEMBERS):
        request = urllib.request.Request(servers[i % len(servers)].url(f"/v1/members/card-{i}"),
                                         headers={"Authorization": f"Bearer {KEYS['manager']}"})
        with urllib.request.urlopen(request, timeout=ANSWER_TIMEOUT_S) as resp:
            member = json.loads(resp.read())
        balance = member["balance"]
        member_id = int(member["member_id"].removeprefix("m_"))
        assert balance["available"] + balance["pending"] + balance["held"] == postings[member_id], (member, postings)
    audit = subprocess.run([sys.executable, "-m", "server.cli", "audit", "verify", "--config", str(servers[0].config)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert audit.returncode == 0, audit.stdout + audit.stderr


def settle(servers: list[Server], load: Load, url: str, unavailable_s: float = 0.0) -> None:
    """Every request sent once more, then the ledger checked (unavailable_s: retry_everything's)."""
    asyncio.run(retry_everything(servers[0], load, unavailable_s))
    check_postgresql(url, servers, load)


def test_sigkill_of_one_of_two_servers_under_load_loses_and_doubles_nothing(tmp_path, pg_url):
    servers = pg_servers(tmp_path, pg_url)
    load = Load(seed=int(os.environ.get("CRASH_SEED", "7")))
    try:
        for server in servers:
            server.start()
        asyncio.run(enroll(servers[0]))

        async def cycles() -> Faults:
            async with Tills(servers, load) as tills:
                for cycle in range(CYCLES):
                    await asyncio.sleep(load.rng.uniform(0.3, 1.2))
                    victim = servers[cycle % len(servers)]
                    victim.kill()
                    await tills.acked_at_least(10)          # the other server carries the load
                    await asyncio.to_thread(victim.start)
                    await tills.acked_at_least(10)
            return tills.faults
        faults = asyncio.run(cycles())
        settle(servers, load, pg_url)
        assert faults.broken > 0, f"no request was cut off by a kill: {faults}"
        assert len(load.acked) > CYCLES * 20
    finally:
        for server in servers:
            server.kill()


@pytest.fixture
def own_cluster():
    """A cluster of the test's own: restarting the session's would disturb the other tests."""
    with running(Cluster(bins_or_skip())) as cluster:
        yield cluster


async def readiness(server: Server) -> int:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ANSWER_TIMEOUT_S)) as session:
        async with session.get(server.url("/readyz")) as resp:
            return resp.status


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgresql_restarted_under_load_answers_503_then_serves_and_loses_nothing(tmp_path, own_cluster, mode):
    url = own_cluster.url(own_cluster.createdb())
    servers = pg_servers(tmp_path, url)
    load = Load(seed=11)
    try:
        for server in servers:
            server.start()
        asyncio.run(enroll(servers[0]))

        async def restart() -> list[int]:
            async with Tills(servers, load) as tills:
                await tills.acked_at_least(30)
                await asyncio.to_thread(own_cluster.stop_server, mode)
                await asyncio.sleep(1.5)            # the tills keep sending meanwhile
                while_down = [await readiness(server) for server in servers]
                refused_while_down = dict(tills.faults.refused)
                await asyncio.to_thread(own_cluster.start_server)
                await tills.acked_at_least(30)       # without restarting the servers
            assert refused_while_down.get("storage_unavailable"), tills.faults
            return while_down
        assert asyncio.run(restart()) == [503, 503]
        assert all(server.proc.poll() is None for server in servers), "a server stopped with the database"
        wait_ready(servers)
        settle(servers, load, url)
    finally:
        for server in servers:
            server.kill()


def wait_ready(servers: list[Server], statuses: list[int] | None = None) -> None:
    """Until each server's /readyz answers its status in `statuses` (200 by default)."""
    wanted = statuses or [200] * len(servers)
    deadline = time.monotonic() + DELIVER_DEADLINE_S
    while (ready := [asyncio.run(readiness(server)) for server in servers]) != wanted:
        assert time.monotonic() < deadline, ready
        time.sleep(0.2)


def test_failover_through_http_loses_nothing_and_resumes_without_a_restart(tmp_path, pg_pair):
    url = pg_pair.url()
    servers = pg_servers(tmp_path, url)
    load = Load(seed=13)
    try:
        for server in servers:
            server.start()
        asyncio.run(enroll(servers[0]))

        async def failover() -> Faults:
            async with Tills(servers, load) as tills:
                await tills.acked_at_least(30)
                pg_pair.primary.kill()
                await asyncio.sleep(1)
                await asyncio.to_thread(pg_pair.promote)
                await tills.acked_at_least(30)       # on the promoted standby, the servers as they were
            return tills.faults
        faults = asyncio.run(failover())
        assert faults.refused.get("storage_unavailable"), faults
        assert all(server.proc.poll() is None for server in servers), "a server stopped at the failover"
        # The tills' acknowledgements may all have come through one server while the other
        # still waits out its reconnect back-off: both are ready again before the retries.
        wait_ready(servers)
        settle(servers, load, url, unavailable_s=DELIVER_DEADLINE_S)
    finally:
        for server in servers:
            server.kill()


def test_the_first_receipts_after_postgresql_restarted_are_written(tmp_path, own_cluster):
    """Connections the servers opened before the restart are dead, though no one has used
    them since: a receipt that finds its one dead is written on a new connection, not
    refused."""
    url = own_cluster.url(own_cluster.createdb())
    servers = pg_servers(tmp_path, url)
    try:
        for server in servers:
            server.start()
        asyncio.run(enroll(servers[0]))

        async def confirm_at_once(batch: str) -> list[tuple[int, dict]]:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ANSWER_TIMEOUT_S)) as session:
                async def one(i: int) -> tuple[int, dict]:
                    body = receipt(f"{batch}-{i}", [line(1, "dairy", 9100)], card=f"card-{i % MEMBERS}")
                    async with session.post(servers[i % len(servers)].url("/v1/receipts"), json=body,
                                            headers={"Authorization": f"Bearer {KEYS['register']}"}) as resp:
                        return resp.status, await resp.json()
                # Enough at once that each server's pool has every connection it may open in use.
                return await asyncio.gather(*(one(i) for i in range(4 * TILLS)))
        assert {status for status, _ in asyncio.run(confirm_at_once("before"))} == {201}
        own_cluster.stop_server("fast")
        # No request comes meanwhile: the servers' own reads (the keys' refresh every 2 s)
        # find the database gone.
        wait_ready(servers, [503] * len(servers))
        own_cluster.start_server()
        # Ready again: a connect has succeeded since, and the connections opened before the
        # restart are still in the pools.
        wait_ready(servers)
        refused = [answer for status, answer in asyncio.run(confirm_at_once("after")) if status != 201]
        assert not refused, refused
    finally:
        for server in servers:
            server.kill()

