"""`loyalty import members`: members of a previous program with their opening balances,
exact in the ledger, idempotent, with every refused row reported by its line."""
from __future__ import annotations

import asyncio
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import yaml

from backend import POSTGRESQL
from conftest import KEYS, MARKET, TEST_HMAC_KEY, connect, database_section
from server.cli import main as cli
from test_crash_safety import Server

NOW = "2026-11-24T12:00:05+02:00"
HEADER = "card,phone,birthday,tags,opening_points,opening_expires_on,enrolled_on\n"


def write_config(tmp_path: Path) -> str:
    """The server's tests' HMAC key, so the app finds the cards the command imported."""
    cfg = {"database": database_section(tmp_path / "loyalty.db"), "rules": {"dir": str(MARKET), "watch": False},
           "clock": {"start": NOW}, "privacy": {"hmac_key": TEST_HMAC_KEY}}
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def write_csv(tmp_path: Path, rows: list[str], name: str = "members.csv") -> Path:
    path = tmp_path / name
    path.write_text(HEADER + "".join(r + "\n" for r in rows), encoding="utf-8")
    return path


def ledger_state(db: Path) -> tuple:
    """Everything an import writes, to compare a database before and after a rerun."""
    conn = connect(db)
    try:
        # postings' points first: the two backends order their columns differently
        return tuple(conn.execute(f"SELECT {columns} FROM {t} ORDER BY {order}").fetchall()
                     for t, columns, order in (("members", "*", "1"), ("cards", "*", "1"), ("lots", "*", "1"),
                                               ("postings", "points, *", "id")))
    finally:
        conn.close()


async def test_opening_balances_are_exact_expire_on_their_date_and_pass_audit(make_api, tmp_path, capsys):
    source = write_csv(tmp_path, [
        "7000000000001,+380 (50) 123-45-67,1990-05-01,vip;staff,1500,2027-06-30,2020-01-15",
        "7000000000002,,,,0,,",
        "7000000000003,,,,250,,2025-03-01",
    ])
    config = write_config(tmp_path)
    # A thread of its own: the command waits for its commits, which an event loop must not do.
    assert await asyncio.to_thread(cli, ["import", "members", "--csv", str(source), "--config", config]) == 0
    out = capsys.readouterr().out
    assert "3 members rows: 3 imported, 0 updated, 0 already there, 0 refused" in out

    api = await make_api(now=NOW)
    status, member = await api.get("/v1/members/7000000000001")
    assert status == 200
    assert member["balance"] == {"available": 1500, "pending": 0, "held": 0}
    assert member["expiring"] == [{"date": "2027-06-30", "points": 1500}]
    assert member["profile"] == {"phone_last4": "4567", "birthday": "1990-05-01", "tags": ["staff", "vip"]}
    assert member["enrolled_at"] == "2020-01-14T22:00:00.000000Z"        # the day's start in Kyiv
    _, before = await api.get("/v1/members/7000000000001?at=2027-06-29")
    _, on = await api.get("/v1/members/7000000000001?at=2027-06-30")
    assert before["balance"]["available"] == 1500 and on["balance"]["available"] == 0
    _, empty = await api.get("/v1/members/7000000000002")
    assert empty["balance"]["available"] == 0 and empty["expiring"] == []
    # No expiry date given: the program's expiry_days from the import's day, as an adjustment.
    _, default = await api.get("/v1/members/7000000000003")
    assert default["balance"]["available"] == 250
    assert default["expiring"][0]["date"] > "2026-11-24"

    status, statement = await api.get("/v1/members/7000000000001/statement")
    assert [(p["points"], p["counter_account"], p["running_balance"]) for p in statement["postings"]] == \
        [(1500, "opening", 1500)]
    # Spending the opening balance works like any other points.
    status, body = await api.post("/v1/admin/adjustments", {"card": "7000000000001", "points": -1000,
                                                            "reason": "test", "adjustment_id": "a1"})
    assert status == 201 and body["balance"]["available"] == 500

    assert cli(["audit", "verify", "--config", config]) == 0
    out = capsys.readouterr().out
    assert "opening: -1750" in out


