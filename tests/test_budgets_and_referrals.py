"""Campaign budgets hold under concurrent receipts; a referral pays the referrer once."""
import asyncio
import shutil

from conftest import MARKET, line, receipt

NOW = "2026-11-24T12:00:05+02:00"
EXTRA = """
rules:
  - id: launch
    reward: {points: 30}
    budget: {points: 50}
events:
  - {id: referral, on: referred_first_purchase, reward: {points: 500}}
"""


async def api_with_extra(make_api, tmp_path):
    program = tmp_path / "program"
    if not program.exists():
        shutil.copytree(MARKET, program)
        (program / "extra.yaml").write_text(EXTRA)
    return await make_api(now=NOW, program_dir=program)


def launch_points(result) -> int:
    return sum(x["points"] for x in result["accrued"]["by_rule"] if x["rule"] == "launch")


async def test_budget_is_never_exceeded_by_concurrent_receipts(make_api, tmp_path):
    api = await api_with_extra(make_api, tmp_path)
    for i in range(6):
        await api.post("/v1/members", {"card": f"c{i}"})
    bodies = [receipt(f"B-{i}", [line(1, "bakery", 1000)], card=f"c{i}") for i in range(6)]
    answers = await asyncio.gather(*(api.post("/v1/receipts", b, as_="register") for b in bodies))
    assert all(s == 201 for s, _ in answers)
    given = sorted(launch_points(r) for _, r in answers)
    assert sum(given) == 50 and given[-2:] == [20, 30]     # the crossing receipt gets the remainder

    # A cancel gives its points back to the budget.
    full = next(r for _, r in answers if launch_points(r) == 30)
    ref = full["receipt"]
    status, _ = await api.post(f"/v1/receipts/{ref['store_id']}/{ref['register_id']}/{ref['receipt_id']}/cancel",
                               as_="register")
    assert status == 200
    _, again = await api.post("/v1/receipts", receipt("B-again", [line(1, "bakery", 1000)], card="c0",
                                                      ts="2026-11-24T12:00:01+02:00"), as_="register")
    assert launch_points(again) == 30


async def test_budget_survives_a_restart(make_api, tmp_path):
    api = await api_with_extra(make_api, tmp_path)
    await api.post("/v1/members", {"card": "c"})
    await api.post("/v1/receipts", receipt("R-1", [line(1, "bakery", 1000)], card="c"), as_="register")
    await api.client.close()
    api2 = await api_with_extra(make_api, tmp_path)      # same database, new process state
    _, r = await api2.post("/v1/receipts", receipt("R-2", [line(1, "bakery", 1000)], card="c",
                                                   ts="2026-11-24T12:00:01+02:00"), as_="register")
    assert launch_points(r) == 20


async def test_referrer_earns_once_on_the_first_purchase(make_api, tmp_path):
    api = await api_with_extra(make_api, tmp_path)
    await api.post("/v1/members", {"card": "referrer"})
    status, _ = await api.post("/v1/members", {"card": "friend", "referred_by": "referrer"})
    assert status == 201
    status, err = await api.post("/v1/members", {"card": "x", "referred_by": "nobody"})
    assert status == 422 and err["error"]["code"] == "unknown_card"
    for n in range(2):
        await api.post("/v1/receipts", receipt(f"F-{n}", [line(1, "bakery", 1000)], card="friend",
                                               ts=f"2026-11-24T12:00:0{n}+02:00"), as_="register")
    _, m = await api.get("/v1/members/referrer")
    assert m["balance"]["available"] == 100 + 500
