"""A member's tier and receipt number stay right over a long history: 70 receipts over 14
months, a cancel, a return, a receipt at a month's first instant and a late one, each
receipt's recorded tier and number against the member's receipts counted row by row."""
from __future__ import annotations

from datetime import datetime, timedelta

from conftest import line, receipt
from server.keys import DATABASE
from storage import ledger, member_facts

NOW = "2026-11-24T12:00:05+02:00"      # the market program: silver from 5,000.00, gold from 20,000.00 over 365 days
WINDOW = timedelta(days=365)
CARD = "7000000000001"


async def confirm(api, receipt_id: str, ts: datetime, amount: int, card: str = CARD) -> dict:
    status, body = await api.post("/v1/receipts", receipt(receipt_id, [line(1, "grocery", amount)], card=card,
                                                          ts=ts.isoformat()), as_="register")
    assert status == 201, body
    return body


async def recorded(api, receipt_id: str) -> tuple[member_facts.ReceiptMemberFacts, tuple[int, int, int]]:
    """The receipt's member facts as stored, and its member's receipts counted row by row at
    its ts as a member view counts them (storage/ledger.py receipt_counts): (receipts
    confirmed before it in arrival order, receipts in its window, their net spend)."""
    key = ("S001", "K01", receipt_id)

    def read(conn):
        facts = member_facts.read(conn, key)
        ts, member_id = conn.execute("SELECT ts, member_id FROM receipts WHERE store_id = ? AND register_id = ? "
                                     "AND receipt_id = ?", key).fetchone()
        since = ledger.iso(datetime.fromisoformat(ts) - WINDOW)
        _, count, spend = ledger.receipt_counts(conn, member_id, since, ts, until_inclusive=False)
        before = ledger.receipts_confirmed_before(conn, member_id, key)
        return facts, (before, count, spend)
    return await api.client.server.app[DATABASE].read(read)


async def tier_counted(api, now: datetime) -> str:
    """The member's tier now, from their receipts in the year before it counted row by row."""
    def read(conn):
        member_id = conn.execute("SELECT member_id FROM receipts WHERE receipt_id = 'h0'").fetchone()[0]
        return ledger.receipt_counts(conn, member_id, ledger.iso(now - WINDOW))[2]
    spend = await api.client.server.app[DATABASE].read(read)
    return "gold" if spend >= 2_000_000 else "silver" if spend >= 500_000 else "base"


async def long_history(api) -> datetime:
    """70 receipts over 14 months before NOW (one every six days), the oldest outside the
    window, one of them cancelled and one returned in part."""
    now = datetime.fromisoformat(NOW)
    assert (await api.post("/v1/members", {"card": CARD}))[0] == 201
    for n in range(70):
        await confirm(api, f"h{n}", now - timedelta(days=6 * (70 - n), hours=n % 5), 20_000 + 1_000 * (n % 7))
    status, _ = await api.post("/v1/receipts/S001/K01/h65/cancel", as_="register")
    assert status == 200
    status, _ = await api.post("/v1/returns", {
        "return_id": "ret-1", "store_id": "S001", "register_id": "K01",
        "receipt": {"store_id": "S001", "register_id": "K01", "receipt_id": "h66"},
        "lines": [{"line_no": 1, "qty": 1}]}, as_="register")
    assert status == 201
    return now


async def test_a_tier_decided_after_a_long_history_is_the_one_its_receipts_give(make_api):
    api = await make_api(now=NOW)
    now = await long_history(api)
    # Today's, one stamped at the very start of a month, and a late one judged at its ts
    # (three months back: its window reaches into the history's first months).
    stamps = {"today": now - timedelta(minutes=1),
              "month-start": datetime.fromisoformat("2026-11-01T00:00:00+00:00"),
              "late": now - timedelta(days=95)}
    for receipt_id, ts in stamps.items():
        body = await confirm(api, receipt_id, ts, 150_000)
        facts, (before, count, spend) = await recorded(api, receipt_id)
        assert facts.receipt_number == before + 1
        assert (facts.tier.receipts, facts.tier.spend) == (count, spend), receipt_id
        assert facts.tier.id == ("gold" if spend >= 2_000_000 else "silver" if spend >= 500_000 else "base")
        rules = {r["rule"] for r in body["accrued"]["by_rule"]}
        assert {"base": "base", "silver": "base-silver", "gold": "base-gold"}[facts.tier.id] in rules
    assert facts.receipt_number == 72          # 70, one cancelled, then three
    # The late one's window, 95 to 460 days back, holds the history's first 55 receipts.
    assert facts.tier.id == "silver" and facts.tier.receipts == 55
    _, member = await api.get(f"/v1/members/{CARD}")
    assert member["tier"]["id"] == await tier_counted(api, now)
