"""The ledger as finance sees it: double entry, the hash chain, audit verify, lifecycle
jobs, partner settlement, debts from returns, exports."""
import csv
import io
import json
import shutil
from datetime import datetime

import msgspec
import pytest
import yaml

from conftest import MARKET, POSTGRESQL, connect, database_section, line, receipt, tamper, test_config
from storage.audit import verify
from storage.sql import integrity_errors
from server.cli import main as cli
from server.keys import CLOCK, DATABASE, PROGRAMS
from server.jobs import run_all

NOW = "2026-11-24T12:00:05+02:00"


def write_config(tmp_path, program_dir=MARKET):
    cfg = {"database": database_section(tmp_path / "loyalty.db"), "rules": {"dir": str(program_dir), "watch": False},
           "clock": {"start": NOW}}
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


async def activity(api):
    await api.post("/v1/members", {"card": "1"})
    await api.post("/v1/admin/adjustments", {"card": "1", "points": 500, "reason": "r", "adjustment_id": "a1"})
    await api.post("/v1/receipts", receipt("R-1", [line(1, "dairy", 50000), line(2, "grocery", 60000)],
                                           card="1", redeem=200), as_="register")
    await api.post("/v1/returns", {"return_id": "X1", "store_id": "S001", "register_id": "K01",
                                   "receipt": {"store_id": "S001", "register_id": "K01", "receipt_id": "R-1"},
                                   "lines": [{"line_no": 2, "qty": 1}]}, as_="register")


async def test_audit_passes_then_fails_on_a_hand_edit(make_api, tmp_path, capsys):
    api = await make_api(now=NOW)
    await activity(api)
    config = write_config(tmp_path)
    assert cli(["audit", "verify", "--config", config]) == 0
    out = capsys.readouterr().out
    assert "ok:" in out and "outstanding liability" in out

    conn = connect(tmp_path / "loyalty.db")
    with pytest.raises(integrity_errors()):
        conn.execute("UPDATE postings SET points = points + 1 WHERE id = 3")
    tamper(conn, "postings", "UPDATE postings SET points = points + 1 WHERE id = 3")
    conn.close()
    assert cli(["audit", "verify", "--config", config]) == 1
    assert "posting 3" in capsys.readouterr().out


async def test_audit_checks_the_admin_audit_log_chain_too(make_api, tmp_path, capsys):
    """The README promises the admin actions' log shows a row changed by hand: the command
    an operator runs says so, naming the row."""
    api = await make_api(now=NOW)
    await activity(api)                                    # the adjustment is an admin action
    await api.post("/v1/admin/rules/reload")
    config = write_config(tmp_path)
    assert cli(["audit", "verify", "--config", config]) == 0
    assert "admin audit log: 2 rows chained" in capsys.readouterr().out
    conn = connect(tmp_path / "loyalty.db")
    tamper(conn, "audit_log", "UPDATE audit_log SET key_id = 'intruder' WHERE id = 2")
    conn.close()
    assert cli(["audit", "verify", "--config", config]) == 1
    assert "FAIL admin audit log: row 2: hash does not match the row" in capsys.readouterr().out


async def test_audit_flags_rule_totals_that_differ_from_postings(make_api, tmp_path, capsys):
    api = await make_api(now=NOW)
    await activity(api)                                    # accrual by rule, then a return reverses some
    config = write_config(tmp_path)
    assert cli(["audit", "verify", "--config", config]) == 0
    capsys.readouterr()

    conn = connect(tmp_path / "loyalty.db")
    rule, kept = conn.execute("SELECT rule_id, points FROM rule_totals ORDER BY rule_id LIMIT 1").fetchone()
    conn.execute("UPDATE rule_totals SET points = points + 7 WHERE rule_id = ?", (rule,))
    conn.commit()
    conn.close()
    assert cli(["audit", "verify", "--config", config]) == 1
    out = capsys.readouterr().out
    assert f"FAIL rule {rule}: rule_totals says it issued {kept + 7} points" in out
    assert f"sum to {kept}" in out


RETURNED = ("S001", "K01", "X1")


