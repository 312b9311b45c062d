"""The campaign report's audience: the members enrolled by `to` who met the rule's member
conditions (tier, tags, segment, offers) on `from`, on a hand-made history where members
entered and left segments, changed tier and held offers around that day."""
from __future__ import annotations

import asyncio
from datetime import date, datetime, timezone

import msgspec
import pytest

from conftest import storage_database
from rules import load_files
from server import cvm, report_campaign, rfm
from server.report_campaign import holdout_member
from storage import offers, segments

FROM, TO = date(2026, 11, 10), date(2026, 11, 30)
SHOP = """\
program: {id: shop, name: Shop, currency: UAH, timezone: Europe/Kyiv}
points: {value: 100, rounding: floor, activation_delay_days: 0, expiry_days: 365}
tiers: {metric: spend, window_days: 365, levels: [{id: base, from: 0}, {id: gold, from: 100000}]}
stores: [{id: S001}]
segments:
  rfm: {window_days: 180}
  define:
    - {id: big, when: {spend_in_window: {gte: 50000}}}
    - {id: staff, list: true}
rules:
  - {id: everyone, reward: {percent: 1}, holdout: 0.5}
  - {id: gold-only, when: {tier: gold, total: {gte: 1000}}, reward: {percent: 5}, holdout: 0.5}
  - {id: vip-tagged, when: {tags: [vip]}, reward: {percent: 5}, holdout: 0.5}
  - {id: big-seg, when: {segment: big}, reward: {percent: 5}, holdout: 0.5}
  - {id: staff-seg, when: {segment: staff}, reward: {percent: 5}, holdout: 0.5}
  - {id: not-staff, when: {not: {segment: staff}, total: {gte: 1000}}, reward: {percent: 5}, holdout: 0.5}
  - {id: gold-or-big-basket, when: {any: [{tier: gold}, {total: {gte: 90000}}]}, reward: {percent: 5}, holdout: 0.5}
  - {id: comeback, personal: true, reward: {points: 30}, holdout: 0.5}
"""


def at(day: str, hour: int = 10) -> datetime:
    return datetime.fromisoformat(f"{day}T{hour:02d}:00:00+00:00").replace(tzinfo=timezone.utc)


@pytest.fixture
def shop():
    program = load_files({"program.yaml": SHOP}, FROM)
    yield program
    program.close()


@pytest.fixture
def history(tmp_path, shop):
    db = storage_database(tmp_path / "audience.db")
    db.open()

    def write(sql, *args):
        db.write_sync(lambda conn: conn.execute(sql, args))

    def member(mid, tags="[]", enrolled="2026-01-01", manual=None):
        write("INSERT INTO members (id, tags, enrolled_at, updated_at, manual_tier, manual_tier_until) "
              "VALUES (?, ?, ?, ?, ?, ?)", mid, tags, f"{enrolled}T10:00:00.000000Z", enrolled, manual,
              "2027-01-01" if manual else None)

    def bought(key, mid, day, total):
        body = msgspec.json.encode({"lines": [{"line_no": 1, "sku": "x", "category": "coats", "amount": total}]})
        write("INSERT INTO receipts (store_id, register_id, receipt_id, body_sha256, member_id, ts, local_date, "
              "total, rules_version, status, body, result, created_at) VALUES ('S001', 'K01', ?, ?, ?, ?, ?, "
              "?, 'v', 'confirmed', ?, ?, ?)", key, b"\0", mid, f"{day}T10:00:00.000000Z", day, total, body, b"{}",
              f"{day}T10:00:00.000000Z")

    for mid in range(1, 7):
        member(mid, tags='["vip"]' if mid == 4 else "[]", manual="gold" if mid == 3 else None)
    member(7, enrolled="2026-12-05")                # enrolled after `to`: in no audience
    bought("1a", 1, "2026-10-01", 120000)           # gold and big before `from`
    bought("5a", 5, "2026-05-15", 60000)            # big until the window passes it (after `from`)
    bought("2a", 2, "2026-11-15", 120000)           # gold and big only after `from`
    bought("6a", 6, "2026-11-20", 30000)

    def job(moment):
        asyncio.run(rfm.run(db, 180, shop.timezone, moment, force=True, program=shop))
    job(at("2026-11-05"))                           # big: 1, 5
    job(at("2026-11-20"))                           # big: 1, 2
    db.write_sync(lambda conn: segments.add_members(conn, "staff", [6], at("2026-11-01")))
    db.write_sync(lambda conn: segments.add_members(conn, "staff", [2], at("2026-11-15")))
    db.write_sync(lambda conn: segments.remove_members(conn, "staff", [6], at("2026-11-20")))

    def offer(offer_id, mid, first, last):
        db.write_sync(lambda conn: offers.assign(conn, offer_id, "comeback", offer_id, date.fromisoformat(first),
                                                 date.fromisoformat(last), None, [mid], at("2026-10-01")))
    offer("o3", 3, "2026-11-01", "2026-11-30")      # valid on `from`
    offer("o4", 4, "2026-11-11", "2026-11-30")      # from the day after
    offer("o5", 5, "2026-10-01", "2026-11-09")      # over the day before
    yield db
    db.close()


