"""The console's campaign effect page: a hand-made history confirmed through the API with a
holdout rule, the page's numbers against the API's report, the refusals the API gives (a rule
without holdout, an unknown rule, a bad period) shown on the page, who may see it, and the
weekly chart as SVG."""
from __future__ import annotations

import re
import shutil
import xml.etree.ElementTree as ET
from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction

import pytest
from conftest import KEYS, MARKET, line, receipt
from test_console import Console

from server.console.chart import weekly_svg
from server.console.views import effect_words
from server.keys import PROGRAMS
from server.reports import money_text
from server.report_campaign import holdout_member

NOW = "2026-11-24T12:00:05+02:00"
SVG = "{http://www.w3.org/2000/svg}"
REPORT = "/console/campaigns?rule=dairy-x2&from=2026-11-17&to=2026-11-30"


@pytest.fixture
async def history(make_api, tmp_path):
    """(api, console): the market program with half of dairy-x2's audience held out (and an eighth
    of big-basket's, a rule without a period), six members, receipts of both groups over two
    weeks (one partly returned), a manager signed in."""
    program = tmp_path / "program"
    shutil.copytree(MARKET, program)
    promos = program / "campaigns" / "promos.yaml"
    text = promos.read_text()
    text = text.replace("    scope: {categories: [dairy]}\n", "    scope: {categories: [dairy]}\n    holdout: 0.5\n", 1)
    # big-basket has no period: its report needs one given.
    promos.write_text(text.replace("    reward: {points: 50}\n", "    reward: {points: 50}\n    holdout: 0.125\n", 1))
    api = await make_api(now=NOW, program_dir=program)
    # The stable assignment: m_1 and m_4 treated; m_2, m_3, m_5 and m_6 held out.
    assert [holdout_member("market", "dairy-x2", f"m_{i}", "0.5") for i in range(1, 7)] == \
        [False, True, True, False, True, True]
    for i in range(1, 7):
        assert (await api.post("/v1/members", {"card": f"700000000000{i}"}))[0] == 201
    first, second = "2026-11-18T12:00:00+02:00", "2026-11-24T10:00:00+02:00"
    sent = [
        receipt("R1", [line(1, "dairy", 6055), line(2, "bakery", 4000)], card="7000000000001", ts=first),
        receipt("R2", [line(1, "dairy", 20001)], card="7000000000001", ts=second),
        receipt("R3", [line(1, "dairy", 5000)], card="7000000000004", ts=second),
        receipt("R4", [{**line(1, "dairy", 8000), "qty": 2, "price": 4000}], card="7000000000002", ts=second),
        receipt("R5", [line(1, "bakery", 12000)], card="7000000000003", ts=first),
        receipt("R6", [line(1, "dairy", 3333)], card="7000000000005", ts=second),
    ]
    for body in sent:
        assert (await api.post("/v1/receipts", body, as_="register"))[0] == 201
    back = {"return_id": "X1", "store_id": "S001", "register_id": "K01",
            "receipt": {"store_id": "S001", "register_id": "K01", "receipt_id": "R4"},
            "lines": [{"line_no": 1, "qty": 1}]}
    assert (await api.post("/v1/returns", back, as_="register"))[0] == 201
    console = Console(api.client)
    await console.sign_in()
    return api, console


def cells(html: str, group: str) -> dict[str, str]:
    row = re.search(rf'<tr id="group-{group}">(.*?)</tr>', html, re.S).group(1)
    return dict(re.findall(r'<td class="(\w+)">([^<]*)</td>', row))


def by_id(html: str, element_id: str) -> str:
    return re.search(rf'id="{element_id}"[^>]*>([^<]*)<', html).group(1).strip()


def svg_of(html: str) -> ET.Element:
    return ET.fromstring(re.search(r"<svg.*?</svg>", html, re.S).group(0))


def half_up(value: Fraction) -> int:
    return int((Decimal(value.numerator) / Decimal(value.denominator)).quantize(Decimal(1), rounding=ROUND_HALF_UP))


async def test_the_page_shows_the_apis_report(history):
    api, console = history
    status, expected = await api.get("/v1/admin/reports/campaigns/dairy-x2?from=2026-11-17&to=2026-11-30")
    assert status == 200, expected
    # Both groups bought, and the control group's dairy would have earned points too.
    assert expected["treated"]["buyers"] == 2 and expected["control"]["buyers"] == 3
    assert expected["control"]["points"] > 0 and expected["uplift"]["low"] is not None
    status, html = await console.get(REPORT)
    assert status == 200, html
    for group in ("treated", "control"):
        g = expected[group]
        assert cells(html, group) == {
            "members": str(g["members"]), "buyers": str(g["buyers"]), "receipts": str(g["receipts"]),
            "spend": money_text(g["spend"], "UAH"), "scope_spend": money_text(g["scope_spend"], "UAH"),
            "points": str(g["points"])}
    u = expected["uplift"]
    assert by_id(html, "uplift") == money_text(u["spend_per_member"], "UAH")
    assert by_id(html, "interval") == f"95 % interval {money_text(u['low'], 'UAH')} to {money_text(u['high'], 'UAH')}"
    assert by_id(html, "incremental-spend") == money_text(expected["incremental_spend"], "UAH")
    assert by_id(html, "points-cost") == money_text(expected["points_cost"], "UAH")
    # Six members are too few to tell: the interval holds zero, and the page says so.
    assert u["low"] < 0 < u["high"]
    assert "includes zero" in by_id(html, "verdict")