async def three_returns(api) -> dict[tuple[str, str, str], dict]:
    """Three returns whose identities joined by slashes sort otherwise than field by field
    (S001/K01-B/X1 before S001/K01/X0), each refunding points paid with, beside a cancelled
    receipt's reversal and refund: their answers by identity."""
    await api.post("/v1/members", {"card": "1"})
    await api.post("/v1/admin/adjustments", {"card": "1", "points": 500, "reason": "r", "adjustment_id": "a1"})
    for receipt_id in ("R-1", "R-2", "R-3"):
        lines = [line(1, "dairy", 50000), line(2, "grocery", 60000)]
        status, _ = await api.post("/v1/receipts", receipt(receipt_id, lines, card="1", redeem=100), as_="register")
        assert status == 201
    assert (await api.post("/v1/receipts/S001/K01/R-3/cancel", as_="register"))[0] == 200
    answers = {}
    for (store, register, return_id), (receipt_id, line_no) in {
            ("S001", "K01", "X1"): ("R-1", 1), ("S001", "K01-B", "X1"): ("R-1", 2),
            ("S001", "K01", "X0"): ("R-2", 2)}.items():
        status, answers[store, register, return_id] = await api.post("/v1/returns", {
            "return_id": return_id, "store_id": store, "register_id": register,
            "receipt": {"store_id": "S001", "register_id": "K01", "receipt_id": receipt_id},
            "lines": [{"line_no": line_no, "qty": 1}]}, as_="register")
        assert status == 201 and answers[store, register, return_id]["refunded"]["points"] > 0
    return answers


def audited(path) -> tuple[list[str], list[str]]:
    """audit verify's problems and the statements it ran."""
    conn, statements = connect(path), []
    if POSTGRESQL:
        execute = conn.execute
        conn.execute = lambda sql, params=(): (statements.append(sql), execute(sql, params))[1]
    else:
        conn.set_trace_callback(statements.append)
    try:
        return verify(conn).problems, statements
    finally:
        conn.close()


async def test_audit_names_a_return_whose_postings_do_not_match_its_answer(make_api, tmp_path):
    api = await make_api(now=NOW)
    answers = await three_returns(api)
    assert audited(tmp_path / "loyalty.db")[0] == []

    answer = answers[RETURNED]
    conn = connect(tmp_path / "loyalty.db")
    (stored,), = conn.execute("SELECT result FROM returns WHERE store_id = ? AND register_id = ? AND return_id = ?",
                              RETURNED).fetchall()
    claimed = msgspec.json.decode(bytes(stored))
    claimed["refunded"]["points"] += 1
    tamper(conn, "returns", "UPDATE returns SET result = ? WHERE store_id = ? AND register_id = ? AND return_id = ?",
           (msgspec.json.encode(claimed), *RETURNED))
    conn.close()
    reversed_, refunded = answer["reversed"]["points"], answer["refunded"]["points"]
    assert audited(tmp_path / "loyalty.db")[0] == [
        f"return S001/K01/X1: postings reverse {reversed_} and refund {refunded}, the return answered "
        f"{reversed_} and {refunded + 1}"]


async def test_audit_reads_the_returns_postings_in_one_pass(make_api, tmp_path):
    """As many statements for three returns as for one: no scan of postings per return, as
    no index finds postings by their ref."""
    api = await make_api(now=NOW)
    await three_returns(api)
    problems, statements = audited(tmp_path / "loyalty.db")
    assert problems == []
    conn = connect(tmp_path / "loyalty.db")
    tamper(conn, "returns", "UPDATE returns SET member_id = NULL WHERE return_id = 'X1'")
    conn.close()
    problems, fewer_returns = audited(tmp_path / "loyalty.db")
    assert problems == [] and len(fewer_returns) == len(statements)


async def test_accounts_sum_to_zero_and_liability_is_member_balances(make_api, tmp_path):
    api = await make_api(now=NOW)
    await activity(api)
    await api.post("/v1/members", {"card": "2"})
    conn = connect(tmp_path / "loyalty.db")
    liability = conn.execute("SELECT SUM(points) FROM postings").fetchone()[0]
    counters = conn.execute("SELECT SUM(-points) FROM postings").fetchone()[0]
    assert liability + counters == 0
    accounts = dict(conn.execute("SELECT counter_account, -SUM(points) FROM postings GROUP BY counter_account"))
    assert set(accounts) <= {"issue:program", "redemption:program", "adjustment"}
    total = 0
    for card in ("1", "2"):
        _, m = await api.get(f"/v1/members/{card}")
        total += m["balance"]["available"] + m["balance"]["pending"] + m["balance"]["held"]
    assert total == liability


