"""`loyalty partners settle` says its units: amounts printed with the currency's decimals,
CSV columns named after their unit, JSON in exact minor units that say so, and the sign of
the net explained."""
from __future__ import annotations

import asyncio
import csv
import json
import shutil

import pytest
import yaml

from conftest import MARKET, database_section, line, receipt
from server.cli import main as cli
from server.reports import money_text

NOW = "2026-11-24T12:00:05+02:00"
CSV_HEADER = ["partner", "name", "period", "currency", "currency_decimals", "funding_share", "issued_points",
              "funded_points", "funded_{c}", "redeemed_points", "owed_{c}", "net_to_partner_{c}"]


async def settle(api, tmp_path, program=MARKET, redeem: int = 0) -> tuple[str, list[dict], list[list[str]]]:
    """A fuel receipt at the partner's store (paid partly with points), then the settlement:
    (what it printed, the JSON, the CSV rows with their header)."""
    await api.post("/v1/members", {"card": "1"})
    await api.post("/v1/admin/adjustments", {"card": "1", "points": 1000, "reason": "r", "adjustment_id": "a"})
    fuel = receipt("F-1", [line(1, "fuel", 90000, qty="40.5")], card="1", store="F001", redeem=redeem)
    status, r = await api.post("/v1/receipts", fuel, as_="fuel")
    assert status == 201, r
    config = tmp_path / "cli.yaml"
    config.write_text(yaml.safe_dump({"database": database_section(tmp_path / "loyalty.db"), "clock": {"start": NOW},
                                      "rules": {"dir": str(program), "watch": False}}))
    out = tmp_path / "reports"
    argv = ["partners", "settle", "--period", "2026-11", "--config", str(config), "--out", str(out)]
    return (await asyncio.to_thread(cli, argv),
            json.loads((out / "settlement-2026-11.json").read_text()),
            list(csv.reader((out / "settlement-2026-11.csv").open(newline=""))))


async def test_the_program_pays_the_partner_for_more_points_spent_than_it_funds(make_api, tmp_path, capsys):
    api = await make_api(now=NOW)
    code, rows, table = await settle(api, tmp_path, redeem=100)
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.startswith(
        "fuelco (Fuel Co), 2026-11:\n"
        "  issued at its stores: 56 points; it funds 56 of them (share 1.0): 56.00 UAH\n"
        "  redeemed at its stores: 100 points; the program owes it 100.00 UAH\n"
        "  net to partner: 44.00 UAH (positive: the program pays Fuel Co 44.00 UAH)\n"), printed
    assert rows == [{"partner": "fuelco", "name": "Fuel Co", "period": "2026-11", "currency": "UAH",
                     "currency_decimals": 2, "funding_share": "1.0", "issued_points": 56, "funded_points": "56",
                     "funded_minor_units": 5600, "redeemed_points": 100, "owed_minor_units": 10000,
                     "net_to_partner_minor_units": 4400}]
    assert table == [[h.format(c="uah") for h in CSV_HEADER],
                     ["fuelco", "Fuel Co", "2026-11", "UAH", "2", "1.0", "56", "56", "56.00", "100", "100.00", "44.00"]]


async def test_the_partner_pays_the_program_for_points_it_funds_and_nobody_spent(make_api, tmp_path, capsys):
    api = await make_api(now=NOW)
    code, rows, table = await settle(api, tmp_path)
    assert code == 0                # 58 points issued at its store (2 % of 900.00, 40 for fuel), none spent
    assert ("  net to partner: -58.00 UAH (negative: Fuel Co pays the program 58.00 UAH)\n"
            in capsys.readouterr().out)
    assert rows[0]["net_to_partner_minor_units"] == -5800
    assert table[1][-1] == "-58.00"


async def test_a_month_without_partner_activity_settles_to_nobody_paying(make_api, tmp_path, capsys):
    api = await make_api(now=NOW)
    await settle(api, tmp_path)
    capsys.readouterr()
    out = tmp_path / "reports"
    argv = ["partners", "settle", "--period", "2026-10", "--config", str(tmp_path / "cli.yaml"), "--out", str(out)]
    assert await asyncio.to_thread(cli, argv) == 0
    assert ("  net to partner: 0.00 UAH (nobody pays: what it funds equals what it is owed)\n"
            in capsys.readouterr().out)
    assert list(csv.reader((out / "settlement-2026-10.csv").open(newline="")))[1][-4:] == ["0.00", "0", "0.00", "0.00"]


async def test_an_out_that_is_a_file_is_one_line(make_api, tmp_path, capsys):
    api = await make_api(now=NOW)
    await settle(api, tmp_path)
    capsys.readouterr()
    out = tmp_path / "reports.txt"
    out.write_text("not a folder")
    argv = ["partners", "settle", "--period", "2026-11", "--config", str(tmp_path / "cli.yaml"), "--out", str(out)]
    assert await asyncio.to_thread(cli, argv) == 2
    assert capsys.readouterr().err == f"partners settle: cannot write the settlement into {out}: it is a file, not a folder\n"
    assert out.read_text() == "not a folder"


async def test_a_currency_without_minor_units_prints_whole_amounts(make_api, tmp_path, capsys):
    program = tmp_path / "program"
    shutil.copytree(MARKET, program)
    settings = program / "program.yaml"
    text = settings.read_text().replace("currency: UAH", "currency: JPY").replace("value: 100 ", "value: 1 ")
    settings.write_text(text.replace("funding_share: 1.0", "funding_share: 0.75"))
    api = await make_api(now=NOW, program_dir=program)
    code, rows, table = await settle(api, tmp_path, program, redeem=100)
    assert code == 0
    printed = capsys.readouterr().out
    # Points worth 1 yen each: 2 % of the 89,900 yen paid is 1,798 points, plus 40 for fuel. Fuel Co
    # funds 1,838 x 0.75 = 1,378.5 points: 1,378 yen (money rounds once, half to even).
    assert "  issued at its stores: 1838 points; it funds 1378.5 of them (share 0.75): 1378 JPY\n" in printed
    assert "  redeemed at its stores: 100 points; the program owes it 100 JPY\n" in printed
    assert "  net to partner: -1278 JPY (negative: Fuel Co pays the program 1278 JPY)\n" in printed
    assert rows[0]["currency_decimals"] == 0 and rows[0]["funded_minor_units"] == 1378
    assert table == [[h.format(c="jpy") for h in CSV_HEADER],
                     ["fuelco", "Fuel Co", "2026-11", "JPY", "0", "0.75", "1838", "1378.5", "1378", "100", "100",
                      "-1278"]]


@pytest.mark.parametrize("minor_units, currency, text", [
    (123456789, "UAH", "1234567.89 UAH"), (5, "PLN", "0.05 PLN"), (-5, "UAH", "-0.05 UAH"), (0, "UAH", "0.00 UAH"),
    (-1234, "JPY", "-1234 JPY"), (1234, "KWD", "1.234 KWD"), (100, "XYZ", "1.00 XYZ")])
def test_money_is_printed_exactly_with_the_currency_decimals(minor_units, currency, text):
    assert money_text(minor_units, currency) == text
