"""The console's memory stays flat under many checks as you type and backtests: each check
compiles the whole edited program, each backtest two programs and a replay of the stored
receipts, and neither may leave anything behind (engines, connections, finished jobs
beyond `console.backtests_kept`, session state).

`make test` runs 1,000 checks and 200 backtests; `make faulttest` (FAULT_LONG=1) 1,000 of
each. Memory is the server process's resident set (the test client serves the app in
this process) and the number of live Python objects, each compared after a warm-up with a
generous bound: a leak of a compiled program or a report per round would pass it within
the first few hundred rounds.
"""
from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import re
import shutil

from conftest import MARKET, line, receipt
from test_console import PROMOS, Console

from server.keys import CONSOLE

NOW = "2026-11-24T12:00:05+02:00"
CARD = "7000000000001"
CHECKS = 1_000
BACKTESTS = 1_000 if os.environ.get("FAULT_LONG") else 200
WARM_UP = 50
RSS_GROWTH_MAX_MIB = 16
OBJECTS_GROWTH_MAX = 2_000
BACKTEST_SECONDS_MAX = 30       # one backtest of a few receipts; generous for a loaded machine


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def live_objects() -> int:
    gc.collect()
    return len(gc.get_objects())


async def check(api, console, text: str) -> None:
    response = await api.client.post("/console/program/check", json={"file": PROMOS, "text": text},
                                     headers={"X-CSRF-Token": console.csrf})
    assert response.status == 200 and (await response.json())["ok"] is True


async def backtest(api, console, text: str, base: str) -> None:
    form = {"file": PROMOS, "text": text, "base_sha256": base, "from": "2026-11-01", "to": "2026-11-30"}
    status, location, page = await console.post("/console/program/backtest", form)
    assert status == 303, page
    job = api.client.server.app[CONSOLE].backtests.get(location.rsplit("/", 1)[1])
    for _ in range(BACKTEST_SECONDS_MAX * 200):
        if job.state != "running":
            break
        await asyncio.sleep(0.005)
    assert job.state == "done" and job.report.receipts == 3, (job.state, job.error)


async def test_memory_stays_flat_over_many_checks_and_backtests(make_api, tmp_path):
    program_dir = tmp_path / "program"
    shutil.copytree(MARKET, program_dir)
    api = await make_api(now=NOW, program_dir=program_dir)
    assert (await api.post("/v1/members", {"card": CARD}))[0] == 201
    for n, category in enumerate(["dairy", "bakery", "dairy"]):
        body = receipt(f"r{n}", [line(1, category, 9100 + n)], card=CARD, ts=f"2026-11-2{n}T12:00:00+02:00")
        assert (await api.post("/v1/receipts", body, as_="register"))[0] == 201
    console = Console(api.client)
    await console.sign_in()
    text = (program_dir / PROMOS).read_text()
    base = hashlib.sha256(text.encode()).hexdigest()
    edits = [re.sub(r"by: 2", f"by: {2 + n % 3}", text) for n in range(3)]

    async def rounds(checks: int, backtests: int) -> None:
        for n in range(max(checks, backtests)):
            if n < checks:
                await check(api, console, edits[n % 3])
            if n < backtests:
                await backtest(api, console, edits[n % 3], base)
            # The test client keeps every response it made, to close them when it ends;
            # these were read and released, and are the client's memory, not the server's.
            api.client._responses.clear()

    await rounds(WARM_UP, WARM_UP)
    rss, objects = rss_mib(), live_objects()
    await rounds(CHECKS, BACKTESTS)
    rss_after, objects_after = rss_mib(), live_objects()
    print(f"\n{CHECKS} checks and {BACKTESTS} backtests: RSS {rss:.1f} -> {rss_after:.1f} MiB, "
          f"live objects {objects} -> {objects_after}")
    assert rss_after - rss < RSS_GROWTH_MAX_MIB
    assert objects_after - objects < OBJECTS_GROWTH_MAX