async def test_expiry_job_posts_what_at_answers_predicted(make_api, tmp_path):
    api = await make_api(now=NOW)
    await api.post("/v1/members", {"card": "1"})          # 100 welcome points, expire 2027-11-24
    _, before = await api.get("/v1/members/1?at=2027-11-23")
    _, after = await api.get("/v1/members/1?at=2027-11-24")
    assert before["balance"]["available"] == 100 and after["balance"]["available"] == 0
    app = api.client.app
    app[CLOCK].set(datetime.fromisoformat("2027-11-24T00:30:00+02:00"))
    done = await run_all(app[DATABASE], app[PROGRAMS].current, app[CLOCK].now())
    assert done["expired_lots"] == 1
    again = await run_all(app[DATABASE], app[PROGRAMS].current, app[CLOCK].now())
    assert again["expired_lots"] == 0                       # idempotent
    _, st = await api.get("/v1/members/1/statement")
    assert st["postings"][0]["kind"] == "expiry" and st["postings"][0]["points"] == -100
    assert st["postings"][0]["counter_account"] == "expiry"
    _, now_view = await api.get("/v1/members/1")
    assert now_view["balance"]["available"] == 0
    _, past = await api.get("/v1/members/1?at=2027-11-23")
    assert past["balance"]["available"] == 100


async def test_expired_holds_are_released(make_api):
    api = await make_api(now=NOW)
    await api.post("/v1/members", {"card": "1"})
    body = receipt("H-1", [line(1, "grocery", 100000)], card="1", redeem=50)
    status, r = await api.post("/v1/receipts/calculate", body, as_="register")
    assert status == 200 and r["hold"]["points"] == 50
    app = api.client.app
    app[CLOCK].set(datetime.fromisoformat("2026-11-24T12:30:00+02:00"))
    done = await run_all(app[DATABASE], app[PROGRAMS].current, app[CLOCK].now())
    assert done["released_holds"] == 1
    _, m = await api.get("/v1/members/1")
    assert m["balance"] == {"available": 100, "pending": 0, "held": 0}


async def test_birthday_event_once_a_year(make_api, tmp_path):
    program = tmp_path / "program"
    shutil.copytree(MARKET, program)
    (program / "events.yaml").write_text("events:\n  - {id: bday, on: birthday, reward: {points: 70}, "
                                         "expires_in_days: 7}\n")
    api = await make_api(now=NOW, program_dir=program)
    await api.post("/v1/members", {"card": "1", "birthday": "1990-11-25"})
    app = api.client.app
    app[CLOCK].set(datetime.fromisoformat("2026-11-25T08:00:00+02:00"))
    for _ in range(2):
        await run_all(app[DATABASE], app[PROGRAMS].current, app[CLOCK].now())
    _, m = await api.get("/v1/members/1")
    assert m["balance"]["available"] == 170
    assert {"date": "2026-12-02", "points": 70} in m["expiring"]



async def test_a_member_merged_away_gets_no_birthday_gift(make_api, tmp_path):
    """Its cards are out of use: points given to it would reach nobody. The member that stays
    celebrates its own birthday, if it has one."""
    program = tmp_path / "program"
    shutil.copytree(MARKET, program)
    (program / "events.yaml").write_text("events:\n  - {id: bday, on: birthday, reward: {points: 70}}\n")
    api = await make_api(now=NOW, program_dir=program)
    _, away = await api.post("/v1/members", {"card": "1", "birthday": "1990-11-25"})
    _, keep = await api.post("/v1/members", {"card": "2"})
    status, done = await api.post("/v1/admin/members/merge", {
        "merge_id": "MG-B", "from_member_id": away["member_id"], "into_member_id": keep["member_id"],
        "reason": "one customer, two cards"})
    assert status == 201, done
    _, before = await api.get("/v1/members/2")
    app = api.client.app
    app[CLOCK].set(datetime.fromisoformat("2026-11-25T08:00:00+02:00"))
    done = await run_all(app[DATABASE], app[PROGRAMS].current, app[CLOCK].now())
    assert done["birthday_events"] == 0
    _, kept = await api.get("/v1/members/2")
    assert kept["balance"] == before["balance"]
    report = await app[DATABASE].read(verify)
    assert report.ok and report.liability == before["balance"]["available"], report.problems

