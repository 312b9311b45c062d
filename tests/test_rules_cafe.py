"""The cafe program (the tests' copy of the shipped one, tests/programs/cafe), worked by hand.

Settings that matter below: one point pays 10 grosze (value 10), the receipt's exact
total is rounded half up, points are available the same day (activation 0) and
expire 180 days later. Rules in definition order (files in path order):
everyday, friend, coffee-stamp, students (everyday.yaml), quiet-hours, pastry-double,
catering, matcha-launch (promos.yaml), first-visit, newcomer, birthday-week
(welcome.yaml). Attribution ties go to the earlier rule, then the lower line.
"""
from __future__ import annotations

import pathlib
from datetime import date, datetime
from decimal import Decimal
from types import SimpleNamespace

import pytest

from rules import MemberFacts, check_dir, load_program
from server.cli import main

CAFE = pathlib.Path(__file__).parent / "programs" / "cafe"


def line(no, category, amount, qty="1", sku=None):
    return SimpleNamespace(line_no=no, sku=sku or f"sku-{no}", category=category, brand=None, qty=Decimal(qty),
                           price=amount, amount=amount, flags=[])


def receipt(ts, *lines, store="C01", channel="pos"):
    return SimpleNamespace(store_id=store, register_id="T1", channel=channel, ts=datetime.fromisoformat(ts),
                           total=sum(item.amount for item in lines), lines=list(lines))


def guest(tier="regular", receipt_number=2, enrolled_on=date(2025, 1, 1), **facts):
    return MemberFacts(member_id="m_1", tier=tier, receipt_number=receipt_number, enrolled_on=enrolled_on, **facts)


@pytest.fixture(scope="module")
def cafe():
    program = load_program(CAFE)
    yield program
    program.close()


def test_the_cafe_program_passes_rules_check(capsys):
    # As of a day before its campaigns end (one that is over is warned about).
    assert check_dir(CAFE, date(2026, 11, 24)) == []
    assert main(["rules", "check", str(CAFE), "--today", "2026-11-24"]) == 0
    assert capsys.readouterr().out.strip().endswith(": ok")


def test_settings_unlike_the_market(cafe):
    assert (cafe.currency, cafe.timezone_name, cafe.point_value, cafe.rounding) == ("PLN", "Europe/Warsaw", 10, "half_up")
    assert (cafe.activation_delay_days, cafe.expiry_days, cafe.hold_ttl_minutes) == (0, 180, 5)
    assert (cafe.redemption_min_points, cafe.redemption_max_share) == (50, Decimal("1.0"))
    assert (cafe.tier_metric, cafe.tier_window_days) == ("receipts", 90)
    assert cafe.tier_for(9) == ("regular", "friend", 1) and cafe.tier_for(10) == ("friend", None, None)
    assert cafe.budgets == {"matcha-launch": 10000}
    assert cafe.limit_windows(date(2026, 12, 2)) == {
        "coffee-stamp": (date(2026, 11, 30), date(2026, 12, 6)),   # ISO week, Monday to Sunday
        "quiet-hours": (date(2026, 12, 2), date(2026, 12, 2)),
        "pastry-double": (date(2026, 12, 1), date(2026, 12, 31)),
        "matcha-launch": (date(2027, 3, 1), date(2027, 3, 31)),    # its period
    }


def test_events_birthday_and_referral(cafe):
    assert [(e.id, e.points, e.expires_in_days) for e in cafe.events_on("birthday")] == [("birthday-gift", 150, 14)]
    assert [(e.id, e.points) for e in cafe.events_on("referred_first_purchase")] == [("bring-a-friend", 100)]
    assert [(e.id, e.points) for e in cafe.events_on("enrolled")] == [("welcome", 50)]
    assert [(e.id, e.points) for e in cafe.events_on("profile_completed")] == [("profile", 20)]


