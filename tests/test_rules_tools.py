"""Program.explain, `loyalty rules explain`, `loyalty rules diff` and `loyalty export receipts`."""
from __future__ import annotations

import hashlib
import hmac
import io
import json
import random
import shutil
from contextlib import closing
from datetime import date
from pathlib import Path

import msgspec
import pytest
import yaml
from conftest import MARKET, TEST_HMAC_KEY, connect, database_section, line, receipt

from rules import MemberFacts, format_explanation, load_files, load_program
from server.cli import main
from server.replay_member import ReplayMember
from server.rules_tools import Replay, decode_receipt, diff, export_receipts, read_receipts
from server.schema import Receipt

CARD = "7000000000001"
NOW = "2026-11-24T12:00:05+02:00"


def as_receipt(body: dict) -> Receipt:
    return msgspec.convert(body, Receipt)


def gold(**facts) -> MemberFacts:
    facts.setdefault("enrolled_on", date(2026, 1, 1))
    facts.setdefault("receipt_number", 3)
    return MemberFacts(member_id="m_1", tier=facts.pop("tier", "gold"), **facts)


@pytest.fixture(scope="module")
def market():
    program = load_program(MARKET)
    yield program
    program.close()


def by_id(explanation):
    return {rule.id: rule for rule in explanation.rules}


# Program.explain ------------------------------------------------------------------


def test_explain_names_the_condition_period_scope_and_group_that_said_no(market):
    body = receipt("E-1", [line(1, "dairy", 9100, qty=2), line(2, "bakery", 3000), line(3, "tobacco", 10000)],
                   card=CARD, ts="2026-12-01T12:00:00+02:00")
    explanation = market.explain(as_receipt(body), gold())
    rules = by_id(explanation)
    assert rules["base"].status == "outranked"
    assert rules["base"].reasons == ["group base: base-gold (priority 20) won"]
    assert rules["base-silver"].reasons == ["when.tier: gold is not silver"]
    # 5% of 121.00 is 6.05 points, floored to 6: line 1 has 4.55, line 2 1.50; the spare point
    # goes to the larger remainder (line 1)
    assert (rules["base-gold"].status, rules["base-gold"].points) == ("applied", 6)
    assert rules["base-gold"].by_line == [(1, 5), (2, 1)]
    assert rules["dairy-x2"].reasons == ["period: 2026-12-01 is after 2026-11-30"]
    assert rules["big-basket"].reasons == ["when.total: 22100 is not >= 100000"]
    assert rules["big-basket"].notes == ["limit: not checked"]
    assert rules["morning"].reasons == ["when.hours: 12:00 is not within 07:00-10:00"]
    assert rules["fuel"].reasons == ["when.partner: none is not fuelco", "scope selects no line"]
    assert explanation.evaluation.accrued_points == 6
    assert explanation.evaluation.by_line == [(1, 5), (2, 1)]
    text = format_explanation(explanation, "UAH")
    assert "base-gold    applied: 6 point(s) (line 1: 5, line 2: 1)" in text
    assert "big-basket   not applicable: when.total: 22100 is not >= 100000  (limit: not checked)" in text
    assert text.splitlines()[-2] == "total: 6 point(s), rounded once (floor)"