async def test_partner_settlement(make_api, tmp_path, capsys):
    api = await make_api(now=NOW)
    await api.post("/v1/members", {"card": "1"})
    await api.post("/v1/admin/adjustments", {"card": "1", "points": 1000, "reason": "r", "adjustment_id": "a"})
    fuel = receipt("F-1", [line(1, "fuel", 90000, qty="40.5")], card="1", store="F001", redeem=100)
    status, r = await api.post("/v1/receipts", fuel, as_="fuel")
    assert status == 201, r
    issued = r["accrued"]["points"]
    config = write_config(tmp_path)
    out = tmp_path / "reports"
    assert cli(["partners", "settle", "--period", "2026-11", "--config", config, "--out", str(out)]) == 0
    rows = json.loads((out / "settlement-2026-11.json").read_text())
    assert rows == [{"partner": "fuelco", "name": "Fuel Co", "period": "2026-11", "currency": "UAH",
                     "currency_decimals": 2, "funding_share": "1.0", "issued_points": issued,
                     "funded_points": str(issued), "funded_minor_units": issued * 100, "redeemed_points": 100,
                     "owed_minor_units": 10000, "net_to_partner_minor_units": 10000 - issued * 100}]
    with open(out / "settlement-2026-11.csv") as f:
        assert next(csv.DictReader(f))["issued_points"] == str(issued)
    assert cli(["partners", "settle", "--period", "2026-10", "--config", config, "--out", str(out)]) == 0
    assert json.loads((out / "settlement-2026-10.json").read_text())[0]["issued_points"] == 0


async def test_return_after_spending_leaves_a_debt_that_new_points_repay(make_api, tmp_path):
    program = tmp_path / "program"
    shutil.copytree(MARKET, program)
    settings = program / "program.yaml"
    settings.write_text(settings.read_text().replace("activation_delay_days: 14", "activation_delay_days: 0"))
    api = await make_api(now=NOW, program_dir=program)
    await api.post("/v1/members", {"card": "1"})                       # 100 welcome
    _, r = await api.post("/v1/receipts", receipt("D-1", [line(1, "grocery", 500000)], card="1"), as_="register")
    assert r["accrued"]["points"] == 150                                 # base 100 + big basket 50
    assert r["balance"]["available"] == 250
    _, r = await api.post("/v1/receipts", receipt("D-2", [line(1, "grocery", 100000)], card="1",
                                                  ts="2026-11-24T12:00:01+02:00", redeem=250), as_="register")
    # 5,000.00 spent made the member silver: 3% of the 750.00 paid in money
    assert r["redeemed"]["points"] == 250 and r["accrued"]["points"] == 22
    status, ret = await api.post("/v1/returns", {"return_id": "DR", "store_id": "S001", "register_id": "K01",
                                                 "receipt": {"store_id": "S001", "register_id": "K01",
                                                             "receipt_id": "D-1"},
                                                 "lines": [{"line_no": 1, "qty": 1}]}, as_="register")
    assert status == 201 and ret["reversed"]["points"] == 150
    assert ret["balance"]["available"] == 22 - 150                      # the 150 were already spent
    _, r3 = await api.post("/v1/receipts", receipt("D-3", [line(1, "grocery", 600000)], card="1",
                                                   ts="2026-11-24T12:00:02+02:00"), as_="register")
    assert r3["accrued"]["points"] == 120                               # back to base tier: 2%
    assert r3["balance"]["available"] == -128 + 120                     # new points pay the debt first
    _, m = await api.get("/v1/members/1")
    assert m["balance"]["available"] == -8
    _, st = await api.get("/v1/members/1/statement")
    assert any(p["kind"] == "repayment" for p in st["postings"])
    config = write_config(tmp_path, program)
    assert cli(["audit", "verify", "--config", config]) == 0