def test_a_rerun_changes_nothing_and_finishes_a_stopped_run(tmp_path, capsys):
    rows = [f"70000000{i:05d},,,,{i},2027-12-31," for i in range(1, 301)]
    config = write_config(tmp_path)
    # A run that stopped after the first 120 rows (its batches were committed).
    assert cli(["import", "members", "--csv", str(write_csv(tmp_path, rows[:120], "first.csv")),
                "--config", config, "--batch-rows", "50"]) == 0
    source = write_csv(tmp_path, rows)
    assert cli(["import", "members", "--csv", str(source), "--config", config, "--batch-rows", "50"]) == 0
    assert "300 members rows: 180 imported, 0 updated, 120 already there, 0 refused" in capsys.readouterr().out
    done = ledger_state(tmp_path / "loyalty.db")
    assert len(done[0]) == 300 and len(done[3]) == 300
    assert sum(p[0] for p in done[3]) == sum(range(1, 301))

    assert cli(["import", "members", "--csv", str(source), "--config", config]) == 0
    assert "300 members rows: 0 imported, 0 updated, 300 already there, 0 refused" in capsys.readouterr().out
    assert ledger_state(tmp_path / "loyalty.db") == done
    assert cli(["audit", "verify", "--config", config]) == 0


def test_a_report_that_cannot_be_written_stops_the_run_before_any_row(tmp_path, capsys):
    source, config = write_csv(tmp_path, ["7000000000001,,,,100,2027-12-31,", "7000000000002,,,,x,,"]), \
        write_config(tmp_path)
    nowhere = tmp_path / "no-such-folder" / "refused.csv"
    for report, why in ((nowhere, f"is in {nowhere.parent}, which does not exist"), (tmp_path, "is a folder")):
        assert cli(["import", "members", "--csv", str(source), "--config", config, "--report", str(report)]) == 2
        assert capsys.readouterr().err == (f"import members: the report {report} {why} (--report); "
                                           "nothing was imported\n")
    assert not (tmp_path / "loyalty.db").exists() or ledger_state(tmp_path / "loyalty.db")[0] == []


def test_ctrl_c_stops_after_the_batch_in_flight_and_says_where(tmp_path, capsys, monkeypatch):
    from storage import imports
    insert_members = imports.insert_members

    def ctrl_c_during_the_first_batch(conn, batch, **kwargs):
        if not conn.execute("SELECT COUNT(*) FROM members").fetchone()[0]:
            os.kill(os.getpid(), signal.SIGINT)
        return insert_members(conn, batch, **kwargs)
    monkeypatch.setattr(imports, "insert_members", ctrl_c_during_the_first_batch)
    rows = [f"70000000{i:05d},,,,{i},2027-12-31," for i in range(1, 301)]
    source, config = write_csv(tmp_path, rows), write_config(tmp_path)
    assert cli(["import", "members", "--csv", str(source), "--config", config, "--batch-rows", "50"]) == 130
    out = capsys.readouterr()
    assert f"{source}: 50 members rows: 50 imported, 0 updated, 0 already there, 0 refused" in out.out
    assert out.err.splitlines()[-1] == (f"{source}:51: interrupted (Ctrl-C) after this line; the rows up to it "
                                        "were taken, run the same import again to finish it")
    assert len(ledger_state(tmp_path / "loyalty.db")[0]) == 50
    monkeypatch.undo()
    assert cli(["import", "members", "--csv", str(source), "--config", config, "--batch-rows", "50"]) == 0
    assert "300 members rows: 250 imported, 0 updated, 50 already there, 0 refused" in capsys.readouterr().out
    assert cli(["audit", "verify", "--config", config]) == 0


