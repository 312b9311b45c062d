"""The campaign effect report: its numbers on a hand-made history, the t quantile it uses,
and a generated history with a known effect found inside its interval."""
from __future__ import annotations

import math
import random
from datetime import date, timezone
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction

import msgspec
import pytest
from conftest import Api, line, receipt, storage_database, test_config

from server import cvm, report_campaign
from server.app import create_app
from server.report_campaign import CampaignRule, Setting, holdout_member, t_quantile
from storage.ledger import member_public_id

NOW = "2026-11-24T12:00:05+02:00"
DAIRY = CampaignRule("dairy-x2", Decimal("0.5"), date(2026, 11, 20), date(2026, 11, 30),
                     in_scope=lambda line: line.get("category") == "dairy")
DEFS = cvm.Definitions(rules={"dairy-x2": DAIRY, "base": CampaignRule("base", None)})


@pytest.fixture
def api(aiohttp_client, tmp_path):
    async def make() -> Api:
        app = create_app(test_config(tmp_path, NOW))
        app[cvm.DEFINITIONS] = lambda program: DEFS
        a = Api(await aiohttp_client(app))
        a.app = app
        return a
    return make


def half_up(x) -> int:
    return int(Decimal(x).quantize(Decimal(1), rounding=ROUND_HALF_UP))


async def test_report_on_a_hand_made_history(api):
    a = await api()
    # The stable assignment puts m_1 and m_4 in the treated group, m_2, m_3, m_5, m_6 in the control.
    assert [holdout_member("market", "dairy-x2", f"m_{i}", "0.5") for i in range(1, 7)] == \
        [False, True, True, False, True, True]
    for i in range(1, 7):
        assert (await a.post("/v1/members", {"card": f"c{i}"}))[0] == 201
    ts = "2026-11-22T12:00:00+02:00"
    sent = [
        receipt("R1", [line(1, "dairy", 6000), line(2, "bakery", 4000)], card="c1", ts=ts),
        receipt("R2", [line(1, "electronics", 20000)], card="c1", ts=ts),
        receipt("R3", [line(1, "dairy", 5000)], card="c4", ts=ts),
        receipt("R4", [line(1, "bakery", 9999)], card="c4", ts=ts),             # cancelled below
        receipt("R5", [{**line(1, "dairy", 8000), "qty": 2, "price": 4000}], card="c2", ts=ts),
        receipt("R6", [line(1, "bakery", 12000)], card="c3", ts=ts),
        receipt("R7", [line(1, "dairy", 7000)], card="c6", ts="2026-11-10T12:00:00+02:00"),  # before from
    ]
    for body in sent:
        assert (await a.post("/v1/receipts", body, as_="register"))[0] == 201
    assert (await a.post("/v1/receipts/S001/K01/R4/cancel", as_="register"))[0] == 200
    ret = {"return_id": "X1", "store_id": "S001", "register_id": "K01",
           "receipt": {"store_id": "S001", "register_id": "K01", "receipt_id": "R5"}, "lines": [{"line_no": 1, "qty": 1}]}
    assert (await a.post("/v1/returns", ret, as_="register"))[0] == 201
    # What the rule would have given m_2 on R5, as the receipt path records it for the control group.
    await a.app[cvm.DATABASE].write(lambda conn: conn.execute(
        "INSERT INTO holdout_points VALUES ('S001', 'K01', 'R5', 'dairy-x2', 2, 2)"))

    status, got = await a.get("/v1/admin/reports/campaigns/dairy-x2?from=2026-11-20&to=2026-11-30")
    assert status == 200, got
    # Treated: m_1 spends 30,000 on two receipts (6,000 dairy), m_4 5,000 of dairy; the rule gave
    # each of their dairy receipts 1 point (2 % of the dairy again, rounded with the base's 2 %).
    assert got["treated"] == {"members": 2, "buyers": 2, "receipts": 3, "spend": 35000, "scope_spend": 11000,
                              "points": 2}
    # Control: m_2 8,000 of dairy less 4,000 returned, m_3 12,000 of bakery, m_5 and m_6 nothing in the period;
    # the 2 points the rule would have given m_2 lose the returned half, as a treated member's would.
    assert got["control"] == {"members": 4, "buyers": 2, "receipts": 2, "spend": 16000, "scope_spend": 4000,
                              "points": 1}
    # Means 17,500 and 4,000; variances 312,500,000 (n=2) and 32,000,000 (n=4).
    se2 = Fraction(312_500_000, 2) + Fraction(32_000_000, 4)
    df = se2 ** 2 / (Fraction(312_500_000, 2) ** 2 / 1 + Fraction(32_000_000, 4) ** 2 / 3)
    half = t_quantile(0.975, float(df)) * math.sqrt(se2)
    assert got["uplift"] == {"spend_per_member": 13500, "low": half_up(13500 - half), "high": half_up(13500 + half)}
    assert got["incremental_spend"] == 27000 and got["points_cost"] == 200
    assert (got["rule"], got["from"], got["to"]) == ("dairy-x2", "2026-11-20", "2026-11-30")
    # Without from and to the rule's own period is the report's.
    assert (await a.get("/v1/admin/reports/campaigns/dairy-x2"))[1] == got