def audience(db, shop, rule_id) -> dict[int, str]:
    rule = cvm.definitions_of(shop).rules[rule_id]
    setting = report_campaign.setting_of(shop)
    return db.read_sync(lambda conn: report_campaign._audience(conn, setting, rule, FROM, TO).groups)


@pytest.mark.parametrize("rule_id, members", [
    ("everyone", [1, 2, 3, 4, 5, 6]),               # no member conditions
    ("gold-only", [1, 3]),                          # gold on `from`: by spend, or by hand; 2 only later
    ("vip-tagged", [4]),
    ("big-seg", [1, 5]),                            # as the run before `from` left it: 2 entered, 5 left later
    ("staff-seg", [6]),                             # listed on `from`: 6 taken out later, 2 added later
    ("not-staff", [1, 2, 3, 4, 5]),
    ("gold-or-big-basket", [1, 2, 3, 4, 5, 6]),     # a big enough basket would do for anyone
    ("comeback", [3]),                              # an offer valid on `from`
])
def test_the_audience_is_who_met_the_member_conditions_on_from(history, shop, rule_id, members):
    got = audience(history, shop, rule_id)
    assert sorted(got) == members
    for mid, group in got.items():
        assert (group == "control") == holdout_member("shop", rule_id, f"m_{mid}", "0.5")


def test_the_report_counts_only_the_audience(history, shop):
    rule = cvm.definitions_of(shop).rules["big-seg"]
    setting = report_campaign.setting_of(shop)
    got = history.read_sync(lambda conn: report_campaign.report(conn, setting, rule, FROM, TO))
    # m_1 and m_5 are the audience; in the period only m_2 (not in it) and m_6 (not in it) bought.
    assert [holdout_member("shop", "big-seg", f"m_{mid}", "0.5") for mid in (1, 5)] == [True, False]
    empty = {"buyers": 0, "receipts": 0, "spend": 0, "scope_spend": 0, "points": 0}
    assert got["treated"] == {"members": 1, **empty} and got["control"] == {"members": 1, **empty}
    rule = cvm.definitions_of(shop).rules["not-staff"]
    got = history.read_sync(lambda conn: report_campaign.report(conn, setting, rule, FROM, TO))
    # m_2's 120,000 counts (not staff on `from`); m_6's 30,000 does not (staff on `from`).
    groups = {mid: holdout_member("shop", "not-staff", f"m_{mid}", "0.5") for mid in (1, 2, 3, 4, 5)}
    control = sorted(mid for mid, held in groups.items() if held)
    assert control == [1, 5]
    assert got["treated"] == {"members": 3, "buyers": 1, "receipts": 1, "spend": 120000, "scope_spend": 120000,
                              "points": 0}
    assert got["control"] == {"members": 2, **empty}
    assert got["uplift"]["spend_per_member"] == 40000 and got["incremental_spend"] == 120000