def test_case_1_first_visit_of_a_newcomer_with_a_pastry(cafe):
    # Tuesday 1 Dec 2026, 9:00 at C01; joined that day; the first receipt.
    sale = receipt("2026-12-01T09:00:00+01:00",
                   line(1, "coffee", 1400),      # flat white
                   line(2, "pastry", 900),       # croissant
                   line(3, "gift_card", 5000))   # excluded: earns nothing
    result = cafe.evaluate(sale, guest(receipt_number=1, enrolled_on=date(2026, 12, 1)), 0, 0, {})
    # paid on earning lines: 1400 + 900 = 2300
    # everyday       2300 // 500 = 4 points, spread 1400:900  -> 2.4348, 1.5652
    # coffee-stamp   1 cup                                     -> 1 (line 1)
    # pastry-double  (2-1) x everyday's line 2                 -> 1.5652 (line 2)
    # first-visit    30 spread 1400:900                        -> 18.2609, 11.7391
    # newcomer       (1.5-1) x everyday's lines                -> 1.2174, 0.7826
    # exact total 4 + 1 + 1.5652 + 30 + 2 = 38.5652 -> half up 39
    # floors 2+1, 1, 1, 18+11, 1+0 = 35; the 4 left go to the largest remainders:
    # newcomer l2 .7826, first-visit l2 .7391, everyday l2 .5652, pastry-double l2 .5652
    assert result.accrued_points == 39
    assert result.by_rule == [("everyday", 4), ("coffee-stamp", 1), ("pastry-double", 2), ("first-visit", 30),
                              ("newcomer", 2)]
    assert result.pairs == [("everyday", 1, 2), ("everyday", 2, 2), ("coffee-stamp", 1, 1), ("pastry-double", 2, 2),
                            ("first-visit", 1, 18), ("first-visit", 2, 12), ("newcomer", 1, 1), ("newcomer", 2, 1)]
    assert result.by_line == [(1, 22), (2, 17)]
    # available the same day; first-visit points burn after 60 days, the rest after 180
    assert result.available_from == date(2026, 12, 1)
    assert result.lots == [(date(2026, 12, 1), date(2027, 1, 30), 30), (date(2026, 12, 1), date(2027, 5, 30), 9)]


def test_case_2_a_student_friend_pays_with_points_in_the_quiet_hours(cafe):
    # Tuesday 1 Dec 2026, 15:00 at C02; a friend tagged student; asks to pay 100 points.
    sale = receipt("2026-12-01T15:00:00+01:00",
                   line(1, "coffee", 2800, qty="2"),
                   line(2, "cake", 1500),
                   line(3, "alcohol", 1200),
                   store="C02")
    who = guest("friend", receipt_number=25, tags=frozenset({"student"}))
    result = cafe.evaluate(sale, who, 100, 500, {})
    # redeemable: lines 1 and 2 (alcohol is not) = 4300, max_share 1 -> cap 430 points: 100 applied.
    # discount 100 x 10 = 1000 grosze over 2800:1500 = 651.16, 348.84 -> 651, 349
    # points over the same: 65.116, 34.884 -> 65, 35
    assert (result.redeemed_points, result.discount) == (100, 1000)
    assert result.redeemed_by_line == [(1, 65, 651), (2, 35, 349)]
    # paid: 2149, 1151, 1200 = 4500
    # friend (wins group base) 3%: paid x 3/100/10 -> 6.447, 3.453, 3.6    = 13.5
    # coffee-stamp 2 cups (not reduced by the discount)                     = 2
    # students 2% on a Tuesday: paid x 2/100/10 -> 4.298, 2.302, 2.4       = 9
    # quiet-hours 15:00: 5 over 2149:1151:1200 -> 2.3878, 1.2789, 1.3333   = 5
    # exact 29.5 -> half up 30 (floor would give 29)
    # floors 6+3+3, 2, 4+2+2, 2+1+1 = 26; 4 left: friend l3 .6, l2 .453, l1 .447, students l3 .4
    assert result.accrued_points == 30
    assert result.by_rule == [("friend", 15), ("coffee-stamp", 2), ("students", 9), ("quiet-hours", 4)]
    assert result.by_line == [(1, 15), (2, 7), (3, 8)]
    assert sum(points for _, _, points in result.pairs) == 30


