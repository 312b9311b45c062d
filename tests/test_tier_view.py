"""The tier a member is shown and gets: what comes next follows the tier they actually hold;
a manual tier the program no longer defines falls back to the computed one, and the reload
that dropped it says how many members hold it."""
from conftest import line, receipt
from decision_program import NOW, PROGRAM, points_of, write_program

CARD = "7000000000001"


async def setup(make_api, tmp_path):
    api = await make_api(now=NOW, program_dir=write_program(tmp_path / "program"))
    assert (await api.post("/v1/members", {"card": CARD}))[0] == 201
    return api


async def test_next_follows_the_manual_tier(make_api, tmp_path):
    api = await setup(make_api, tmp_path)
    status, member = await api.put(f"/v1/admin/members/{CARD}/tier", {"tier": "gold", "until": "2027-01-31"})
    assert status == 200
    assert member["tier"]["id"] == "gold" and member["tier"]["manual"] is True
    assert member["tier"]["next"] is None and member["tier"]["to_next"] is None
    await api.put(f"/v1/admin/members/{CARD}/tier", {"tier": "silver", "until": "2027-01-31"})
    await api.post("/v1/receipts", receipt("R-1", [line(1, "grocery", 20000)], card=CARD), as_="register")
    _, member = await api.get(f"/v1/members/{CARD}")
    assert member["tier"] | {"until": None} == {"id": "silver", "next": "gold", "to_next": 500000 - 20000,
                                                "metric": "spend", "value": 20000, "manual": True, "until": None}


async def test_a_manual_tier_the_program_dropped_falls_back_and_the_reload_warns(make_api, tmp_path):
    api = await setup(make_api, tmp_path)
    await api.post("/v1/members", {"card": "7000000000002"})
    for card in (CARD, "7000000000002"):
        await api.put(f"/v1/admin/members/{card}/tier", {"tier": "gold", "until": "2027-01-31"})
    status, rules = await api.get("/v1/admin/rules")
    assert rules["last_reload"].get("warnings", []) == []

    without_gold = PROGRAM.replace("    - {id: gold, from: 500000}\n", "").replace(
        "  - {id: gold, group: earn, priority: 2, when: {tier: gold}, reward: {percent: 10}}\n", "")
    (tmp_path / "program" / "program.yaml").write_text(without_gold)
    status, reloaded = await api.post("/v1/admin/rules/reload")
    assert status == 200, reloaded
    assert reloaded["last_reload"]["lost_tiers"] == {"gold": 2}
    status, rules = await api.get("/v1/admin/rules")
    assert rules["last_reload"]["lost_tiers"] == {"gold": 2}
    assert "2 member(s) hold manual tier 'gold'" in rules["last_reload"]["warnings"][0]

    _, member = await api.get(f"/v1/members/{CARD}")
    tier = member["tier"]
    assert tier["id"] == "base" and tier["manual"] is False and tier["next"] == "silver"
    assert tier["manual_ignored"]["tier"] == "gold"
    status, res = await api.post("/v1/receipts", receipt("R-1", [line(1, "grocery", 20000)], card=CARD),
                                 as_="register")
    assert status == 201 and points_of(res, "base") == 2 and points_of(res, "silver") == 0
