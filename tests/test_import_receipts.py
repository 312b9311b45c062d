"""`loyalty import receipts`: the history before the program counts for tiers from day one,
earns nothing, cannot be returned, and a rerun changes nothing."""
from __future__ import annotations

import asyncio
import csv
import json

import msgspec
import pytest

from conftest import connect, line, receipt
from server.cli import main as cli
from server.errors import error_answer
from storage import imports
from test_import_members import NOW, ledger_state, write_config, write_csv


def history(n: int, card: str | None = "7000000000001", amount: int = 100_000, day: int = 1) -> dict:
    return receipt(f"H-{n}", [line(1, "grocery", amount)], card=card, ts=f"2026-10-{day:02d}T12:00:00+03:00",
                   register="OLD")


def write_jsonl(tmp_path, items: list, name: str = "history.jsonl"):
    path = tmp_path / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in items))
    return path


async def run(*argv: str) -> int:
    # A thread of its own: the command waits for its commits, which an event loop must not do.
    return await asyncio.to_thread(cli, list(argv))


async def members_and_history(tmp_path, receipts: list):
    config = write_config(tmp_path)
    members = write_csv(tmp_path, ["7000000000001,,,,,,2025-01-01", "7000000000002,,,,,,"])
    assert await run("import", "members", "--csv", str(members), "--config", config) == 0
    return config, write_jsonl(tmp_path, receipts)


async def test_imported_receipts_move_the_tier_and_earn_nothing(make_api, tmp_path, capsys):
    # 6 x 1,000.00 UAH in October: past silver's 5,000.00 over the 365-day window.
    config, source = await members_and_history(tmp_path, [history(n, day=n) for n in range(1, 7)])
    assert await run("import", "receipts", "--jsonl", str(source), "--config", config) == 0
    assert "6 receipts rows: 6 imported, 0 already there, 0 refused" in capsys.readouterr().out

    api = await make_api(now=NOW)
    _, member = await api.get("/v1/members/7000000000001")
    assert member["tier"]["id"] == "silver" and member["tier"]["value"] == 600_000
    assert member["balance"] == {"available": 0, "pending": 0, "held": 0}
    _, other = await api.get("/v1/members/7000000000002")
    assert other["tier"]["id"] == "base"
    conn = connect(tmp_path / "loyalty.db")
    assert conn.execute("SELECT COUNT(*) FROM postings WHERE receipt_id IS NOT NULL").fetchone() == (0,)

    # A new receipt is computed with the tier the history reached.
    status, body = await api.post("/v1/receipts", receipt("LIVE-1", [line(1, "grocery", 10_000)],
                                                          card="7000000000001"), as_="register")
    assert status == 201
    _, base = await api.post("/v1/receipts/calculate", receipt("LIVE-2", [line(1, "grocery", 10_000)],
                                                               card="7000000000002"), as_="register")
    assert body["accrued"]["points"] > base["accrued"]["points"]
    assert await run("audit", "verify", "--config", config) == 0


async def test_a_rerun_changes_nothing(tmp_path, capsys):
    config, source = await members_and_history(tmp_path, [history(n) for n in range(1, 40)]
                                               + [history(99, card=None)])
    assert await run("import", "receipts", "--jsonl", str(source), "--config", config, "--batch-rows", "7") == 0
    capsys.readouterr()
    conn = connect(tmp_path / "loyalty.db")
    stored = conn.execute("SELECT * FROM receipts ORDER BY id").fetchall()
    marks = conn.execute("SELECT * FROM imported_receipts").fetchall()
    before = ledger_state(tmp_path / "loyalty.db")
    assert len(stored) == 40 and len(marks) == 40
    assert await run("import", "receipts", "--jsonl", str(source), "--config", config) == 0
    assert "40 receipts rows: 0 imported, 40 already there, 0 refused" in capsys.readouterr().out
    assert conn.execute("SELECT * FROM receipts ORDER BY id").fetchall() == stored
    assert conn.execute("SELECT * FROM imported_receipts").fetchall() == marks
    assert ledger_state(tmp_path / "loyalty.db") == before