async def test_the_crms_id_and_consent_come_in_with_the_members_and_reach_their_events(make_api, tmp_path, capsys):
    source = tmp_path / "crm.csv"
    source.write_text("card,crm_id,consent,opening_points\n"
                      "7000000000001,CRM-1,sms;email,100\n"
                      "7000000000002,CRM-2,,\n"
                      "7000000000003,CRM-1,,\n"            # line 4: the id of line 2 again
                      "7000000000004,CRM 4,,\n"            # 5: a space
                      "7000000000005,,fax,\n"              # 6: not a channel
                      "7000000000006,CRM-TAKEN,,\n")       # 7: another member's, found at the write
    config = write_config(tmp_path)
    api = await make_api(now=NOW)
    assert (await api.post("/v1/members", {"card": "7000000000099"}))[0] == 201
    assert (await api.call("PATCH", "/v1/members/7000000000099", {"crm_id": "CRM-TAKEN"}))[0] == 200
    assert await asyncio.to_thread(cli, ["import", "members", "--csv", str(source), "--config", config]) == 1
    assert "6 members rows: 2 imported, 0 updated, 0 already there, 4 refused" in capsys.readouterr().out
    with open(tmp_path / "crm.refused.csv", newline="") as f:
        assert [(int(r["line"]), r["field"]) for r in csv.DictReader(f)] == [
            (4, "crm_id"), (5, "crm_id"), (6, "consent"), (7, "crm_id")]

    _, first = await api.get("/v1/members/7000000000001")
    assert (first["crm_id"], first["consent"]) == ("CRM-1", {"sms": True, "viber": False, "email": True,
                                                              "push": False})
    assert first["consent_updated_at"] is not None
    _, second = await api.get("/v1/members/7000000000002")
    assert (second["crm_id"], second["consent_updated_at"]) == ("CRM-2", None)
    assert not any(second["consent"].values())
    # The member's next event carries them.
    sale = {"receipt_id": "c1", "store_id": "S001", "register_id": "K01", "ts": "2026-11-24T12:00:00+02:00",
            "card": "7000000000001", "lines": [{"line_no": 1, "sku": "x", "category": "grocery", "qty": 1,
                                                "price": 1000, "amount": 1000}], "total": 1000}
    assert (await api.post("/v1/receipts", sale, as_="register"))[0] == 201
    _, pulled = await api.get("/v1/admin/events")
    confirmed = pulled["events"][-1]
    assert (confirmed["type"], confirmed["crm_id"], confirmed["consent"]["email"]) == ("receipt.confirmed", "CRM-1",
                                                                                       True)


def test_many_members_with_balances_pass_audit_and_a_rerun_changes_nothing(tmp_path, capsys):
    """100,000 members under `make faulttest` (FAULT_LONG=1), 2,000 in `make test`."""
    count = 100_000 if os.environ.get("FAULT_LONG") else 2_000
    source = tmp_path / "many.csv"
    with source.open("w") as f:
        f.write("card,phone,opening_points,opening_expires_on,crm_id,consent\n")
        f.writelines(f"7{i:012d},+38050{i:07d},{1 + i % 5_000},2027-12-31,CRM-{i},sms\n" for i in range(count))
    config = write_config(tmp_path)
    assert cli(["import", "members", "--csv", str(source), "--config", config, "--batch-rows", "5000"]) == 0
    assert f"{count} members rows: {count} imported, 0 updated, 0 already there, 0 refused" in capsys.readouterr().out
    done = ledger_state(tmp_path / "loyalty.db")
    assert len(done[0]) == count and sum(p[0] for p in done[3]) == sum(1 + i % 5_000 for i in range(count))
    assert cli(["audit", "verify", "--config", config]) == 0
    assert cli(["import", "members", "--csv", str(source), "--config", config]) == 0
    assert f"{count} members rows: 0 imported, 0 updated, {count} already there, 0 refused" in capsys.readouterr().out
    assert ledger_state(tmp_path / "loyalty.db") == done