def test_explain_with_usage_checks_limits_and_says_when_nothing_was_left_to_earn(market):
    body = receipt("E-2", [line(1, "dairy", 120000)], card=CARD, ts="2026-11-24T08:30:00+02:00", redeem_points=600)
    sale = as_receipt(body)
    rules = by_id(market.explain(sale, gold(tier="base"), 600, usage={"big-basket": 1}))
    assert rules["big-basket"].reasons == ["limit reached: fired 1 of 1 time(s) this day"]
    assert rules["morning"].status == "applied"
    # max_share 0.5 caps the redemption at 600 points = 600.00 of 1,200.00
    everything_paid = load_files({
        "p.yaml": "program: {id: t, currency: UAH, timezone: UTC}\npoints: {value: 100}\n",
        "r.yaml": "rules:\n  - {id: flat, reward: {points: 5}}\n  - {id: steps, reward: {per_amount: {every: 10000, points: 1}}}\n"
                  "  - {id: dairy-only, group: g, scope: {categories: [dairy]}, reward: {percent: 1}}\n"
                  "  - {id: x2, reward: {multiply: g, by: 2}}\n",
    })
    try:
        small = as_receipt(receipt("E-3", [line(1, "bakery", 5000)], card=CARD))
        rules = by_id(everything_paid.explain(small, gold(tier="base"), 50))
        assert rules["flat"].reasons == ["the lines in scope were paid wholly with points"]
        assert rules["steps"].status == "no points"
        assert rules["dairy-only"].reasons == ["scope selects no line"]
        assert rules["x2"].reasons == ["multiply: no rule of group g applies"]
        rules = by_id(everything_paid.explain(small, gold(tier="base")))
        assert rules["steps"].reasons == ["per_amount: 5000 paid in scope is less than every 10000"]
        assert rules["flat"].points == 5
    finally:
        everything_paid.close()


def test_explain_reads_not_any_operators_and_member_fields():
    program = load_files({
        "p.yaml": "program: {id: t, currency: UAH, timezone: Europe/Kyiv}\npoints: {value: 100}\n"
                  "tiers: {levels: [{id: base, from: 0}, {id: gold, from: 100}]}\n"
                  "stores: [{id: S001, tags: [kyiv]}]\n",
        "r.yaml": """\
rules:
  - {id: not-kyiv, when: {not: {store: S001}}, reward: {points: 1}}
  - {id: gold-or-big, when: {any: [{tier: gold}, {total: {gte: 50000}}]}, reward: {points: 1}}
  - {id: mid, when: {total: {between: [10000, 20000]}, items: {ne: 1}}, reward: {points: 1}}
  - {id: weekend, when: {weekdays: [sat, sun]}, reward: {points: 1}}
  - {id: vip, when: {tags: [vip, staff]}, reward: {points: 1}}
  - {id: bday, when: {birthday_within_days: 3}, reward: {points: 1}}
  - {id: new, when: {enrolled_within_days: 30, receipt_number: 1}, reward: {points: 1}}
  - {id: lviv, when: {store_tags: lviv}, reward: {points: 1}}
""",
    })
    try:
        sale = as_receipt(receipt("E-4", [line(1, "x", 5000)], card=CARD))
        who = MemberFacts(member_id="m", tier="base", tags=frozenset({"new"}), birthday=date(1990, 12, 1),
                          enrolled_on=date(2026, 1, 1), receipt_number=4)
        rules = by_id(program.explain(sale, who))
        assert rules["not-kyiv"].reasons == ["when.not: the negated block holds (when.not.store: S001 is S001)"]
        assert rules["gold-or-big"].reasons == [
            "when.any: no alternative holds (when.any[0].tier: base is not gold; "
            "when.any[1].total: 5000 is not >= 50000)"
        ]
        assert rules["mid"].reasons == ["when.total: 5000 is not between 10000 and 20000", "when.items: 1 is 1 (ne)"]
        assert rules["weekend"].reasons == ["when.weekdays: tue is not one of [sat, sun]"]
        assert rules["vip"].reasons == ["when.tags: member tags [new] include none of [vip, staff]"]
        assert rules["bday"].reasons == ["when.birthday_within_days: birthday is 7 day(s) away, not within 3"]
        assert rules["new"].reasons == [
            "when.enrolled_within_days: enrolled 327 day(s) ago, not within 30",
            "when.receipt_number: 4 is not 1",
        ]
        assert rules["lviv"].reasons == ["when.store_tags: store tags [kyiv] include none of lviv"]
        unknown = MemberFacts(member_id="m", tier="gold")
        rules = by_id(program.explain(sale, unknown))
        assert rules["gold-or-big"].status == "applied"
        assert rules["bday"].reasons == ["when.birthday_within_days: birthday unknown"]
        assert rules["new"].reasons[0] == "when.enrolled_within_days: enrolment date unknown"
        anonymous = program.explain(sale, None)
        assert {rule.status for rule in anonymous.rules} == {"not applicable"}
    finally:
        program.close()