async def test_refused_rows_are_reported_with_their_line_and_reason(tmp_path, capsys):
    bad_qty = history(4)
    bad_qty["lines"][0]["qty"] = 0
    other_body = history(1, amount=5)
    config, source = await members_and_history(tmp_path, [
        history(1),                                                 # line 1: taken
        history(2, card="7000000000099"),                           # 2: not enrolled
        {**history(3), "ts": "2027-01-01T00:00:00+02:00"},          # 3: after the import's moment
        bad_qty,                                                    # 4
        "{not json",                                                # 5
        history(1),                                                 # 6: the same receipt again: taken once
        other_body,                                                 # 7: its identity, another body
        {**history(8), "redeem_points": 10},                        # 8
        {**history(9), "total": -1},                                # 9
    ])
    assert await run("import", "receipts", "--jsonl", str(source), "--config", config) == 1
    captured = capsys.readouterr()
    assert "9 receipts rows: 1 imported, 1 already there, 7 refused" in captured.out
    with open(tmp_path / "history.refused.csv", newline="") as f:
        report = [(int(r["line"]), r["field"], r["reason"]) for r in csv.DictReader(f)]
    assert [r[:2] for r in report] == [(2, "card"), (3, "ts"), (4, "lines[0].qty"), (5, "$"), (7, "receipt_id"),
                                       (8, "redeem_points"), (9, "total")]
    assert report[0][2] == "is not enrolled: import the members first"
    assert report[4][2] == "repeats the identity of line 1 with a different receipt"


async def test_a_register_sending_an_imported_identity_gets_a_conflict(make_api, tmp_path):
    config, source = await members_and_history(tmp_path, [history(1)])
    assert await run("import", "receipts", "--jsonl", str(source), "--config", config) == 0
    api = await make_api(now=NOW)
    status, body = await api.post("/v1/receipts", history(1), as_="register")
    assert status == 409


async def test_imported_receipts_are_refused_by_the_return_and_cancel_check(tmp_path):
    config, source = await members_and_history(tmp_path, [history(1)])
    assert await run("import", "receipts", "--jsonl", str(source), "--config", config) == 0
    conn = connect(tmp_path / "loyalty.db")
    imports.refuse_if_imported(conn, ("S001", "OLD", "H-2"), "returned")          # not imported: no error
    with pytest.raises(imports.ImportedReceipt) as refused:
        imports.refuse_if_imported(conn, ("S001", "OLD", "H-1"), "returned")
    status, body, _ = error_answer(refused.value, "POST", "/v1/returns")
    error = msgspec.json.decode(body)["error"]
    assert status == 422 and error["code"] == "receipt_imported"
    assert error["message"] == ("receipt S001/OLD/H-1 was imported from the history before the program: "
                                "it earned no points here and cannot be returned")
    assert error["details"] == [{"path": "receipt", "message": "imported from history"}]


async def test_an_imported_receipt_cannot_be_returned_or_cancelled(make_api, tmp_path):
    config, source = await members_and_history(tmp_path, [history(1)])
    assert await run("import", "receipts", "--jsonl", str(source), "--config", config) == 0
    api = await make_api(now=NOW)
    status, body = await api.post("/v1/returns", {
        "return_id": "X1", "store_id": "S001", "register_id": "K01",
        "receipt": {"store_id": "S001", "register_id": "OLD", "receipt_id": "H-1"},
        "lines": [{"line_no": 1, "qty": 1}]}, as_="register")
    assert status == 422 and body["error"]["code"] == "receipt_imported"
    status, body = await api.post("/v1/receipts/S001/OLD/H-1/cancel", as_="register")
    assert status == 422 and body["error"]["code"] == "receipt_imported"


async def test_history_of_a_replaced_card_is_its_members(make_api, tmp_path, capsys):
    config, source = await members_and_history(tmp_path, [history(n, day=n) for n in range(1, 7)])
    api = await make_api(now=NOW)
    _, member = await api.get("/v1/members/7000000000001")
    status, done = await api.post(f"/v1/admin/members/{member['member_id']}/replace-card",
                                  {"new_card": "7000000000077", "reason": "card lost"})
    assert status == 201, done
    assert await run("import", "receipts", "--jsonl", str(source), "--config", config) == 0
    assert "6 receipts rows: 6 imported, 0 already there, 0 refused" in capsys.readouterr().out
    _, member = await api.get("/v1/members/7000000000077")
    assert member["tier"]["id"] == "silver" and member["tier"]["value"] == 600_000
    assert await run("audit", "verify", "--config", config) == 0