def test_refused_rows_are_reported_with_their_line_and_reason(tmp_path, capsys):
    source = write_csv(tmp_path, [
        "7000000000001,,,,10,2027-01-01,",       # line 2: taken
        "7000000000002,,1990-13-01,,,,",         # 3
        "7000000000001,,,,,,",                   # 4: the same card again
        "7000 0001,,,,,,",                       # 5
        "7000000000005,,,,12,2026-11-24,",       # 6: expires on the import's day
        "7000000000006,,,,,,2030-01-01",         # 7
        "7000000000007,,,,-5,,",                 # 8
        "7000000000008,,,,",                     # 9: too few fields
        "7000000000009,12,,,,,",                 # 10: phone too short
        "7000000000010,,0001-01-01,,,,",         # 11: before 1900
        "7000000000011,,2026-11-25,,,,",         # 12: after the import's day
        "7000000000012,,1900-01-01,,,,",         # 13: taken
        "7000000000013,,2026-11-24,,,,",         # 14: born on the import's day: taken
    ])
    config = write_config(tmp_path)
    assert cli(["import", "members", "--csv", str(source), "--config", config]) == 1
    captured = capsys.readouterr()
    assert "13 members rows: 3 imported, 0 updated, 0 already there, 10 refused" in captured.out
    assert f"{source}:3: birthday: must be a date" in captured.err
    with open(tmp_path / "members.refused.csv", newline="") as f:
        report = list(csv.DictReader(f))
    assert [(int(r["line"]), r["field"]) for r in report] == [
        (3, "birthday"), (4, "card"), (5, "card"), (6, "opening_expires_on"), (7, "enrolled_on"),
        (8, "opening_points"), (9, "$"), (10, "phone"), (11, "birthday"), (12, "birthday")]
    assert report[1]["reason"] == "repeats line 2"
    assert report[7]["reason"] == "must be 3 to 32 characters"
    assert [r["reason"] for r in report[8:]] == [
        "must be a day from 1900-01-01 to today (2026-11-24), got 0001-01-01",
        "must be a day from 1900-01-01 to today (2026-11-24), got 2026-11-25"]

    # Fixed rows are taken on the next run; the refused ones are refused again, as JSON this time.
    assert cli(["import", "members", "--csv", str(source), "--config", config,
                "--report", str(tmp_path / "refused.json")]) == 1
    assert len(json.loads((tmp_path / "refused.json").read_text())) == 10
    conn = connect(tmp_path / "loyalty.db")
    assert conn.execute("SELECT COUNT(*), SUM(points) FROM postings").fetchone() == (1, 10)
    assert conn.execute("SELECT birthday FROM members ORDER BY id").fetchall() == [
        (None,), ("1900-01-01",), ("2026-11-24",)]


def test_a_file_it_cannot_read_stops_it_before_anything_is_written(tmp_path, capsys):
    config = write_config(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("card,points\n1,2\n")
    assert cli(["import", "members", "--csv", str(bad), "--config", config]) == 2
    assert "unknown column 'points'" in capsys.readouterr().err
    assert cli(["import", "members", "--csv", str(tmp_path / "missing.csv"), "--config", config]) == 2
    assert "no such file" in capsys.readouterr().err
    # A file in a folder that is not there is missing itself, before its report's folder is.
    missing = tmp_path / "exports" / "members.csv"
    assert cli(["import", "members", "--csv", str(missing), "--config", config]) == 2
    assert capsys.readouterr().err == f"import members: {missing}: no such file\n"
    # There, but not a file of rows: said as it is.
    assert cli(["import", "members", "--csv", str(tmp_path), "--config", config]) == 2
    assert capsys.readouterr().err == f"import members: {tmp_path}: a folder\n"
    assert cli(["import", "members", "--csv", "/dev/null", "--config", config]) == 2
    assert capsys.readouterr().err == "import members: /dev/null: not a regular file\n"


def test_import_beside_a_serving_server(tmp_path):
    """The real server keeps answering receipts while the command writes its batches, and
    serves the imported members' balances without a restart."""
    server = Server(tmp_path)
    server.start()
    try:
        source = write_csv(tmp_path, [f"80000000{i:05d},,,,{100 + i},2027-12-31," for i in range(2_000)])
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "import", "members", "--csv", str(source),
                                 "--config", str(server.config), "--batch-rows", "100"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).parent.parent)
        statuses = asyncio.run(_receipts_while(server, proc))
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        assert b"2000 members rows: 2000 imported" in out
        assert statuses and set(statuses) == {201}
        member = asyncio.run(_get(server, "/v1/members/8000000001999"))
        assert member["balance"]["available"] == 2_099
    finally:
        server.kill()
    assert cli(["audit", "verify", "--config", str(server.config)]) == 0


