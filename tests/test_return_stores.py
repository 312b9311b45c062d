"""Which store's receipts a register may return: its own stores' always; another store's
only when the program sets `returns: {cross_store: true}`, and never another partner's."""
import shutil

import pytest

from conftest import MARKET, line, receipt
from rules import check_files
from server.cli import main as cli

NOW = "2026-11-24T12:00:05+02:00"
CARD = "7000000000005"
KEY_OF_STORE = {"S001": "register", "S002": "register2", "F001": "fuel"}


def cross_store_market(tmp_path):
    program = tmp_path / "market-cross-store"
    shutil.copytree(MARKET, program)
    (program / "returns.yaml").write_text("returns: {cross_store: true}\n")
    return program


async def sold_at(api, store: str, receipt_id: str) -> dict:
    lines = [line(1, "fuel", 90000, qty="40.5")] if store == "F001" else [line(1, "dairy", 40000),
                                                                           line(2, "grocery", 60000)]
    status, sold = await api.post("/v1/receipts", receipt(receipt_id, lines, card=CARD, store=store),
                                  as_=KEY_OF_STORE[store])
    assert status == 201, sold
    assert sold["accrued"]["points"] > 0
    return sold


def return_of(store: str, receipt_store: str, receipt_id: str, return_id: str = "RET-1") -> dict:
    return {"return_id": return_id, "store_id": store, "register_id": "K09",
            "receipt": {"store_id": receipt_store, "register_id": "K01", "receipt_id": receipt_id},
            "lines": [{"line_no": 1, "qty": 1}]}


async def ledger_of(api) -> tuple[dict, list]:
    status, member = await api.get(f"/v1/members/{CARD}")
    assert status == 200
    status, statement = await api.get(f"/v1/members/{CARD}/statement")
    assert status == 200
    return member["balance"], statement["postings"]


async def assert_refused(api, body: dict, as_: str, why: str) -> None:
    before = await ledger_of(api)
    status, err = await api.post("/v1/returns", body, as_=as_)
    assert status == 403, err
    assert err["error"]["code"] == "forbidden"
    [detail] = err["error"]["details"]
    assert detail["path"] == "receipt.store_id" and why in detail["message"]
    assert await ledger_of(api) == before


@pytest.mark.parametrize("other", ["S002", "F001"])
async def test_a_register_cannot_return_another_stores_receipt(make_api, other):
    api = await make_api(now=NOW)
    assert (await api.post("/v1/members", {"card": CARD}))[0] == 201
    await sold_at(api, other, "R-1")
    await assert_refused(api, return_of("S001", other, "R-1"), "register",
                         "the program does not allow returns across stores")
    # Refused whether or not such a receipt exists: the answer says nothing about it.
    await assert_refused(api, return_of("S001", other, "NO-SUCH", "RET-2"), "register", "across stores")
    # Nothing of the refused return was kept: its own store returns the line whole.
    status, done = await api.post("/v1/returns", return_of(other, other, "R-1"), as_=KEY_OF_STORE[other])
    assert status == 201, done


async def test_cross_store_returns_reverse_points_within_the_chain(make_api, tmp_path):
    api = await make_api(now=NOW, program_dir=cross_store_market(tmp_path))
    assert (await api.post("/v1/members", {"card": CARD}))[0] == 201
    sold = await sold_at(api, "S002", "R-1")
    earned_on_line = {x["line_no"]: x["points"] for x in sold["accrued"]["by_line"]}[1]
    body = return_of("S001", "S002", "R-1")
    status, ret = await api.post("/v1/returns", body, as_="register")
    assert status == 201, ret
    assert ret["receipt"] == {"store_id": "S002", "register_id": "K01", "receipt_id": "R-1"}
    assert ret["reversed"]["points"] == earned_on_line > 0
    assert ret["balance"]["pending"] == sold["balance"]["pending"] - earned_on_line
    balance, postings = await ledger_of(api)
    assert balance == ret["balance"]
    assert sum(p["points"] for p in postings if p["kind"] == "reversal") == -earned_on_line
    status, again = await api.post("/v1/returns", body, as_="register")
    assert status == 200 and again["replayed"] is True


@pytest.mark.parametrize("store,other", [("S001", "F001"), ("F001", "S001")])
async def test_cross_store_returns_never_cross_partners(make_api, tmp_path, store, other):
    api = await make_api(now=NOW, program_dir=cross_store_market(tmp_path))
    assert (await api.post("/v1/members", {"card": CARD}))[0] == 201
    await sold_at(api, other, "R-1")
    await assert_refused(api, return_of(store, other, "R-1"), KEY_OF_STORE[store], "returns never cross partners")


async def test_the_manager_key_still_makes_no_returns(make_api, tmp_path):
    # README: a manager key manages members, adjustments, tiers and /v1/admin/*; returns are
    # a register's, so the store check never widens or narrows what a manager may do.
    api = await make_api(now=NOW, program_dir=cross_store_market(tmp_path))
    assert (await api.post("/v1/members", {"card": CARD}))[0] == 201
    await sold_at(api, "S002", "R-1")
    before = await ledger_of(api)
    status, err = await api.post("/v1/returns", return_of("S002", "S002", "R-1"), as_="manager")
    assert status == 403 and err["error"]["message"] == "a manager key may not use this endpoint"
    assert await ledger_of(api) == before


def test_rules_check_accepts_the_setting(tmp_path, capsys):
    program = cross_store_market(tmp_path)
    assert cli(["rules", "check", str(program), "--today", "2026-11-24"]) == 0  # dairy-x2 still on
    assert capsys.readouterr().out.strip() == f"{program}: ok"


@pytest.mark.parametrize("text,problem", [
    ("returns: {cross_store: yes}\n", "a.yaml:3:24: 'cross_store' should be true or false, not text"),
    ("returns: {cross_store: 1}\n", "a.yaml:3:24: 'cross_store' should be true or false, not an integer"),
    ("returns: {cross_stores: true}\n", "a.yaml:3:11: unknown key 'cross_stores', did you mean 'cross_store'?"),
    ("returns: true\n", "a.yaml:3:10: 'returns' should be a mapping, not true or false"),
])
def test_a_wrong_setting_is_a_problem_at_its_place(text, problem):
    settings = "program: {id: t, currency: UAH, timezone: Europe/Kyiv}\npoints: {value: 1}\n"
    assert [str(p) for p in check_files({"a.yaml": settings + text})] == [problem]