async def test_the_rules_own_period_is_the_default(history):
    api, console = history
    _, expected = await api.get("/v1/admin/reports/campaigns/dairy-x2")
    status, html = await console.get("/console/campaigns?rule=dairy-x2&from=&to=")
    assert status == 200
    assert "dairy-x2, 2026-11-20 to 2026-11-30" in html
    assert cells(html, "treated")["spend"] == money_text(expected["treated"]["spend"], "UAH")


async def test_the_chart_has_one_path_per_group_and_exact_money_labels(history):
    api, console = history
    _, expected = await api.get("/v1/admin/reports/campaigns/dairy-x2?from=2026-11-17&to=2026-11-30")
    svg = svg_of((await console.get(REPORT))[1])
    paths = svg.findall(f".//{SVG}path")
    assert sorted(p.get("data-group") for p in paths) == ["control", "treated"]
    assert [p.get("stroke-dasharray") is None for p in paths] == [True, False]   # solid and dashed
    assert len(svg.findall(f".//{SVG}g[@class='series treated']/{SVG}circle")) == 2     # two weeks
    assert len(svg.findall(f".//{SVG}g[@class='series control']/{SVG}rect")) == 2
    # Treated: 50.28 UAH a member in the first week, 125.01 in the second; control: 30.00, then 18.33.
    treated = [float(c.get("cy")) for c in svg.findall(f".//{SVG}g[@class='series treated']/{SVG}circle")]
    control = [float(r.get("y")) for r in svg.findall(f".//{SVG}g[@class='series control']/{SVG}rect")]
    assert treated[1] < treated[0] and control[0] < control[1]       # higher spend is drawn higher
    assert "dairy-x2" in svg.find(f"{SVG}title").text
    desc = svg.find(f"{SVG}desc").text
    texts = [t.text for t in svg.iter(f"{SVG}text")]
    for group in ("treated", "control"):
        g = expected[group]
        mean = money_text(half_up(Fraction(g["spend"], g["members"])), "UAH")
        assert f"{group}: {mean} per member over the period" in texts
        assert mean in desc
    money = [t for t in texts if t.endswith(" UAH")]
    assert money and all(re.fullmatch(r"-?\d+\.\d\d UAH", t) for t in money)
    assert "spend per member (UAH)" in texts


def test_labels_stay_exact_whatever_floats_the_series_hold():
    weeks = [(date(2026, 11, 1), 0.1 + 0.2, 1 / 3), (date(2026, 11, 8), 12345.678901, 9876.54321)]
    report = {"treated": {"members": 3, "spend": 100}, "control": {"members": 0, "spend": 0}}
    svg = ET.fromstring(weekly_svg(weeks, report, "UAH", "t"))
    texts = [t.text for t in svg.iter(f"{SVG}text")]
    ticks = [t for t in texts if re.fullmatch(r"-?\d+\.\d\d UAH", t)]
    assert ticks[0] == "0.00 UAH" and len(ticks) >= 2
    assert "treated: 0.33 UAH per member over the period" in texts       # 100 / 3 minor units, half up
    assert "control: no members" in texts
    single = ET.fromstring(weekly_svg([(date(2026, 11, 1), -5.0, 0.0)], report, "JPY", "t"))
    assert len(single.findall(f".//{SVG}path")) == 2
    ticks = [t.text for t in single.iter(f"{SVG}text") if t.text.endswith(" JPY")]
    assert ticks == ["-5 JPY", "-4 JPY", "-3 JPY", "-2 JPY", "-1 JPY", "0 JPY"]     # a currency without decimals


def test_the_sentence_says_where_the_interval_lies():
    assert effect_words({"spend_per_member": 500, "low": 1, "high": 999}, "UAH").startswith(
        "The campaign raised spend per member: the 95 % interval, 0.01 UAH to 9.99 UAH, lies above zero")
    assert "lies below zero" in effect_words({"spend_per_member": -500, "low": -999, "high": -1}, "UAH")
    assert effect_words({"spend_per_member": 5, "low": 0, "high": 10}, "JPY").startswith(
        "No effect shown yet: the 95 % interval, 0 JPY to 10 JPY, includes zero")
    assert effect_words({"spend_per_member": 5, "low": None, "high": None}, "UAH").startswith("No interval")
    assert effect_words(None, "UAH").startswith("No uplift")


