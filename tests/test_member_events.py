"""Imported members are announced like enrolled ones (member.enrolled, marked imported), and a
change of a member's crm_id or consent writes member.updated naming what changed: through
PATCH /v1/members and through `loyalty import members` run again with other values. The
same values again write nothing."""
from __future__ import annotations

import asyncio

from server.cli import main as cli
from test_import_members import NOW, write_config

NO_CONSENT = {"sms": False, "viber": False, "email": False, "push": False}


async def pull(api) -> list[dict]:
    status, body = await api.get("/v1/admin/events?limit=1000")
    assert status == 200, body
    return body["events"]


async def run_import(tmp_path, rows: str) -> None:
    source = tmp_path / "members.csv"
    source.write_text("card,crm_id,consent\n" + rows, encoding="utf-8")
    # A thread of its own: the command waits for its commits, which an event loop must not do.
    assert await asyncio.to_thread(cli, ["import", "members", "--csv", str(source), "--config",
                                         write_config(tmp_path)]) == 0


async def test_imported_members_are_enrolled_events_and_a_rerun_announces_what_it_changed(make_api, tmp_path,
                                                                                          capsys):
    await run_import(tmp_path, "7000000000001,CRM-1,sms;email\n7000000000002,,\n")
    assert "2 members rows: 2 imported, 0 updated, 0 already there, 0 refused" in capsys.readouterr().out
    api = await make_api(now=NOW)
    enrolled = await pull(api)
    assert [(e["type"], e["member_id"], e["card_last4"], e["crm_id"]) for e in enrolled] == [
        ("member.enrolled", "m_1", "0001", "CRM-1"), ("member.enrolled", "m_2", "0002", None)]
    assert enrolled[0]["data"] == {"store_id": None, "tier": "base", "imported": True}
    assert enrolled[0]["consent"] == {**NO_CONSENT, "sms": True, "email": True}

    await run_import(tmp_path, "7000000000001,CRM-1,sms;email\n7000000000002,,\n")     # the same: nothing
    assert "2 members rows: 0 imported, 0 updated, 2 already there, 0 refused" in capsys.readouterr().out
    assert len(await pull(api)) == 2
    await run_import(tmp_path, "7000000000001,CRM-1,email\n7000000000002,CRM-2,\n")
    # Changed by the rerun: counted as updated, not as already there.
    assert "2 members rows: 0 imported, 2 updated, 0 already there, 0 refused" in capsys.readouterr().out
    updated = (await pull(api))[2:]
    assert [(e["type"], e["member_id"], e["crm_id"], e["consent"], e["data"]) for e in updated] == [
        ("member.updated", "m_1", "CRM-1", {**NO_CONSENT, "email": True}, {"changed": ["consent"], "imported": True}),
        ("member.updated", "m_2", "CRM-2", NO_CONSENT, {"changed": ["crm_id"], "imported": True})]
    # The first tier is the one announced: a receipt moving it up is a tier.changed.
    sale = {"receipt_id": "r1", "store_id": "S001", "register_id": "K01", "ts": "2026-11-24T12:00:00+02:00",
            "card": "7000000000002", "lines": [{"line_no": 1, "sku": "x", "category": "grocery", "qty": 1,
                                                 "price": 600_000, "amount": 600_000}], "total": 600_000}
    assert (await api.post("/v1/receipts", sale, as_="register"))[0] == 201
    assert [e["data"] for e in await pull(api) if e["type"] == "tier.changed"] == [
        {"from": "base", "to": "silver", "reason": "receipt.confirmed"}]


async def test_the_api_announces_a_crm_change_once(make_api):
    api = await make_api(now=NOW)
    assert (await api.post("/v1/members", {"card": "7000000000001"}))[0] == 201
    for _ in range(2):
        assert (await api.call("PATCH", "/v1/members/7000000000001", {"consent": {"push": True}}))[0] == 200
    assert (await api.call("PATCH", "/v1/members/7000000000001", {"crm_id": "CRM-9"}))[0] == 200
    assert (await api.call("PATCH", "/v1/members/7000000000001", {"tags": ["vip"]}))[0] == 200   # not the CRM's
    updates = [(e["crm_id"], e["consent"]["push"], e["data"]) for e in await pull(api) if e["type"] == "member.updated"]
    assert updates == [(None, True, {"changed": ["consent"]}), ("CRM-9", True, {"changed": ["crm_id"]})]


async def test_a_rerun_giving_a_crm_id_another_member_has_is_refused_and_changes_nothing(make_api, tmp_path, capsys):
    await run_import(tmp_path, "7000000000001,CRM-1,\n7000000000002,CRM-2,\n")
    source = tmp_path / "again.csv"
    source.write_text("card,crm_id,consent\n7000000000002,CRM-1,\n", encoding="utf-8")
    capsys.readouterr()
    assert await asyncio.to_thread(cli, ["import", "members", "--csv", str(source), "--config",
                                         write_config(tmp_path)]) == 1
    assert "1 members rows: 0 imported, 0 updated, 0 already there, 1 refused" in capsys.readouterr().out
    api = await make_api(now=NOW)
    assert [e["type"] for e in await pull(api)] == ["member.enrolled", "member.enrolled"]
    _, member = await api.get("/v1/members/7000000000002")
    assert member["crm_id"] == "CRM-2"