def test_explanation_agrees_with_evaluate_and_the_engine_on_many_receipts(market):
    rng = random.Random(7)
    categories = ["dairy", "bakery", "tobacco", "fuel", "alcohol"]
    for number in range(300):
        lines = [line(no, rng.choice(categories), rng.choice([500, 4550, 30000, 90000]), qty=rng.choice([1, 2, "0.5"]))
                 for no in range(1, rng.randint(1, 4) + 1)]
        day = rng.choice(["2026-11-19", "2026-11-24", "2026-11-28", "2026-12-01"])
        hour = rng.choice(["06:59", "07:00", "09:59", "10:00", "18:00"])
        body = receipt(f"R-{number}", lines, card=CARD, ts=f"{day}T{hour}:00+02:00", store=rng.choice(["S001", "F001"]))
        who = gold(tier=rng.choice(["base", "silver", "gold"]))
        usage = {"big-basket": rng.randint(0, 1)}
        sale = as_receipt(body)
        explanation = market.explain(sale, who, usage=usage)
        evaluation = market.evaluate(sale, who, 0, 0, usage)
        assert explanation.evaluation.by_rule == evaluation.by_rule
        applied = [rule.id for rule in explanation.rules if rule.status == "applied"]
        assert applied == evaluation.fired
        for rule in explanation.rules:
            assert not any("rule engine" in note for note in rule.notes), (body, rule)
            assert (rule.status == "applied") == (not rule.reasons)


# CLI ---------------------------------------------------------------------------------


def write_config(tmp_path: Path, program_dir: Path = MARKET) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"database": database_section(tmp_path / "loyalty.db"),
                                    "rules": {"dir": str(program_dir), "watch": False},
                                    "privacy": {"hmac_key": TEST_HMAC_KEY}}))
    return path


