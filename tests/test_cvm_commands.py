"""`loyalty coupons generate`, `loyalty import offers` and `loyalty report campaign`, run as functions
on a database of their own."""
from __future__ import annotations

import csv
import io
import os
import signal
import sys
import types
from datetime import date, datetime, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo

import msgspec
import pytest

from conftest import POSTGRESQL, storage_database
from server import cvm, cvm_cli
from server.privacy import Privacy
from server.report_campaign import CampaignRule
from storage import coupons, events, member_care, offers
from storage.health import StorageBusy

NOW = datetime(2026, 11, 24, 10, tzinfo=timezone.utc)
PRIVACY = Privacy(b"tests-cvm-cli-key-0123456789")
DEFS = cvm.Definitions(coupons={"xmas": coupons.Campaign("xmas", 1)}, personal={"comeback": True, "base": False},
                       rules={"promo": CampaignRule("promo", Decimal("0.5"), date(2026, 11, 1), date(2026, 11, 14)),
                              "base": CampaignRule("base", None)})


@pytest.fixture
def db(tmp_path):
    database = storage_database(tmp_path / "cli.db")
    database.open()

    def members(conn):
        conn.executemany("INSERT INTO members (id, tags, enrolled_at, updated_at) VALUES "
                         "(?, '[]', '2026-01-01T00:00:00.000000Z', '2026-01-01')", [(i,) for i in range(1, 5)])
        conn.executemany("INSERT INTO cards (card, member_id, created_at, card_last4) VALUES (?, ?, '2026', '0000')",
                         [(PRIVACY.card(f"c{i}"), i) for i in range(1, 5)])
    database.write_sync(members)
    yield database
    database.close()


def test_coupons_generate_writes_stored_codes_once(db, tmp_path, capsys):
    out = tmp_path / "codes.csv"
    assert cvm_cli.generate(db, DEFS, PRIVACY, "xmas", 12_345, out, None, NOW) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 12_345 and len({r["code"] for r in rows}) == 12_345 and rows[0]["campaign"] == "xmas"
    stored = db.read_sync(lambda conn: conn.execute("SELECT COUNT(*) FROM coupon_codes").fetchone()[0])
    assert stored == 12_345
    judged = db.read_sync(lambda conn: coupons.judge(conn, [rows[-1]["code"]], None, date(2026, 12, 1), DEFS.coupons,
                                                     PRIVACY.coupon))
    assert judged.statuses == [(rows[-1]["code"], coupons.USABLE)]
    assert cvm_cli.generate(db, DEFS, PRIVACY, "xmas", 1, out, None, NOW) == 2     # never over a file of codes
    assert cvm_cli.generate(db, DEFS, PRIVACY, "easter", 1, tmp_path / "e.csv", None, NOW) == 2
    assert "no coupon campaign easter" in capsys.readouterr().err


def test_coupons_generate_into_a_folder_that_is_not_there_makes_no_code(db, tmp_path, capsys):
    out = tmp_path / "no-such-folder" / "codes.csv"
    assert cvm_cli.generate(db, DEFS, PRIVACY, "xmas", 10, out, None, NOW) == 2
    assert capsys.readouterr().err == (f"coupons generate: cannot create {out}: No such file or directory; "
                                       "nothing was generated\n")
    assert db.read_sync(lambda conn: conn.execute("SELECT COUNT(*) FROM coupon_codes").fetchone()[0]) == 0


def test_coupons_generate_stopped_by_ctrl_c_keeps_file_and_database_alike(db, tmp_path, capsys, monkeypatch):
    add_codes = coupons.add_codes

    def ctrl_c_during_the_first_batch(conn, *args):
        if not conn.execute("SELECT COUNT(*) FROM coupon_codes").fetchone()[0]:
            os.kill(os.getpid(), signal.SIGINT)
        return add_codes(conn, *args)
    monkeypatch.setattr(coupons, "add_codes", ctrl_c_during_the_first_batch)
    out = tmp_path / "codes.csv"
    assert cvm_cli.generate(db, DEFS, PRIVACY, "xmas", 3 * coupons.WRITE_BATCH_CODES, out, None, NOW) == 130
    batch = coupons.WRITE_BATCH_CODES
    assert capsys.readouterr().err == (f"coupons generate: interrupted: {batch} of {3 * batch} codes of xmas stored "
                                       f"and written to {out}; no others were made\n")
    written = {r["code"] for r in csv.DictReader(out.open())}
    assert len(written) == batch
    stored = db.read_sync(lambda conn: conn.execute("SELECT COUNT(*) FROM coupon_codes").fetchone()[0])
    assert stored == batch
    code = sorted(written)[0]
    judged = db.read_sync(lambda conn: coupons.judge(conn, [code], None, date(2026, 12, 1), DEFS.coupons,
                                                     PRIVACY.coupon))
    assert judged.statuses == [(code, coupons.USABLE)]