async def test_a_rule_without_holdout_is_said_so(history):
    _api, console = history
    status, html = await console.get("/console/campaigns?rule=base")
    assert status == 422
    assert "rule_without_holdout" in html and "rule base has no holdout" in html
    assert "<svg" not in html
    status, html = await console.get("/console/campaigns?rule=no-such-rule")
    assert status == 404 and "unknown_rule" in html
    status, html = await console.get("/console/campaigns?rule=dairy-x2&from=2026-12-01&to=2026-11-01")
    assert status == 422 and "<code>to</code>: must not be before from" in html
    status, html = await console.get("/console/campaigns?rule=big-basket")
    assert status == 422 and "<code>from</code>: is required: the rule has no period" in html


async def test_a_program_without_holdout_rules_says_so(make_api):
    api = await make_api(now=NOW)
    console = Console(api.client)
    await console.sign_in()
    status, html = await console.get("/console/campaigns")
    assert status == 200 and 'id="no-holdout-rules"' in html
    assert 'id="campaign-links"' not in (await console.get("/console"))[1]


async def test_the_page_is_in_the_navigation_and_the_dashboard_links_each_holdout_rule(history):
    _api, console = history
    status, html = await console.get("/console")
    assert status == 200
    assert '<a href="/console/campaigns"' in html
    link = r'<a href="/console/campaigns\?rule=dairy-x2">dairy-x2</a>: 50 % held out'
    assert re.search(r'id="campaign-links">\s*<li>' + link, html)
    # A rule without a period of its own: the last 28 days up to today.
    link = '<a href="/console/campaigns?rule=big-basket&amp;from=2026-10-28&amp;to=2026-11-24">big-basket</a>'
    assert link + ": 12.5 % held out" in html
    status, html = await console.get("/console/campaigns")
    assert status == 200 and 'aria-current="page">Campaign effect' in html
    assert "big-basket: 12.5 % held out,\nno period (give one)" in html
    assert '<option value="dairy-x2" >dairy-x2: 50 % held out' in html and "period 2026-11-20 to 2026-11-30" in html
    assert "campaign-report" not in html


@pytest.mark.parametrize("role", ["register", "monitor"])
async def test_register_and_monitor_keys_do_not_see_it(history, role):
    api, _console = history
    api.client.session.cookie_jar.clear()        # the manager's session is gone from this browser
    stranger = Console(api.client)
    assert (await stranger.login(KEYS[role])).status == 403
    # Nor does the key as a bearer token open the page: the console knows only its sessions.
    response = await api.client.get(REPORT, allow_redirects=False, headers={"Authorization": f"Bearer {KEYS[role]}"})
    assert (response.status, response.headers["Location"]) == (303, "/console/login")


async def test_the_page_changes_nothing_and_takes_no_post(history):
    _api, console = history
    # Reading a report is a GET; a POST (with or without the session's token) is not served.
    assert (await console.post(REPORT, {}))[0] == 405
    assert (await console.post(REPORT, {}, csrf=False))[0] == 405
    # Its one form that does change something, signing out, carries the session's token.
    html = (await console.get(REPORT))[1]
    assert re.search(rf'action="/console/logout".*?name="csrf" value="{console.csrf}"', html, re.S)


async def test_a_rule_taken_out_of_the_program_is_still_shown_saying_whose_definition_it_is(history):
    api, console = history
    _, before = await api.get("/v1/admin/reports/campaigns/dairy-x2?from=2026-11-17&to=2026-11-30")
    folder = api.client.server.app[PROGRAMS].directory
    files = {str(p.relative_to(folder)): p.read_text() for p in folder.rglob("*.yaml")}
    promos = files["campaigns/promos.yaml"]
    files["campaigns/promos.yaml"] = promos[:promos.index("  - id: dairy-x2")] + promos[promos.index("  - id: big-basket"):]
    status, deployed = await api.post("/v1/admin/rules/deploy", {"files": files, "reason": "campaign over"})
    assert status == 200, deployed
    status, html = await console.get(REPORT)
    assert status == 200, html
    assert cells(html, "treated")["spend"] == money_text(before["treated"]["spend"], "UAH")
    assert cells(html, "control")["points"] == str(before["control"]["points"])
    warning = re.search(r'id="definition-warnings"><li class="warning">([^<]*)</li>', html).group(1)
    assert warning.startswith(f"rule dairy-x2 is no longer in the live program ({deployed['version']}): the report "
                              f"uses its definition in program version {before['rules_version']}")
    # The choice lists the live program's rules only.
    assert '<option value="dairy-x2"' not in html