async def test_rules_explain_reads_member_facts_from_the_database(make_api, tmp_path, capsys):
    api = await make_api(now=NOW)
    assert (await api.post("/v1/members", {"card": CARD, "tags": ["staff"], "birthday": "1990-11-25"}))[0] == 201
    assert (await api.put(f"/v1/admin/members/{CARD}/tier", {"tier": "gold", "until": "2026-12-31"}))[0] == 200
    first = receipt("C-1", [line(1, "bakery", 3000)], card=CARD, ts="2026-11-24T11:00:00+02:00")
    assert (await api.post("/v1/receipts", first, as_="register"))[0] == 201
    config = write_config(tmp_path)
    body = receipt("C-2", [line(1, "dairy", 9100, qty=2), line(2, "bakery", 3000)], card=CARD)
    receipt_file = tmp_path / "receipt.json"
    receipt_file.write_text(json.dumps(body))
    assert main(["rules", "explain", "--config", str(config), str(receipt_file)]) == 0
    out = capsys.readouterr().out
    assert "member m_1: tier gold, tags [staff], birthday 1990-11-25, enrolled 2026-11-24, receipt #2" in out
    # gold 5% of 121.00 = 6.05 and dairy-x2 adds base-gold's 4.55 on line 1 again: 10.60, floored to 10
    assert "base-gold    applied: 6 point(s) (line 1: 5, line 2: 1)" in out
    assert "dairy-x2     applied: 4 point(s) (line 1: 4)" in out
    assert "total: 10 point(s), rounded once (floor)" in out
    # an explicit card that is not enrolled: a returning base member, said on stderr
    # an explicit card that is not enrolled: a returning base member, said on stderr, and the
    # card shown by its last four digits only, in text and in JSON
    assert main(["rules", "explain", "--config", str(config), str(receipt_file), "--card", "7000000000099"]) == 0
    captured = capsys.readouterr()
    assert "card ending 0099 is not enrolled" in captured.err
    assert "member -: tier base, tags [], birthday unknown, enrolled unknown, receipt #2" in captured.out
    assert "7000000000099" not in captured.out + captured.err
    assert main(["rules", "explain", "--config", str(config), str(receipt_file), "--card", "7000000000099",
                 "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["member"]["member_id"] == "-"
    assert "7000000000099" not in captured.out + captured.err
    # a redemption is applied as requested unless --available says otherwise
    receipt_file.write_text(json.dumps({**body, "redeem_points": 20}))
    assert main(["rules", "explain", "--config", str(config), str(receipt_file), "--available", "5"]) == 0
    assert "redemption refused: insufficient_points" in capsys.readouterr().out
    assert main(["rules", "explain", "--config", str(config), str(receipt_file)]) == 0
    assert "redeemed: 20 points, discount 20.00 UAH" in capsys.readouterr().out
    assert main(["rules", "explain", "--config", str(config), str(receipt_file), "--available", "-5"]) == 2
    refused = capsys.readouterr()
    assert refused.err == "--available must be 0 or more points, not -5\n" and refused.out == ""
    assert main(["rules", "explain", "--config", str(config), str(receipt_file), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["evaluation"]["redeemed_points"] == 20 and data["member"]["tier"] == "gold"
    assert {rule["id"]: rule["status"] for rule in data["rules"]}["base"] == "outranked"
    receipt_file.write_text("{}")
    assert main(["rules", "explain", "--config", str(config), str(receipt_file)]) == 2
    assert "not a receipt" in capsys.readouterr().err


async def test_explain_and_diff_refuse_a_bad_receipt_with_the_problems_the_api_lists(make_api, tmp_path, capsys):
    api = await make_api(now=NOW)
    bad = receipt("B-1", [line(1, "dairy", 1000, qty=1.5)], store="S 001", colour="red")
    bad["lines"][0].update(line_no=0, price="10")
    no_offset = receipt("B-2", [line(1, "dairy", 1000)], ts="2026-11-24T12:00:00")
    config = write_config(tmp_path)
    for n, body in enumerate([bad, no_offset]):
        status, answer = await api.post("/v1/receipts", body, as_="register")
        assert status == 422, answer
        expected = [f"  {d['path']} {d['message']}" for d in answer["error"]["details"]]
        path = tmp_path / f"bad-{n}.json"
        path.write_text(json.dumps(body))
        assert main(["rules", "explain", "--config", str(config), str(path)]) == 2
        assert capsys.readouterr().err.splitlines() == [f"{path}: not a receipt ({len(expected)} problem(s)):",
                                                       *expected]
        # diff reads each line of its file the same way
        jsonl = tmp_path / f"bad-{n}.jsonl"
        jsonl.write_text(json.dumps(receipt("fine", [line(1, "dairy", 1000)])) + "\n" + json.dumps(body) + "\n")
        assert main(["rules", "diff", str(MARKET), str(MARKET), "--receipts", str(jsonl)]) == 2
        assert capsys.readouterr().err.splitlines() == [f"{jsonl}:2: not a receipt ({len(expected)} problem(s)):",
                                                       *expected]
    assert len(expected) == 1 and "UTC offset" in expected[0]


async def test_export_receipts_writes_the_stored_bodies_and_diff_replays_them(make_api, tmp_path, capsys):
    api = await make_api(now=NOW)
    await api.post("/v1/members", {"card": CARD})
    bodies = [
        receipt("X-1", [line(1, "dairy", 9100, qty=2)], card=CARD, ts="2026-11-22T12:00:00+02:00"),
        receipt("X-2", [line(1, "bakery", 150000)], card=CARD, ts="2026-11-23T12:00:00+02:00"),
        receipt("X-3", [line(1, "bakery", 5000)], ts="2026-11-24T12:00:00+02:00"),
    ]
    for body in bodies:
        assert (await api.post("/v1/receipts", body, as_="register"))[0] == 201
    config = write_config(tmp_path)
    out = tmp_path / "receipts.jsonl"
    assert main(["export", "receipts", "--config", str(config), "--out", str(out)]) == 0
    assert "3 receipts exported" in capsys.readouterr().err
    exported = [json.loads(text) for text in out.read_text().splitlines()]
    assert [item["receipt_id"] for item in exported] == ["X-1", "X-2", "X-3"]
    # Each receipt of a member with the facts recorded with it; X-2 is the member's second receipt.
    members = [item.pop("member", None) for item in exported]
    assert [m and (m["member_id"], m["tier"], m.get("receipt_number", 2)) for m in members] == \
        [("m_1", "base", 1), ("m_1", "base", 2), None]
    # Exports carry the card's HMAC, never the number (the same card keeps the same HMAC).
    card_hmac = hmac.new(TEST_HMAC_KEY.encode(), b"card\0" + CARD.encode(), hashlib.sha256).hexdigest()
    assert [item.get("card") for item in exported] == [card_hmac, card_hmac, None]
    assert [decode_receipt(item, "-") for item in exported] == \
        [as_receipt({**body, "card": card_hmac} if "card" in body else body) for body in bodies]
    assert main(["export", "receipts", "--config", str(config), "--from", "2026-11-23", "--to", "2026-11-23"]) == 0
    assert [json.loads(t)["receipt_id"] for t in capsys.readouterr().out.splitlines()] == ["X-2"]
    # Dates out of order, or a file in a folder that is not there: one line, nothing written.
    assert main(["export", "receipts", "--config", str(config), "--from", "2026-11-24", "--to", "2026-11-22"]) == 2
    nowhere = tmp_path / "no-such-folder" / "receipts.jsonl"
    assert main(["export", "receipts", "--config", str(config), "--out", str(nowhere)]) == 2
    out_err = capsys.readouterr()
    assert out_err.out == "" and out_err.err.splitlines() == [
        "export receipts: --to 2026-11-22 is before --from 2026-11-24; nothing was exported",
        f"export receipts: cannot write {nowhere}: No such file or directory; nothing was exported"]
    calls = []
    with closing(connect(tmp_path / "loyalty.db")) as conn:
        assert export_receipts(conn, io.StringIO(), date(2026, 11, 23), None, lambda *done: calls.append(done)) == 2
    assert calls == [(0, 2), (2, 2)]

    changed = tmp_path / "changed"
    shutil.copytree(MARKET, changed)
    base = changed / "campaigns" / "base.yaml"
    base.write_text(base.read_text().replace("reward: {percent: 2}", "reward: {percent: 3}"))
    assert main(["rules", "diff", str(MARKET), str(changed), "--receipts", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {row["rule"]: row for row in report["rules"]}
    # 2% of 91.00 = 1.82 base, doubled dairy +1.82 -> 3.64 -> 3 points (base 2, dairy-x2 1 by remainders);
    #      3%: 2.73 + 2.73 = 5.46 -> 5 (base 3, dairy-x2 2)
    # 2% of 1,500.00 = 30 and big-basket 50; 3%: 45 and 50. X-3 has no card.
    assert rows["base"] == {"rule": "base", "old": 32, "new": 48, "old_receipts": 2, "new_receipts": 2,
                            "difference": 16}
    assert (rows["dairy-x2"]["old"], rows["dairy-x2"]["new"]) == (1, 2)
    assert (rows["big-basket"]["old"], rows["big-basket"]["new"]) == (50, 50)
    assert (report["receipts"], report["anonymous"], report["changed"]) == (3, 1, 2)
    assert report["without_member_facts"] == 0
    assert (report["old_total"], report["new_total"]) == (83, 100)
    assert main(["rules", "diff", str(MARKET), str(changed), "--receipts", str(out)]) == 0
    text = capsys.readouterr().out
    assert "base" in text and "+16" in text and text.splitlines()[-1].split() == ["total", "83", "100", "+17"]
    assert main(["rules", "diff", str(MARKET), str(tmp_path / "nowhere"), "--receipts", str(out)]) == 2
    assert "does not load" in capsys.readouterr().err


def test_rules_explain_without_a_member_names_the_programs_own_first_tier(tmp_path, capsys):
    config = write_config(tmp_path, MARKET.parent / "cafe")
    receipt_file = tmp_path / "receipt.json"
    receipt_file.write_text(json.dumps(receipt("C-1", [line(1, "coffee", 1200)])))
    assert main(["rules", "explain", "--config", str(config), str(receipt_file)]) == 0
    captured = capsys.readouterr()
    assert captured.err.endswith("the receipt has no card (it would earn nothing): explaining for a returning "
                                 "member of the first tier, regular\n")
    assert "tier regular" in captured.out


def test_diff_of_member_facts_written_by_hand_says_what_is_wrong_in_the_apis_words(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    body = receipt("D-1", [line(1, "dairy", 9100)], card="c1")
    for member, said in (({"tierr": "gold"}, "tierr is not a known field"),
                         ({"birthday": "17.05.1990", "receipt_number": 0},
                          "birthday must be a date like 2026-11-24; receipt_number must be at least 1"),
                         ({"offers": [{"rule": "comeback", "points_left": "all"}]},
                          "offers[0].points_left must be a whole number")):
        path.write_text(json.dumps({**body, "member": member}) + "\n")
        assert main(["rules", "diff", str(MARKET), str(MARKET), "--receipts", str(path)]) == 2
        assert capsys.readouterr().err == f"{path}:1: member: {said}\n"


def test_diff_of_a_line_nested_too_deeply_to_read_is_one_line(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(receipt("D-1", [line(1, "x", 100)])) + "\n" + "[" * 100_000 + "\n")
    assert main(["rules", "diff", str(MARKET), str(MARKET), "--receipts", str(path)]) == 2
    assert capsys.readouterr().err == f"{path}:2: expected a receipt object, found values nested too deeply to read\n"


def test_diff_counts_limits_and_budgets_from_the_first_receipt(tmp_path):
    settings = "program: {id: t, currency: UAH, timezone: UTC}\npoints: {value: 100}\n"
    old = load_files({"p.yaml": settings, "r.yaml": "rules:\n  - {id: base, reward: {percent: 1}}\n"})
    new = load_files({"p.yaml": settings, "r.yaml": """\
rules:
  - {id: base, reward: {percent: 1}}
  - {id: daily, reward: {points: 10}, limit: {per_member: {count: 1, per: day}}}
  - {id: launch, reward: {points: 7}, budget: {points: 12}}
  - {id: first, when: {receipt_number: 1}, reward: {points: 100}}
"""})
    lines = []
    for number, (card, day) in enumerate([("A", "01"), ("A", "01"), ("B", "01"), ("A", "02")]):
        body = receipt(f"D-{number}", [line(1, "x", 10000)], card=card, ts=f"2026-11-{day}T12:00:00+00:00")
        lines.append(json.dumps(body))
    lines.append(json.dumps({**json.loads(lines[0]), "receipt_id": "D-first", "member": {"receipt_number": 1}}))
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(lines) + "\n\n")
    try:
        report = diff(old, new, read_receipts(path))
        rows = {row.rule: (row.old, row.new) for row in report.rules}
        # daily: A on the 1st once, B on the 1st, A on the 2nd; the 5th receipt is A's second on the 1st
        assert rows["daily"] == (0, 30)
        assert rows["launch"] == (0, 12)  # 7, then the 5 left, then nothing
        assert rows["first"] == (0, 100)
        assert rows["base"] == (5, 5)
        replay = Replay(new)
        first = decode_receipt(json.loads(lines[0]), "-")
        assert replay.run(first, ReplayMember(tier="base")) == {"base": 1, "daily": 10, "launch": 7}
    finally:
        old.close()
        new.close()
    path.write_text('{"receipt_id": "x", "member": {"colour": "red"}}\n')
    with pytest.raises(Exception, match="member"):
        list(read_receipts(path))