def test_coupons_generate_stopped_by_a_locked_database_says_what_the_file_holds(db, tmp_path, monkeypatch):
    write_sync, writes = db.write_sync, []

    def locked_from_the_second_batch(fn, *args, **kwargs):
        writes.append(fn)
        if len(writes) > 1:
            raise StorageBusy("waited 2.0s for it")
        return write_sync(fn, *args, **kwargs)
    monkeypatch.setattr(db, "write_sync", locked_from_the_second_batch)
    batch, out = coupons.WRITE_BATCH_CODES, tmp_path / "codes.csv"
    with pytest.raises(cvm_cli.Stopped) as stopped:
        cvm_cli.generate(db, DEFS, PRIVACY, "xmas", 2 * batch, out, None, NOW)
    assert stopped.value.done == f"{batch} of {2 * batch} codes of xmas stored and written to {out}; no others were made"
    assert len(list(csv.DictReader(out.open()))) == batch
    assert write_sync(lambda conn: conn.execute("SELECT COUNT(*) FROM coupon_codes").fetchone()[0]) == batch
    # Locked from the first batch: no file of no codes is left in the way of running it again.
    writes.append(None)
    with pytest.raises(cvm_cli.Stopped) as stopped:
        cvm_cli.generate(db, DEFS, PRIVACY, "xmas", 10, tmp_path / "more.csv", None, NOW)
    assert stopped.value.done == "nothing was generated" and not (tmp_path / "more.csv").exists()


def two_offers(folder):
    """An offers file of two offers, one card each."""
    source = folder / "offers.csv"
    source.write_text("offer_id,rule,card,from,to,points\n"
                      "o1,comeback,c1,2026-12-01,2026-12-31,\n"
                      "o2,comeback,c2,2026-12-01,2026-12-31,\n")
    return source


def test_coupons_generate_refuses_a_card_that_is_no_card(db, tmp_path, capsys):
    out = tmp_path / "codes.csv"
    for card in ("", "70 01", "x" * 65):
        assert cvm_cli.generate(db, DEFS, PRIVACY, "xmas", 3, out, card, NOW) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("coupons generate: --card must be a card number"), err
    assert not out.exists()
    assert db.read_sync(lambda conn: conn.execute("SELECT COUNT(*) FROM coupon_codes").fetchone()[0]) == 0


def test_coupons_generate_refuses_a_card_taken_out_of_use(db, tmp_path, capsys):
    """Codes bound to a replaced or merged-away card could never be presented by a till."""
    db.write_sync(lambda conn: member_care.retire_card(conn, PRIVACY.card("c1"), 1, "replaced", "0009",
                                                       "2026-11-20T10:00:00.000000Z"))
    db.write_sync(lambda conn: member_care.retire_card(conn, PRIVACY.card("c2"), 2, "merged", "m_3",
                                                       "2026-11-21T10:00:00.000000Z"))
    out = tmp_path / "codes.csv"
    for card, why in (("c1", "was replaced on 2026-11-20 by the card ending 0009"),
                      ("c2", "belonged to m_2, merged into m_3 on 2026-11-21")):
        assert cvm_cli.generate(db, DEFS, PRIVACY, "xmas", 3, out, card, NOW) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"coupons generate: --card: card {card} {why}"), err
        assert err.rstrip().endswith("nothing was generated"), err
    assert not out.exists()
    assert db.read_sync(lambda conn: conn.execute("SELECT COUNT(*) FROM coupon_codes").fetchone()[0]) == 0
    assert cvm_cli.generate(db, DEFS, PRIVACY, "xmas", 3, out, "c4", NOW) == 0