async def test_merged_members_count_for_the_survivor_and_erased_ones_not_at_all(api):
    a = await api()
    # Treated: m_1, m_4, m_8; control: m_2, m_3, m_5, m_6, m_7 (the stable assignment).
    assert [holdout_member("market", "dairy-x2", f"m_{i}", "0.5") for i in range(1, 9)] == \
        [False, True, True, False, True, True, True, False]
    for i in range(1, 9):
        assert (await a.post("/v1/members", {"card": f"c{i}"}))[0] == 201
    ts = "2026-11-22T12:00:00+02:00"
    sent = [
        receipt("R1", [line(1, "dairy", 10000)], card="c1", ts=ts),
        receipt("R2", [line(1, "dairy", 5000)], card="c4", ts=ts),        # m_4, merged into m_1 below
        receipt("R3", [{**line(1, "dairy", 10000), "qty": 2, "price": 5000}], card="c2", ts=ts),   # half returned
        receipt("R4", [line(1, "dairy", 3000)], card="c3", ts=ts),        # cancelled below
        receipt("R5", [line(1, "bakery", 12000)], card="c5", ts=ts),
        receipt("R6", [line(1, "dairy", 4000)], card="c6", ts=ts),        # m_6, merged into m_5 below
        receipt("R7", [line(1, "dairy", 7000)], card="c7", ts=ts),        # m_7, erased below
    ]
    for body in sent:
        assert (await a.post("/v1/receipts", body, as_="register"))[0] == 201
    # What the rule would have given the control members, as the receipt path records it.
    await a.app[cvm.DATABASE].write(lambda conn: conn.executemany(
        "INSERT INTO holdout_points VALUES ('S001', 'K01', ?, 'dairy-x2', ?, ?)",
        [("R3", 2, 4), ("R4", 3, 3), ("R6", 6, 1), ("R7", 7, 9)]))
    assert (await a.post("/v1/receipts/S001/K01/R4/cancel", as_="register"))[0] == 200
    ret = {"return_id": "X1", "store_id": "S001", "register_id": "K01",
           "receipt": {"store_id": "S001", "register_id": "K01", "receipt_id": "R3"}, "lines": [{"line_no": 1, "qty": 1}]}
    assert (await a.post("/v1/returns", ret, as_="register"))[0] == 201
    for merge_id, away, into in (("MG-1", "m_4", "m_1"), ("MG-2", "m_6", "m_5")):
        merge = {"merge_id": merge_id, "from_member_id": away, "into_member_id": into, "reason": "one customer"}
        assert (await a.post("/v1/admin/members/merge", merge))[0] == 201
    assert (await a.post("/v1/admin/members/m_7/erase", {"reason": "customer asked"}))[0] == 200

    status, got = await a.get("/v1/admin/reports/campaigns/dairy-x2?from=2026-11-20&to=2026-11-30")
    assert status == 200, got
    # Treated: m_1 with m_4's receipt (10,000 and 5,000 of dairy; the rule gave 2 and 1 points), m_8 nothing.
    assert got["treated"] == {"members": 2, "buyers": 1, "receipts": 2, "spend": 15000, "scope_spend": 15000,
                              "points": 3}
    # Control: m_2 10,000 less 5,000 returned (4 points would have been 2 after it), m_3 only a cancelled
    # receipt, m_5 12,000 of bakery with m_6's 4,000 of dairy (1 point); m_7 was erased: not counted at all.
    assert got["control"] == {"members": 3, "buyers": 2, "receipts": 3, "spend": 21000, "scope_spend": 9000,
                              "points": 3}
    assert got["uplift"]["spend_per_member"] == 500 and got["incremental_spend"] == 1000     # 7,500 - 7,000
    assert got["points_cost"] == 300