async def _receipts_while(server: Server, proc: subprocess.Popen) -> list[int]:
    headers = {"Authorization": f"Bearer {KEYS['register']}"}
    statuses = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        deadline = time.monotonic() + 120
        n = 0
        while (proc.poll() is None or n < 5) and time.monotonic() < deadline:
            n += 1
            body = {"receipt_id": f"live-{n}", "store_id": "S001", "register_id": "K01",
                    "ts": "2026-11-24T12:00:00+02:00", "total": 1000,
                    "lines": [{"line_no": 1, "sku": "a", "qty": 1, "price": 1000, "amount": 1000}]}
            async with session.post(server.url("/v1/receipts"), json=body, headers=headers) as resp:
                statuses.append(resp.status)
    return statuses


async def _get(server: Server, path: str) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.get(server.url(path), headers={"Authorization": f"Bearer {KEYS['manager']}"}) as resp:
            assert resp.status == 200
            return await resp.json()


async def test_a_profile_completed_before_pays_no_bonus_later(make_api, tmp_path):
    program = tmp_path / "program"
    shutil.copytree(MARKET, program)
    with open(program / "program.yaml", "a") as f:
        f.write("  - {id: questionnaire, on: profile_completed, reward: {points: 300}}\n")
    config = yaml.safe_load(Path(write_config(tmp_path)).read_text())
    config["rules"]["dir"] = str(program)
    (tmp_path / "cli.yaml").write_text(yaml.safe_dump(config))
    source = write_csv(tmp_path, ["7000000000001,+380501234567,1990-05-01,,,,", "7000000000002,+380501234568,,,,,"])
    assert await asyncio.to_thread(cli, ["import", "members", "--csv", str(source),
                                         "--config", str(tmp_path / "cli.yaml")]) == 0
    api = await make_api(now=NOW, program_dir=program)
    # Completed in the previous program: changing the tags later pays nothing.
    status, body = await api.patch("/v1/members/7000000000001", {"tags": ["vip"]})
    assert status == 200 and body["balance"]["available"] == 0
    # Completed now: the event pays, as for any member.
    status, body = await api.patch("/v1/members/7000000000002", {"birthday": "1991-02-03"})
    assert status == 200 and body["balance"]["available"] == 300


def test_a_file_that_stops_being_readable_keeps_the_rows_before(tmp_path, capsys):
    source = tmp_path / "members.csv"
    source.write_bytes(HEADER.encode() + b"7000000000001,,,,5,,\n7000000000002,,,,6,,\n7000\xff\xfe,,,,,,\n")
    config = write_config(tmp_path)
    assert cli(["import", "members", "--csv", str(source), "--config", config]) == 1
    captured = capsys.readouterr()
    assert "2 members rows: 2 imported" in captured.out
    assert f"{source}:4: cannot be read as UTF-8 CSV" in captured.err
    conn = connect(tmp_path / "loyalty.db")
    assert conn.execute("SELECT COUNT(*), SUM(points) FROM postings").fetchone() == (2, 11)


