"""A manager edits a rule file by hand while registers confirm receipts: no receipt fails,
and each is evaluated wholly by one program version (never a half-written file)."""
import asyncio
import shutil

from conftest import MARKET, line, receipt

from server.keys import DATABASE

NOW = "2026-11-24T12:00:05+02:00"


async def test_editing_while_confirming(make_api, tmp_path):
    program = tmp_path / "program"
    shutil.copytree(MARKET, program)
    api = await make_api(now=NOW, program_dir=program,
                         rules={"watch": True, "poll_interval_ms": 50, "settle_ms": 100})
    for i in range(12):           # spread over members so nobody climbs a tier meanwhile
        await api.post("/v1/members", {"card": f"c{i}"})
    base = next(program.rglob("base.yaml"))
    original = base.read_text()
    stop = asyncio.Event()

    async def editor():
        percent = 2
        while not stop.is_set():
            percent = 4 if percent == 2 else 2
            text = original.replace("percent: 2", f"percent: {percent}", 1)
            # An editor that writes in two steps: the half-written file must never be served.
            base.write_text(text[: len(text) // 2])
            await asyncio.sleep(0.03)
            base.write_text(text)
            await asyncio.sleep(0.25)

    async def register(n):
        body = receipt(f"E-{n}", [line(1, "bakery", 10000)], card=f"c{n % 12}", ts="2026-11-24T12:00:00+02:00",
                       register=f"K{n % 4}")
        return await api.post("/v1/receipts", body, as_="register")

    editing = asyncio.create_task(editor())
    answers = []
    for batch in range(12):
        answers += await asyncio.gather(*(register(batch * 10 + i) for i in range(10)))
        await asyncio.sleep(0.1)
    stop.set()
    await editing

    assert all(status == 201 for status, _ in answers), [a for a in answers if a[0] != 201][:3]
    by_version: dict[str, set[int]] = {}
    for _, r in answers:
        base_points = next((x["points"] for x in r["accrued"]["by_rule"] if x["rule"] == "base"), None)
        assert base_points is not None, r
        by_version.setdefault(r["rules_version"], set()).add(base_points)
    assert len(by_version) >= 2                     # the edits were picked up while receipts flowed
    assert all(len(points) == 1 and points <= {2, 4} for points in by_version.values())
    # What was written says the same version as the answer: the receipt's row and its postings.
    written = await api.client.server.app[DATABASE].read(lambda conn: conn.execute(
        "SELECT r.receipt_id, r.rules_version, p.rules_version FROM receipts r JOIN postings p "
        "ON p.store_id = r.store_id AND p.register_id = r.register_id AND p.receipt_id = r.receipt_id").fetchall())
    answered = {r["receipt"]["receipt_id"]: r["rules_version"] for _, r in answers}
    assert written and all(answered[rid] == row == posting for rid, row, posting in written)