async def test_a_customer_enrolled_by_to_under_a_card_merged_away_since_is_counted(api):
    a = await api()
    # m_1 treated, m_2 and m_3 control (the stable assignment); the clock enrols them on
    # 2026-11-24, after the report's `to`, and m_2 and m_3 are put back to November 1st.
    for i in range(1, 4):
        assert (await a.post("/v1/members", {"card": f"c{i}"}))[0] == 201
    await a.app[cvm.DATABASE].write(lambda conn: conn.execute(
        "UPDATE members SET enrolled_at = '2026-11-01T00:00:00.000000Z' WHERE id IN (2, 3)"))
    body = receipt("R1", [line(1, "dairy", 10000)], card="c2", ts="2026-11-22T12:00:00+02:00")
    assert (await a.post("/v1/receipts", body, as_="register"))[0] == 201
    merge = {"merge_id": "MG-1", "from_member_id": "m_2", "into_member_id": "m_1", "reason": "one customer"}
    assert (await a.post("/v1/admin/members/merge", merge))[0] == 201

    status, got = await a.get("/v1/admin/reports/campaigns/dairy-x2?from=2026-11-20&to=2026-11-23")
    assert status == 200, got
    # m_1 is the customer m_2 was since November 1st: in the audience, with m_2's receipt.
    assert got["treated"] == {"members": 1, "buyers": 1, "receipts": 1, "spend": 10000, "scope_spend": 10000,
                              "points": 2}
    assert got["control"]["members"] == 1


async def test_report_refusals(api):
    a = await api()
    status, body = await a.get("/v1/admin/reports/campaigns/base?from=2026-11-20&to=2026-11-30")
    assert status == 422 and body["error"]["code"] == "rule_without_holdout"
    status, body = await a.get("/v1/admin/reports/campaigns/nope")
    assert status == 404 and body["error"]["code"] == "unknown_rule"
    status, body = await a.get("/v1/admin/reports/campaigns/dairy-x2?from=2026-12-01&to=2026-11-01")
    assert status == 422 and body["error"]["details"] == [{"path": "to", "message": "must not be before from"}]
    status, body = await a.get("/v1/admin/reports/campaigns/dairy-x2?from=yesterday")
    assert status == 422 and body["error"]["details"][0]["path"] == "from"
    assert (await a.get("/v1/admin/reports/campaigns/dairy-x2", as_="register"))[0] == 403
    # the day after `to`, and the days before `from`, must still be dates
    for first, last, path in [("2026-11-20", "9999-12-31", "to"), ("0001-01-01", "2026-11-30", "from")]:
        status, body = await a.get(f"/v1/admin/reports/campaigns/dairy-x2?from={first}&to={last}")
        assert status == 422 and [d["path"] for d in body["error"]["details"]] == [path], body