@pytest.mark.skipif(not POSTGRESQL, reason="one batch reads and writes in SQLite's one writer: nothing commits "
                                           "between its look-up of the cards and its write")
async def test_crm_fields_of_a_card_erased_while_the_batch_ran_are_not_written_to_the_erased_member(
        make_api, tmp_path, monkeypatch):
    """A row giving a card's member CRM fields, the card looked up just before an erasure of
    its member committed: the erased member carries no CRM id or consent again, and the row
    is taken as it would be after the erasure (the card enrolled afresh)."""
    from storage import imports
    source = tmp_path / "crm.csv"
    source.write_text("card,crm_id,consent\n7000000000001,CRM-1,sms\n")
    config = write_config(tmp_path)
    api = await make_api(now=NOW)
    status, member = await api.post("/v1/members", {"card": "7000000000001"})
    assert status == 201, member
    member_id = int(member["member_id"][2:])
    looked_up, real = [], imports.known_cards

    def before_the_erasure(conn, cards):
        found = real(conn, cards)
        looked_up.append(found)
        return {card: member_id for card in cards} if len(looked_up) == 1 else found

    monkeypatch.setattr(imports, "known_cards", before_the_erasure)
    assert (await api.post(f"/v1/admin/members/{member['member_id']}/erase", {"reason": "asked"}))[0] == 200
    assert await asyncio.to_thread(cli, ["import", "members", "--csv", str(source), "--config", config]) == 0
    conn = connect(tmp_path / "loyalty.db")
    try:
        row = conn.execute("SELECT crm_id, consent_sms FROM members WHERE id = ?", (member_id,)).fetchone()
    finally:
        conn.close()
    assert tuple(row) == (None, 0)
    status, fresh = await api.get("/v1/members/7000000000001")
    assert status == 200 and fresh["member_id"] != member["member_id"] and fresh["crm_id"] == "CRM-1", fresh


async def test_a_card_taken_out_of_use_is_refused_not_enrolled_again(make_api, tmp_path, capsys):
    """A replaced or merged-away card in a file from the previous program: the API refuses
    to enrol it (its points went on with the member that took it over), so does the import."""
    api = await make_api(now=NOW)
    _, first = await api.post("/v1/members", {"card": "7000000000001"})
    assert (await api.post(f"/v1/admin/members/{first['member_id']}/replace-card",
                           {"new_card": "7000000000002"}))[0] == 201
    _, gone = await api.post("/v1/members", {"card": "7000000000003"})
    _, kept = await api.post("/v1/members", {"card": "7000000000004"})
    assert (await api.post("/v1/admin/members/merge", {"merge_id": "MG-1", "from_member_id": gone["member_id"],
                                                       "into_member_id": kept["member_id"], "reason": "r"}))[0] == 201
    source = write_csv(tmp_path, ["7000000000001,,,,500,,", "7000000000003,,,,500,,", "7000000000005,,,,500,,"])
    assert await asyncio.to_thread(cli, ["import", "members", "--csv", str(source), "--config",
                                         write_config(tmp_path)]) == 1
    assert "3 members rows: 1 imported, 0 updated, 0 already there, 2 refused" in capsys.readouterr().out
    with open(tmp_path / "members.refused.csv", newline="") as f:
        assert [(int(r["line"]), r["field"], r["reason"].split(":")[0]) for r in csv.DictReader(f)] == [
            (2, "card", "was taken out of use (replaced)"), (3, "card", "was taken out of use (merged)")]
    for card in ("7000000000001", "7000000000003"):
        status, answer = await api.get(f"/v1/members/{card}")
        assert status == 404 and answer["error"]["code"] in ("card_replaced", "card_merged"), answer
    assert (await api.get("/v1/members/7000000000002"))[1]["balance"]["available"] == 100
    assert (await api.get("/v1/members/7000000000005"))[1]["balance"]["available"] == 500