def test_case_3_matcha_budget_gives_the_crossing_receipt_the_remainder(cafe):
    # Wednesday 10 Mar 2027, 10:00 at C01
    sale = receipt("2027-03-10T10:00:00+01:00", line(1, "tea", 1800, sku="MATCHA-L"), line(2, "juice", 700))
    who = guest(receipt_number=5)
    # everyday 2500 // 500 = 5 over 1800:700 -> 3.6, 1.4; matcha-launch 20 on line 1 alone
    # exact 25; floors 3+1, 20 = 24; the one left goes to everyday line 1 (.6)
    full = cafe.evaluate(sale, who, 0, 0, {}, {"matcha-launch": 10000})
    assert full.by_rule == [("everyday", 5), ("matcha-launch", 20)]
    assert full.by_line == [(1, 24), (2, 1)]
    # matcha points burn after 30 days: 10 Mar + 30 = 9 Apr; everyday's after 180: 6 Sep
    assert full.lots == [(date(2027, 3, 10), date(2027, 4, 9), 20), (date(2027, 3, 10), date(2027, 9, 6), 5)]
    # 13 points left in the budget: this receipt crosses it and gets those 13
    crossing = cafe.evaluate(sale, who, 0, 0, {}, {"matcha-launch": 13})
    assert crossing.by_rule == [("everyday", 5), ("matcha-launch", 13)]
    assert (crossing.accrued_points, crossing.by_line) == (18, [(1, 17), (2, 1)])
    assert crossing.lots == [(date(2027, 3, 10), date(2027, 4, 9), 13), (date(2027, 3, 10), date(2027, 9, 6), 5)]
    # nothing left: later receipts get none, everyday earning is untouched
    spent = cafe.evaluate(sale, who, 0, 0, {}, {"matcha-launch": 0})
    assert (spent.by_rule, spent.accrued_points) == ([("everyday", 5)], 5)
    # once per guest in the campaign period, and nothing outside it
    assert cafe.evaluate(sale, who, 0, 0, {"matcha-launch": 1}, {"matcha-launch": 500}).fired == ["everyday"]
    april = receipt("2027-04-01T10:00:00+02:00", line(1, "tea", 1800, sku="MATCHA-L"))
    assert cafe.evaluate(april, who, 0, 0, {}, {"matcha-launch": 500}).fired == ["everyday"]


def test_case_4_birthday_cake_and_a_catering_order_at_the_kiosk_before_the_rush(cafe):
    # Saturday 5 Dec 2026, 7:30 at the kiosk; birthday on 7 Dec (2 days away); a student
    sale = receipt("2026-12-05T07:30:00+01:00",
                   line(1, "cake", 4000),
                   line(2, "coffee", 5600, qty="4"),
                   line(3, "juice", 5600),
                   store="K01")
    who = guest(receipt_number=3, birthday=date(1995, 12, 7), tags=frozenset({"student"}))
    result = cafe.evaluate(sale, who, 0, 0, {})
    # total 15200, 3 lines
    # everyday      15200 // 500 = 30 over 4000:5600:5600 -> 7.8947, 11.0526, 11.0526
    # coffee-stamp  4 cups                                  -> 4
    # students      no: a Saturday (not weekdays [sat, sun])
    # quiet-hours   the second alternative (K01, 06:00-08:00): 5 -> 1.3158, 1.8421, 1.8421
    # catering      >= 150.00, 3 lines, at the counter: 25 -> 6.5789, 9.2105, 9.2105
    # birthday-week 10% of the cake: 4000 x 10/100/10      -> 40
    # exact 30 + 4 + 5 + 25 + 40 = 104
    # floors 7+11+11, 4, 1+1+1, 6+9+9, 40 = 100; 4 left: everyday l1 .8947, quiet l2 .8421,
    # quiet l3 .8421, catering l1 .5789
    assert result.accrued_points == 104
    assert result.by_rule == [("everyday", 30), ("coffee-stamp", 4), ("quiet-hours", 5), ("catering", 25),
                              ("birthday-week", 40)]
    assert result.by_line == [(1, 56), (2, 26), (3, 22)]
    # birthday points burn after 14 days, the rest after 180
    assert result.lots == [(date(2026, 12, 5), date(2026, 12, 19), 40), (date(2026, 12, 5), date(2027, 6, 3), 64)]
    # the same order after today's quiet-hours bonus and a week of 10 coffee receipts:
    # 30 + 25 + 40 = 95
    used = cafe.evaluate(sale, who, 0, 0, {"quiet-hours": 1, "coffee-stamp": 10})
    assert (used.by_rule, used.accrued_points) == ([("everyday", 30), ("catering", 25), ("birthday-week", 40)], 95)
    # through the delivery app it is not catering (channel ne app)
    app = receipt("2026-12-05T07:30:00+01:00", line(1, "cake", 4000), line(2, "coffee", 5600, qty="4"),
                  line(3, "juice", 5600), store="K01", channel="app")
    assert "catering" not in cafe.evaluate(app, who, 0, 0, {}).fired