def _t_cdf_by_integration(t: float, df: float) -> float:
    """Student's t CDF by Simpson's rule over its density: a check independent of the incomplete beta."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    n = 200_000
    h = t / n
    f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
    return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))


def test_t_quantile_matches_tables_and_integration():
    for df, table in ((1, 12.706204736), (2, 4.302652730), (10, 2.228138852), (30, 2.042272456),
                      (10**7, 1.959964274)):
        assert abs(t_quantile(0.975, df) - table) < 1e-6, df
    for df in (1.104, 2.5, 7.3, 123.4):
        assert abs(_t_cdf_by_integration(t_quantile(0.975, df), df) - 0.975) < 1e-7, df


def test_a_known_effect_of_eight_percent_is_found(tmp_path):
    """50,000 members, 20 % held out; the treated spend 8 % more (fixed seed)."""
    rng = random.Random(15)
    rule = CampaignRule("promo", Decimal("0.2"), date(2026, 11, 1), date(2026, 11, 30))
    setting = Setting("market", timezone.utc, 100)
    body = msgspec.json.encode({"lines": []})
    members, receipts = [], []
    for mid in range(1, 50_001):
        members.append((mid,))
        treated = not holdout_member("market", "promo", member_public_id(mid), rule.holdout)
        for n in range(rng.choice((0, 1, 1, 2, 3))):
            spend = rng.randrange(1_000, 40_000)
            spend = spend * 108 // 100 if treated else spend
            receipts.append((f"r{mid}-{n}", mid, f"2026-11-{1 + rng.randrange(30):02d}", spend, body))
    db = storage_database(tmp_path / "effect.db")
    db.open()
    try:
        def write(conn):
            conn.executemany("INSERT INTO members (id, tags, enrolled_at, updated_at) VALUES "
                             "(?, '[]', '2026-01-01T00:00:00.000000Z', '2026-01-01')", members)
            conn.executemany("INSERT INTO receipts (store_id, register_id, receipt_id, body_sha256, member_id, ts, "
                             "local_date, total, rules_version, status, body, result, created_at) VALUES "
                             "('S001', 'K01', ?, ?, ?, ?, ?, ?, 'v', 'confirmed', ?, ?, ?)",
                             [(key, b"\0", mid, f"{day}T10:00:00Z", day, total, body, b"{}", day)
                              for key, mid, day, total, body in receipts])
        db.write_sync(write)
        got = db.read_sync(lambda conn: report_campaign.report(conn, setting, rule, rule.period_from, rule.period_to))
    finally:
        db.close()
    control_mean = got["control"]["spend"] / got["control"]["members"]
    point = got["uplift"]["spend_per_member"] / control_mean
    low, high = got["uplift"]["low"] / control_mean, got["uplift"]["high"] / control_mean
    assert got["control"]["members"] + got["treated"]["members"] == 50_000
    assert abs(got["control"]["members"] / 50_000 - 0.2) < 0.01
    assert low < 0.08 < high
    assert abs(point - 0.08) < 0.02


def test_the_report_takes_a_rules_period_and_scope_from_the_program():
    from conftest import MARKET
    from rules import load_program
    program = load_program(MARKET)
    dairy = cvm.definitions_of(program).rules["dairy-x2"]
    assert (dairy.period_from, dairy.period_to) == (date(2026, 11, 20), date(2026, 11, 30))
    assert dairy.in_scope({"category": "dairy", "sku": "4820000000011"})
    assert not dairy.in_scope({"category": "bakery", "sku": "4820000000028"})
    base = cvm.definitions_of(program).rules["base"]
    assert not base.in_scope({"category": "tobacco", "sku": "4820000000099"})   # the program's exclusion


def test_the_reports_control_group_is_the_receipt_paths():
    from rules import holdout_member as receipt_path_holdout
    for h in ("0.1", "0.25", "0.5"):
        assert [holdout_member("market", "promo", f"m_{i}", h) for i in range(2_000)] == \
               [receipt_path_holdout("market", "promo", f"m_{i}", Decimal(h)) for i in range(2_000)]


# ------------------------------------------------------------------ a rule no longer live, or defined anew

def _welch(treated: list[int], control: list[int]) -> tuple[int, int]:
    """(low, high) of the uplift's 95 % interval, from the members' spends (rules.md)."""
    def mean_var(xs):
        mean = Fraction(sum(xs), len(xs))
        return mean, sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    (mt, vt), (mc, vc) = mean_var(treated), mean_var(control)
    se2 = vt / len(treated) + vc / len(control)
    df = se2 ** 2 / ((vt / len(treated)) ** 2 / (len(treated) - 1) + (vc / len(control)) ** 2 / (len(control) - 1))
    half = t_quantile(0.975, float(df)) * math.sqrt(se2)
    return half_up(float(mt - mc) - half), half_up(float(mt - mc) + half)


@pytest.fixture
async def history(aiohttp_client, tmp_path):
    """A program whose dairy-x2 holds out half its audience (dairy, 2026-11-20 to 30), loaded on
    2026-11-01; six members and four receipts under it on 2026-11-22; on 2026-12-05 a version
    without dairy-x2. Returns (api, app, the program's files, the first version)."""
    import shutil
    from conftest import MARKET
    folder = tmp_path / "program"
    shutil.copytree(MARKET, folder)
    promos = folder / "campaigns" / "promos.yaml"
    promos.write_text(promos.read_text().replace(
        "    scope: {categories: [dairy]}\n", "    scope: {categories: [dairy]}\n    holdout: 0.5\n", 1))
    app = create_app(test_config(tmp_path, "2026-11-01T09:00:00+02:00", program_dir=folder))
    a = Api(await aiohttp_client(app))
    files = {str(p.relative_to(folder)): p.read_text() for p in folder.rglob("*.yaml")}
    first_version = (await a.get("/v1/admin/rules"))[1]["version"]
    # dairy-x2 at 0.5: m_1 and m_4 treated; m_2, m_3, m_5, m_6 control.
    for i in range(1, 7):
        assert (await a.post("/v1/members", {"card": f"c{i}"}))[0] == 201
    at(app, "2026-11-22T12:01:00+02:00")
    ts = "2026-11-22T12:00:00+02:00"
    for body in (receipt("R1", [line(1, "dairy", 10000)], card="c1", ts=ts),
                 receipt("R2", [line(1, "dairy", 5000), line(2, "bakery", 3000)], card="c2", ts=ts),
                 receipt("R3", [line(1, "bakery", 8000)], card="c4", ts=ts),
                 receipt("R4", [line(1, "dairy", 20000)], card="c3", ts=ts)):
        assert (await a.post("/v1/receipts", body, as_="register"))[0] == 201
    at(app, "2026-12-05T10:00:00+02:00")
    without = {**files, "campaigns/promos.yaml": _without_dairy(files["campaigns/promos.yaml"])}
    assert (await a.post("/v1/admin/rules/deploy", {"files": without, "reason": "campaign over"}))[0] == 200
    return a, app, files, first_version


def at(app, moment: str) -> None:
    from datetime import datetime
    from server.keys import CLOCK
    app[CLOCK].set(datetime.fromisoformat(moment))


def _without_dairy(promos: str) -> str:
    start = promos.index("  - id: dairy-x2")
    return promos[:start] + promos[promos.index("  - id: big-basket"):]


# Treated m_1 (10,000 of dairy: the rule gave 2 points) and m_4 (8,000 of bakery); control m_2
# (5,000 of dairy, 3,000 of bakery: 1 point it would have given), m_3 (20,000 of dairy: 4), m_5, m_6.
NOVEMBER = {"treated": {"members": 2, "buyers": 2, "receipts": 2, "spend": 18000, "scope_spend": 10000, "points": 2},
            "control": {"members": 4, "buyers": 2, "receipts": 2, "spend": 28000, "scope_spend": 25000, "points": 5}}


async def test_a_rule_taken_out_of_the_program_is_reported_by_the_version_that_had_it(history):
    a, app, _, first_version = history
    live_version = (await a.get("/v1/admin/rules"))[1]["version"]
    status, got = await a.get("/v1/admin/reports/campaigns/dairy-x2")
    assert status == 200, got
    # Its own period (2026-11-20 to 30) from the stored definition, its holdout, scope and program id.
    assert (got["rule"], got["from"], got["to"]) == ("dairy-x2", "2026-11-20", "2026-11-30")
    assert {g: got[g] for g in NOVEMBER} == NOVEMBER
    low, high = _welch([10000, 8000], [8000, 20000, 0, 0])
    assert got["uplift"] == {"spend_per_member": 2000, "low": low, "high": high}      # 9,000 - 7,000
    assert got["incremental_spend"] == 4000 and got["points_cost"] == 200
    assert got["rules_version"] == first_version and got["live"] is False
    assert got["warnings"] == [
        f"rule dairy-x2 is no longer in the live program ({live_version}): the report uses its definition in "
        f"program version {first_version}, which had it in force from 2026-11-01 to 2026-12-05"]
    # A name no version had is refused with the nearest one a stored version had.
    status, body = await a.get("/v1/admin/reports/campaigns/dairy-x")
    assert status == 404 and body["error"] == {
        "code": "unknown_rule", "details": [],
        "message": "the program has no rule dairy-x, and no stored version of it had one, did you mean 'dairy-x2'?"}
    status, body = await a.get("/v1/admin/reports/campaigns/nope")
    assert status == 404 and body["error"]["code"] == "unknown_rule"
    status, body = await a.get("/v1/admin/reports/campaigns/base?from=2026-11-20&to=2026-11-30")
    assert status == 422 and body["error"]["code"] == "rule_without_holdout"


async def test_a_rule_id_used_again_is_reported_by_the_definition_in_force_during_the_period(history):
    a, app, files, first_version = history
    # 2026-12-10: dairy-x2 again, another campaign: bakery, a quarter held out, 30 points a receipt.
    at(app, "2026-12-10T10:00:00+02:00")
    promos = _without_dairy(files["campaigns/promos.yaml"]).replace("  - id: big-basket", (
        "  - id: dairy-x2\n    period: {from: \"2026-12-10\", to: \"2026-12-31\"}\n"
        "    scope: {categories: [bakery]}\n    reward: {points: 30}\n    holdout: 0.25\n\n  - id: big-basket"), 1)
    status, deployed = await a.post("/v1/admin/rules/deploy", {"files": {**files, "campaigns/promos.yaml": promos},
                                                                "reason": "bakery month"})
    assert status == 200, deployed
    new_version = deployed["version"]
    assert [holdout_member("market", "dairy-x2", f"m_{i}", "0.25") for i in range(1, 7)] == \
        [False, True, False, False, True, True]
    at(app, "2026-12-12T12:01:00+02:00")
    ts = "2026-12-12T12:00:00+02:00"
    for body in (receipt("R5", [line(1, "bakery", 10000)], card="c1", ts=ts),
                 receipt("R6", [line(1, "bakery", 4000), line(2, "dairy", 6000)], card="c3", ts=ts),
                 receipt("R7", [line(1, "bakery", 5000)], card="c2", ts=ts),
                 receipt("R8", [line(1, "bakery", 7000)], card="c5", ts=ts)):
        assert (await a.post("/v1/receipts", body, as_="register"))[0] == 201

    # Its own period now is the new campaign's, measured by the new definition: treated m_1, m_3,
    # m_4 (30 points on each of two receipts), control m_2, m_5, m_6 (30 each it would have given).
    status, got = await a.get("/v1/admin/reports/campaigns/dairy-x2")
    assert status == 200, got
    assert (got["from"], got["to"], got["rules_version"], got["live"], got["warnings"]) == \
        ("2026-12-10", "2026-12-31", new_version, True, [])
    assert got["treated"] == {"members": 3, "buyers": 2, "receipts": 2, "spend": 20000, "scope_spend": 14000,
                              "points": 60}
    assert got["control"] == {"members": 3, "buyers": 2, "receipts": 2, "spend": 12000, "scope_spend": 12000,
                              "points": 60}
    low, high = _welch([10000, 10000, 0], [5000, 7000, 0])
    assert got["uplift"] == {"spend_per_member": 2667, "low": low, "high": high}    # 8,000 / 3
    assert got["incremental_spend"] == 8000 and got["points_cost"] == 6000

    # November is still the first campaign's, with the numbers it had before the id came back.
    status, got = await a.get("/v1/admin/reports/campaigns/dairy-x2?from=2026-11-20&to=2026-11-30")
    assert status == 200, got
    assert {g: got[g] for g in NOVEMBER} == NOVEMBER and got["uplift"]["spend_per_member"] == 2000
    assert (got["rules_version"], got["live"]) == (first_version, False)
    assert got["warnings"] == [
        f"the live program ({new_version}) defines rule dairy-x2 differently: the report uses its definition in "
        f"force during the period, in program version {first_version}, which had it in force from 2026-11-01 "
        "to 2026-12-05"]
    # Days between the two, when no version had it: the definition in force last before them.
    status, got = await a.get("/v1/admin/reports/campaigns/dairy-x2?from=2026-12-06&to=2026-12-08")
    assert status == 200 and got["rules_version"] == first_version and got["live"] is False
    assert got["treated"]["members"] == 2 and got["control"]["members"] == 4 and got["treated"]["spend"] == 0
    assert got["warnings"][0].endswith("; no version had it in force during the period")

    # A period over both campaigns has no one control group: refused, saying where they part.
    status, body = await a.get("/v1/admin/reports/campaigns/dairy-x2?from=2026-11-20&to=2026-12-15")
    assert status == 422, body
    assert body["error"] == {
        "code": "rule_redefined",
        "message": f"rule dairy-x2 was defined differently during the period (as program version {first_version} "
                   f"defines it from 2026-11-01 to 2026-12-05; as program version {new_version} defines it since "
                   "2026-12-10): the control group of one period must be drawn by one definition, so ask for a "
                   "period that ends before 2026-12-10 or starts after it",
        "details": [{"path": "to", "message": "must be before 2026-12-10, the day rule dairy-x2 was defined anew, "
                                              "unless from is after it"}]}
    # The day each version went live had the one before in force too (until 10:00); days without the rule
    # count for neither.
    assert (await a.get("/v1/admin/reports/campaigns/dairy-x2?from=2026-12-05&to=2026-12-10"))[0] == 422
    status, got = await a.get("/v1/admin/reports/campaigns/dairy-x2?from=2026-12-06&to=2026-12-10")
    assert status == 200 and got["rules_version"] == new_version and got["live"] is True