def test_import_offers_stopped_by_a_locked_database_keeps_the_offers_before(db, tmp_path, capsys, monkeypatch):
    source = two_offers(tmp_path)
    write_sync = db.write_sync

    def locked_from_the_second_offer(fn, *args, **kwargs):
        if db.read_sync(lambda conn: offers.offers_for(conn, 1, date(2026, 12, 5))):
            raise StorageBusy("waited 2.0s for it")
        return write_sync(fn, *args, **kwargs)
    monkeypatch.setattr(db, "write_sync", locked_from_the_second_offer)
    with pytest.raises(cvm_cli.Stopped) as stopped:
        cvm_cli.import_offers(db, DEFS, PRIVACY, source, NOW)
    assert stopped.value.done == ("offer o2 (line 3) and those after it were not assigned; run it again: an offer "
                                  "assigned already is not assigned twice")
    assert capsys.readouterr().out == "offers: 1 assigned, 0 already assigned the same, 0 refused\n"


def test_import_offers_names_the_card_to_use_for_a_replaced_one(db, tmp_path, capsys):
    def replace_c3(conn):
        member_care.retire_card(conn, PRIVACY.card("c3"), 3, "replaced", "0033", "2026-11-20T10:00:00.000000Z")
        member_care.add_card(conn, PRIVACY.card("c3-new"), "0033", 3, "2026-11-20T10:00:00.000000Z")
    db.write_sync(replace_c3)
    source = tmp_path / "offers.csv"
    source.write_text("offer_id,rule,card,from,to,points\n"
                      "o2,comeback,c2,2026-12-01,2026-12-31,\n"
                      "o2,comeback,c3,2026-12-01,2026-12-31,\n")
    assert cvm_cli.import_offers(db, DEFS, PRIVACY, source, NOW) == 1
    err = capsys.readouterr().err
    assert f"{source}:2: offer o2: 1 of the cards have no member (0 not enrolled, 1 taken out of use" in err
    assert "(line 3: card c3 was replaced on 2026-11-20 by the card ending 0033: use that card)" in err
    assert db.read_sync(lambda conn: offers.offers_for(conn, 2, date(2026, 12, 5))) == {}


def test_import_offers_assigns_each_offer_whole(db, tmp_path, capsys):
    source = tmp_path / "offers.csv"
    source.write_text("offer_id,rule,card,from,to,points\n"
                      "o1,comeback,c1,2026-12-01,2026-12-31,300\n"
                      "o1,comeback,c2,2026-12-01,2026-12-31,300\n"
                      "o2,comeback,c3,2026-12-01,2026-12-31,\n"
                      "o2,comeback,nobody,2026-12-01,2026-12-31,\n"
                      "o3,base,c4,2026-12-01,2026-12-31,\n")
    assert cvm_cli.import_offers(db, DEFS, PRIVACY, source, NOW) == 1
    out = capsys.readouterr()
    assert "offers: 1 assigned, 0 already assigned the same, 2 refused" in out.out
    assert f"{source}:4: offer o2: 1 of the cards are not enrolled; nothing was changed (line 5)" in out.err
    assert f"{source}:6: offer o3: rule is base, a rule that is not personal (it applies without an offer)" in out.err
    got = db.read_sync(lambda conn: [offers.offers_for(conn, m, date(2026, 12, 5)) for m in range(1, 5)])
    assert got == [{"comeback": 300}, {"comeback": 300}, {}, {}]
    # Each member given an offer has its offer.assigned; the refused offers wrote none.
    assigned = [(e["member_id"], e["data"]) for e in db.read_sync(lambda conn: events.page(conn, 0, 100))]
    assert assigned == [(m, {"offer_id": "o1", "rule": "comeback", "from": "2026-12-01", "to": "2026-12-31",
                             "points": 300}) for m in ("m_1", "m_2")]
    # Run again: the same offer is not assigned twice.
    assert cvm_cli.import_offers(db, DEFS, PRIVACY, source, NOW) == 1
    assert "offers: 0 assigned, 1 already assigned the same, 2 refused" in capsys.readouterr().out
    assert len(db.read_sync(lambda conn: events.page(conn, 0, 100))) == 2


