"""The storage metrics on PostgreSQL mean what they mean on SQLite, against a real `loyalty
serve`: each committed write is counted in loyalty_ledger_commit_*, a database that does not
answer is loyalty_storage_fault{cause="unavailable"} 1 (0 again once it answers, without a
restart) and every request it refused is counted in loyalty_storage_errors_total."""
from __future__ import annotations

import asyncio
import time

from pg_cluster import Cluster
from test_crash_safety import Server
from test_pg_crash_safety import own_cluster  # noqa: F401 - the fixture
from test_pg_serving import on_postgresql
from test_storage_faults import confirm, enroll, get, metric, receipt, session_for_tests

REFUSED_WHILE_DOWN = 6
# Generous: the machine is shared; the server's own read of the keys (every 2 s) finds the
# database gone or back when no request does.
SETTLE_S = 60

FAULT = 'loyalty_storage_fault{cause="unavailable"}'
ERRORS = 'loyalty_storage_errors_total{cause="unavailable"}'
COMMITS = "loyalty_ledger_commit_batch_size_count"
COMMIT_TIME = "loyalty_ledger_commit_seconds_count"


async def metrics(session, server: Server) -> str:
    status, text = await get(session, server, "/metrics")
    assert status == 200, text
    return text


async def until_metric(session, server: Server, name: str, value: float) -> str:
    deadline = time.monotonic() + SETTLE_S
    while metric(text := await metrics(session, server), name) != value:
        assert time.monotonic() < deadline, f"{name} stayed {metric(text, name)}, not {value}"
        await asyncio.sleep(0.2)
    return text


async def stopped_and_started(server: Server, cluster: Cluster) -> None:
    async with session_for_tests() as session:
        await enroll(session, server)
        assert (await confirm(session, server, receipt(0)))[0] == 201
        text = await metrics(session, server)
        assert metric(text, FAULT) == 0 and metric(text, ERRORS) == 0
        commits_before = metric(text, COMMITS)
        assert commits_before >= 1 and metric(text, COMMIT_TIME) == commits_before
        assert metric(text, "loyalty_ledger_commit_batch_size_sum") == commits_before   # one write each

        await asyncio.to_thread(cluster.stop_server, "fast")
        for n in range(1, REFUSED_WHILE_DOWN + 1):
            status, body, _ = await confirm(session, server, receipt(n))
            assert status == 503 and body["error"]["code"] == "storage_unavailable", body
        text = await until_metric(session, server, FAULT, 1)
        assert metric(text, ERRORS) >= REFUSED_WHILE_DOWN       # and the server's own reads of the keys
        status, answer = await get(session, server, "/readyz")
        assert status == 503 and "storage_unavailable" in answer, answer

        await asyncio.to_thread(cluster.start_server)
        await until_metric(session, server, FAULT, 0)           # no request needed: the keys' read
        for n in range(1, REFUSED_WHILE_DOWN + 1):
            status, body, _ = await confirm(session, server, receipt(n))
            assert status == 201, body
        text = await metrics(session, server)
        assert metric(text, FAULT) == 0
        assert metric(text, COMMITS) >= commits_before + REFUSED_WHILE_DOWN     # the jobs' writes count too


def test_postgresql_down_and_back_shows_in_the_storage_metrics(tmp_path, own_cluster):  # noqa: F811
    server = on_postgresql(Server(tmp_path), own_cluster.url(own_cluster.createdb()))
    server.start()
    try:
        asyncio.run(stopped_and_started(server, own_cluster))
        assert server.proc.poll() is None, "the server stopped with the database"
    finally:
        server.kill()