def test_case_5_half_up_rounding_of_a_single_espresso(cafe):
    # Wednesday 2 Dec 2026, 11:00: a friend buys one 15.00 PLN coffee
    sale = receipt("2026-12-02T11:00:00+01:00", line(1, "coffee", 1500), store="C02")
    result = cafe.evaluate(sale, guest("friend"), 0, 0, {})
    # friend 3%: 1500 x 3/100/10 = 4.5; coffee-stamp 1 -> 5.5, half up 6; the spare point to friend (.5)
    assert (result.accrued_points, result.by_rule) == (6, [("friend", 5), ("coffee-stamp", 1)])
    # a regular: 1500 // 500 = 3 everyday + 1 stamp = 4 exactly
    assert cafe.evaluate(sale, guest(), 0, 0, {}).by_rule == [("everyday", 3), ("coffee-stamp", 1)]


def test_redemption_minimum_and_alcohol(cafe):
    sale = receipt("2026-12-02T11:00:00+01:00", line(1, "coffee", 1500), line(2, "alcohol", 2000))
    # only the coffee may be paid with points: at most 150 points; 40 is under the 50 minimum
    assert cafe.evaluate(sale, guest(), 40, 1000, {}).redeem_refusal == "below_min_redemption"
    whole = cafe.evaluate(sale, guest(), 1000, 1000, {})
    assert (whole.redeemed_points, whole.discount, whole.redeemed_by_line) == (150, 1500, [(1, 150, 1500)])
    # the coffee was paid wholly with points: everyday counts only the beer's 20.00 -> 4; the stamp stays
    assert whole.by_rule == [("everyday", 4), ("coffee-stamp", 1)]
    assert whole.by_line == [(1, 1), (2, 4)]


async def test_the_server_serves_the_cafe_program(make_api):
    from conftest import KEYS, _h
    from conftest import line as api_line
    from conftest import receipt as api_receipt

    keys = [{"id": "register-C01", "sha256": _h(KEYS["register"]), "role": "register", "stores": ["C01"]},
            {"id": "manager", "sha256": _h(KEYS["manager"]), "role": "manager"}]
    api = await make_api(now="2026-12-01T09:00:05+01:00", program_dir=CAFE, auth={"keys": keys})
    assert (await api.post("/v1/members", {"card": "C-1"}))[0] == 201
    # case 1 above, through the API: 39 points, available the same day (activation 0)
    body = api_receipt("K-1", [api_line(1, "coffee", 1400), api_line(2, "pastry", 900), api_line(3, "gift_card", 5000)],
                       card="C-1", ts="2026-12-01T09:00:00+01:00", store="C01", register="T1")
    status, result = await api.post("/v1/receipts", body, as_="register")
    assert status == 201, result
    assert result["accrued"]["points"] == 39 and result["accrued"]["available_from"] == "2026-12-01"
    assert result["accrued"]["by_rule"] == [{"rule": "everyday", "points": 4}, {"rule": "coffee-stamp", "points": 1},
                                            {"rule": "pastry-double", "points": 2}, {"rule": "first-visit", "points": 30},
                                            {"rule": "newcomer", "points": 2}]
    status, member = await api.get("/v1/members/C-1")
    assert member["balance"] == {"available": 50 + 39, "pending": 0, "held": 0}  # welcome 50 and the receipt
    assert {"date": "2027-01-30", "points": 30} in member["expiring"]