def test_import_offers_says_which_cell_is_wrong_in_words_a_manager_reads(db, tmp_path, capsys):
    source = tmp_path / "offers.csv"
    source.write_text("offer_id,rule,card,from,to,points\n"
                      "o1,comeback,c1,01.12.2026,2026-12-31,\n"
                      "o2,comeback,c2,2026-12-01,2026-12-31,1.5\n"
                      "o3,comeback,c3\n"
                      "o4,comeback,,2026-12-01,2026-12-31,\n"
                      "o5,comeback,c4,2026-12-01,2026-12-31, 50\n")
    assert cvm_cli.import_offers(db, DEFS, PRIVACY, source, NOW) == 1
    out = capsys.readouterr()
    assert out.err.splitlines() == [
        f"{source}:2: offer o1: from must be a date like 2026-11-24",
        f"{source}:3: offer o2: points must be a whole number",
        f"{source}:4: offer o3: from must be a date like 2026-11-24; to must be a date like 2026-11-24",
        f"{source}:5: offer o4: card on line 5 must be 1 to 64 characters"]
    assert "offers: 1 assigned, 0 already assigned the same, 4 refused" in out.out
    got = db.read_sync(lambda conn: [offers.offers_for(conn, m, date(2026, 12, 5)) for m in range(1, 5)])
    assert got == [{}, {}, {}, {"comeback": 50}]


def test_import_offers_from_a_file_it_cannot_read_is_one_line(db, tmp_path, capsys):
    missing, latin1 = tmp_path / "missing.csv", tmp_path / "latin1.csv"
    latin1.write_bytes("offer_id,rule,card,from,to,points\no1,comeback,c1,2026-12-01,2026-12-31,caf\xe9\n"
                       .encode("latin-1"))
    for source in (missing, tmp_path, latin1):
        assert cvm_cli.import_offers(db, DEFS, PRIVACY, source, NOW) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"import offers: cannot read {missing}: No such file or directory; nothing was assigned"
    assert err[1] == f"import offers: cannot read {tmp_path}: Is a directory; nothing was assigned"
    assert err[2].startswith(f"import offers: {latin1} is not UTF-8 CSV (") and len(err) == 3
    assert db.read_sync(lambda conn: offers.offers_for(conn, 1, date(2026, 12, 5))) == {}


def test_import_offers_stopped_by_ctrl_c_finishes_the_offer_in_flight(db, tmp_path, capsys, monkeypatch):
    source = two_offers(tmp_path)
    assign = offers.assign

    def ctrl_c_during_the_first_offer(conn, *args):
        os.kill(os.getpid(), signal.SIGINT)
        return assign(conn, *args)
    monkeypatch.setattr(offers, "assign", ctrl_c_during_the_first_offer)
    assert cvm_cli.import_offers(db, DEFS, PRIVACY, source, NOW) == 130
    out = capsys.readouterr()
    assert out.out == "offers: 1 assigned, 0 already assigned the same, 0 refused\n"
    assert out.err == ("import offers: interrupted (Ctrl-C): offer o2 (line 3) and those after it were not assigned; "
                       "run it again: an offer assigned already is not assigned twice\n")
    got = db.read_sync(lambda conn: [offers.offers_for(conn, m, date(2026, 12, 5)) for m in (1, 2)])
    assert got == [{"comeback": None}, {}]