async def test_export_ledger_csv_and_jsonl(make_api, tmp_path, capsys):
    api = await make_api(now=NOW)
    await activity(api)
    config = write_config(tmp_path)
    target = tmp_path / "ledger.csv"
    assert cli(["export", "ledger", "--format", "csv", "--config", config, "--out", str(target)]) == 0
    rows = list(csv.DictReader(io.StringIO(target.read_text())))
    conn = connect(tmp_path / "loyalty.db")
    assert len(rows) == conn.execute("SELECT COUNT(*) FROM postings").fetchone()[0]
    assert rows[0]["hash"] and rows[0]["counter_account"]
    target = tmp_path / "ledger.jsonl"
    assert cli(["export", "ledger", "--format", "jsonl", "--config", config, "--out", str(target)]) == 0
    lines = [json.loads(x) for x in target.read_text().splitlines()]
    assert sum(x["points"] for x in lines) == conn.execute("SELECT SUM(points) FROM postings").fetchone()[0]
    capsys.readouterr()
    nowhere = tmp_path / "no-such-folder" / "ledger.csv"
    assert cli(["export", "ledger", "--config", config, "--out", str(nowhere)]) == 2
    assert capsys.readouterr().err == \
        f"export ledger: cannot write {nowhere}: No such file or directory; nothing was exported\n"



def test_an_export_stopped_by_ctrl_c_leaves_no_file_that_looks_whole(tmp_path, capsys, monkeypatch):
    from server import reports
    config = write_config(tmp_path)
    assert cli(["jobs", "run", "--config", config]) == 0        # the database, with no postings

    def ctrl_c_half_way(conn, stream, fmt, bar):
        stream.write("id,member_id,points\n1,m_1,100\n")
        raise KeyboardInterrupt
    monkeypatch.setattr(reports, "export_ledger", ctrl_c_half_way)
    capsys.readouterr()
    target = tmp_path / "ledger.csv"
    assert cli(["export", "ledger", "--config", config, "--out", str(target)]) == 130
    assert capsys.readouterr().err == (f"export ledger: interrupted (Ctrl-C): {target} was removed, as it held "
                                       "only part of it; nothing was exported\n")
    assert not target.exists()


def test_jobs_run_from_the_command_line(tmp_path, capsys):
    config = write_config(tmp_path)
    assert cli(["jobs", "run", "--config", config, "--now", "2027-12-01T00:00:00+02:00", "--force"]) == 0
    assert "expired_lots: 0" in capsys.readouterr().out


async def test_refund_to_an_expired_lot_comes_back_expired(make_api, tmp_path):
    api = await make_api(now=NOW)
    await api.post("/v1/members", {"card": "1"})          # 100 welcome points, expire 2027-11-24
    body = receipt("E-1", [line(1, "grocery", 100000)], card="1", redeem=100)
    status, r = await api.post("/v1/receipts", body, as_="register")
    assert status == 201 and r["redeemed"]["points"] == 100
    app = api.client.app
    app[CLOCK].set(datetime.fromisoformat("2027-11-25T10:00:00+02:00"))
    await run_all(app[DATABASE], app[PROGRAMS].current, app[CLOCK].now())
    _, before = await api.get("/v1/members/1")
    ret = {"return_id": "late", "store_id": "S001", "register_id": "K01",
           "receipt": {"store_id": "S001", "register_id": "K01", "receipt_id": "E-1"},
           "lines": [{"line_no": 1, "qty": 1}]}
    status, r = await api.post("/v1/returns", ret, as_="register")
    assert status == 201 and r["refunded"]["points"] == 100
    _, after = await api.get("/v1/members/1")
    assert after["balance"] == before["balance"]          # the welcome points had expired meanwhile
    _, st = await api.get("/v1/members/1/statement")
    kinds = [p["kind"] for p in st["postings"][:4]]
    assert "refund" in kinds and "expiry" in kinds
    assert cli(["audit", "verify", "--config", write_config(tmp_path)]) == 0
