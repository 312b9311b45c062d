"""Editing the program folder reloads it; a broken edit is refused and the old program keeps serving."""
import asyncio
import shutil

from conftest import MARKET, line, receipt

NOW = "2026-11-24T12:00:05+02:00"


async def wait_for(predicate, timeout_s: float = 10.0):
    for _ in range(int(timeout_s / 0.05)):
        if await predicate():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_file_change_reloads_and_broken_edit_is_refused(make_api, tmp_path):
    program = tmp_path / "program"
    shutil.copytree(MARKET, program)
    api = await make_api(now=NOW, program_dir=program,
                         rules={"watch": True, "poll_interval_ms": 50, "settle_ms": 100})
    _, info = await api.get("/v1/admin/rules")
    first = info["version"]

    base = next(program.rglob("base.yaml"))
    base.write_text(base.read_text().replace("percent: 2", "percent: 4", 1))

    async def version_changed():
        return (await api.get("/v1/admin/rules"))[1]["version"] != first
    assert await wait_for(version_changed)
    await api.post("/v1/members", {"card": "1"})
    _, res = await api.post("/v1/receipts", receipt("W-1", [line(1, "bakery", 10000)], card="1"), as_="register")
    assert res["accrued"]["by_rule"] == [{"rule": "base", "points": 4}]
    second = (await api.get("/v1/admin/rules"))[1]["version"]
    assert res["rules_version"] == second

    base.write_text("rules: [\n")

    async def refused():
        return (await api.get("/v1/admin/rules"))[1]["last_reload"]["ok"] is False
    assert await wait_for(refused)
    _, info = await api.get("/v1/admin/rules")
    assert info["version"] == second
    _, res = await api.post("/v1/receipts", receipt("W-2", [line(1, "bakery", 10000)], card="1",
                                                    ts="2026-11-24T12:00:01+02:00"), as_="register")
    assert res["rules_version"] == second and res["accrued"]["points"] == 4
