"""A manager edits a rule file by hand while registers confirm receipts: no receipt fails,
and each is evaluated wholly by one program version (never a half-written file)."""
import asyncio
import shutil

from conftest import MARKET, line, receipt

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