def test_report_campaign_prints_text_json_csv_and_a_chart(db, tmp_path, capsys):
    def receipts(conn):
        conn.executemany("INSERT INTO receipts (store_id, register_id, receipt_id, body_sha256, member_id, ts, "
                         "local_date, total, rules_version, status, body, result, created_at) VALUES "
                         "('S001', 'K01', ?, ?, ?, ?, ?, ?, 'v', 'confirmed', ?, ?, ?)",
                         [(f"r{m}-{d}", b"\0", m, f"2026-11-{d:02d}T10:00:00Z", f"2026-11-{d:02d}", 1000 * m,
                           msgspec.json.encode({"lines": []}), b"{}", f"2026-11-{d:02d}")
                          for m in range(1, 5) for d in (2, 9)])
    db.write_sync(receipts)
    program = types.SimpleNamespace(id="market", timezone=ZoneInfo("Europe/Kyiv"), point_value=100, currency="UAH")

    def run(**flags):
        args = types.SimpleNamespace(rule="promo", first=None, last=None, json=False, csv=False, plot=None)
        vars(args).update(flags)
        return cvm_cli.campaign(db, DEFS, program, args), capsys.readouterr()
    status, out = run(json=True)
    got = msgspec.json.decode(out.out)
    assert status == 0 and got["treated"]["members"] + got["control"]["members"] == 4
    assert got["treated"]["receipts"] + got["control"]["receipts"] == 8
    status, out = run(csv=True)
    rows = list(csv.reader(io.StringIO(out.out)))
    assert rows[0] == ["group", "members", "buyers", "receipts", "spend", "scope_spend", "points"]
    assert [int(x) for x in rows[1][1:]] == [got["treated"][k] for k in rows[0][1:]]
    status, out = run()
    assert status == 0 and "campaign promo, 2026-11-01 to 2026-11-14" in out.out and "uplift" in out.out
    assert run(rule="base")[0] == 2
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (requirements-plot.txt)")
    chart = tmp_path / "effect.png"
    status, _ = run(plot=chart)
    assert status == 0 and chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_campaign_without_matplotlib_refuses_the_plot_before_reporting(db, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # as on a serving machine: not installed
    program = types.SimpleNamespace(id="market", timezone=ZoneInfo("Europe/Kyiv"), point_value=100, currency="UAH")
    chart = tmp_path / "effect.png"
    args = types.SimpleNamespace(rule="promo", first=None, last=None, json=False, csv=False, plot=chart)
    assert cvm_cli.campaign(db, DEFS, program, args) == 2
    out = capsys.readouterr()
    assert out.out == "" and not chart.exists()
    assert out.err == ("report campaign: --plot needs matplotlib: .venv/bin/pip install -r requirements-plot.txt; "
                       "nothing was reported\n")


def test_report_campaign_says_which_rule_has_no_control_group(db, capsys):
    program = types.SimpleNamespace(id="market", timezone=ZoneInfo("Europe/Kyiv"), point_value=100, currency="UAH")

    def run(rule):
        args = types.SimpleNamespace(rule=rule, first=None, last=None, json=False, csv=False, plot=None)
        return cvm_cli.campaign(db, DEFS, program, args), capsys.readouterr().err
    assert run("base") == (2, "report campaign: rule base has no holdout: it has no control group to compare with\n")
    assert run("nope") == (2, "report campaign: the program has no rule nope, and no stored version of it had one\n")
    assert run("prom") == (2, "report campaign: the program has no rule prom, and no stored version of it had one, "
                              "did you mean 'promo'?\n")


def test_offers_and_codes_with_dates_already_past_are_taken_with_a_warning(db, tmp_path, capsys):
    """A receipt sent late is judged at its ts: the dates are taken, and what is odd is said."""
    defs = cvm.Definitions(coupons={"autumn": coupons.Campaign("autumn", 1, None, date(2026, 11, 1))},
                           personal={"comeback": True},
                           rules={"comeback": CampaignRule("comeback", None, date(2026, 11, 1), date(2026, 11, 30))})
    source = tmp_path / "offers.csv"
    source.write_text("offer_id,rule,card,from,to,points\n"
                      "o1,comeback,c1,2026-10-01,2026-10-31,\n"
                      "o2,comeback,c2,2026-11-24,2026-11-30,\n")
    kyiv = ZoneInfo("Europe/Kyiv")
    assert cvm_cli.import_offers(db, defs, PRIVACY, source, NOW, tz=kyiv) == 0
    out = capsys.readouterr()
    assert out.out == "offers: 2 assigned, 0 already assigned the same, 0 refused\n"
    assert out.err == (
        f"{source}:2: offer o1: warning: the offer ends 2026-10-31, before today (2026-11-24): it applies only to "
        "receipts dated up to then\n"
        f"{source}:2: offer o1: warning: the rule's period starts 2026-11-01, after the offer ends (2026-10-31): "
        "the offer never applies\n")
    assert cvm_cli.generate(db, defs, PRIVACY, "autumn", 2, tmp_path / "codes.csv", None, NOW, tz=kyiv) == 0
    out = capsys.readouterr()
    assert out.out == f"2 codes of autumn written to {tmp_path / 'codes.csv'}\n"
    assert out.err == ("coupons generate: warning: the campaign's codes are valid until 2026-11-01, before today "
                       "(2026-11-24): they apply only to receipts dated up to then\n")


def test_report_campaign_of_a_rule_no_longer_in_the_program_says_whose_definition_it_is(db, tmp_path, capsys):
    """The rule was in the program stored on 2026-11-01 and taken out on 2026-12-05: the folder's
    program lacks it, the stored version has it."""
    from conftest import MARKET
    from rules.loader import load_files, read_directory
    from storage import program_versions
    files = {name: raw.decode() for name, raw in read_directory(MARKET)[0].items()}
    promos = files["campaigns/promos.yaml"]
    with_holdout = {**files, "campaigns/promos.yaml": promos.replace(
        "    scope: {categories: [dairy]}\n", "    scope: {categories: [dairy]}\n    holdout: 0.5\n", 1)}
    without = {**files, "campaigns/promos.yaml": promos[:promos.index("  - id: dairy-x2")] +
               promos[promos.index("  - id: big-basket"):]}
    first, now = load_files(with_holdout), load_files(without)

    def history(conn):
        for program, text, at in ((first, with_holdout, "2026-11-01T07:00:00.000000Z"),
                                  (now, without, "2026-12-05T08:00:00.000000Z")):
            program_versions.record(conn, version=program.version, program_id="market", files=text, at=at,
                                    source="api", deployed_by="manager", reason="test")
        # m_1 and m_4 are treated, m_2 and m_3 held out (dairy-x2 at 0.5).
        conn.executemany("INSERT INTO receipts (store_id, register_id, receipt_id, body_sha256, member_id, ts, "
                         "local_date, total, rules_version, status, body, result, created_at) VALUES "
                         "('S001', 'K01', ?, ?, ?, '2026-11-22T10:00:00Z', '2026-11-22', ?, 'v', 'confirmed', ?, "
                         "'{}', '2026-11-22')",
                         [(f"r{m}", b"\0", m, total, msgspec.json.encode(
                             {"lines": [{"line_no": 1, "sku": "s", "category": "dairy", "amount": total}]}))
                          for m, total in ((1, 10000), (2, 4000))])
    db.write_sync(history)

    def run(**flags):
        args = types.SimpleNamespace(rule="dairy-x2", first=None, last=None, json=False, csv=False, plot=None)
        vars(args).update(flags)
        return cvm_cli.campaign(db, cvm.definitions_of(now), now, args), capsys.readouterr()
    warning = (f"rule dairy-x2 is no longer in the live program ({now.version}): the report uses its definition "
               f"in program version {first.version}, which had it in force from 2026-11-01 to 2026-12-05")
    status, out = run(json=True)
    got = msgspec.json.decode(out.out)
    assert status == 0 and (got["from"], got["to"]) == ("2026-11-20", "2026-11-30")
    assert (got["rules_version"], got["live"], got["warnings"]) == (first.version, False, [warning])
    assert got["treated"]["spend"] == 10000 and got["control"]["spend"] == 4000
    assert got["uplift"]["spend_per_member"] == 3000       # 10,000 / 2 - 4,000 / 2
    status, out = run()
    assert status == 0 and out.out.splitlines()[-1] == f"warning: {warning}"
    status, out = run(csv=True)
    assert status == 0 and out.err == f"report campaign: warning: {warning}\n"
    assert list(csv.reader(io.StringIO(out.out)))[1][:5] == ["treated", "2", "1", "1", "10000"]
    status, out = run(rule="dairy-x")
    assert (status, out.err) == (2, "report campaign: the program has no rule dairy-x, and no stored version of it "
                                    "had one, did you mean 'dairy-x2'?\n")
    status, out = run(first="2026-11-20", last="2026-11-10")
    assert (status, out.err) == (2, "report campaign: to must not be before from\n")
    for program in (first, now):
        program.close()


@pytest.mark.skipif(not POSTGRESQL, reason="members are locked by row only on PostgreSQL; SQLite's one writer "
                                           "reads the cards and writes in one go")
def test_import_offers_refuses_a_card_merged_after_its_look_up_rather_than_leave_the_offer_behind(
        db, tmp_path, capsys, monkeypatch):
    """c3 looked up just before a merge of its member into m_4 committed: the offer stayed on
    the member merged away, which no card reaches. Refused as the card now is."""
    def merge_3_into_4(conn):
        member_care.retire_card(conn, PRIVACY.card("c3"), 3, "merged", "m_4", "2026-11-20T10:00:00.000000Z")
        member_care.mark_merged(conn, 3, 4, "2026-11-20T10:00:00.000000Z")
    db.write_sync(merge_3_into_4)
    real, looked_up = cvm.member_id_of_card, []

    def before_the_merge(conn, digest):
        looked_up.append(digest)
        return 3 if len(looked_up) == 1 else real(conn, digest)

    monkeypatch.setattr(cvm, "member_id_of_card", before_the_merge)
    source = tmp_path / "offers.csv"
    source.write_text("offer_id,rule,card,from,to,points\no3,comeback,c3,2026-12-01,2026-12-31,\n")
    assert cvm_cli.import_offers(db, DEFS, PRIVACY, source, NOW) == 1
    assert "card c3 belonged to m_3, merged into m_4" in capsys.readouterr().err
    assert db.read_sync(lambda conn: offers.offers_for(conn, 3, date(2026, 12, 5))) == {}
