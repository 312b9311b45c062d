"""Writes what a plan (server/plan.py) decided, inside the write transaction.

Nothing here decides: the lots, their points and dates, every posting and its amount come
from the plan. Each write names its member, so it holds as well when members are
serialized by a row lock per member instead of one writer: a plan reads and writes only
its own member's rows, the shared counters (rule_totals) are kept by the postings'
trigger, and the events it fires credit their member through the same functions.
"""
from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta

from storage import accounts, ledger, line_records
from storage.ledger import PostingRef, iso


def apply_calculate(conn: sqlite3.Connection, plan, now: datetime) -> None:
    if plan.hold is None:
        return
    if plan.hold.action == "put":
        ledger.put_hold(conn, plan.key, plan.member.id, plan.hold.points, iso(now), iso(plan.hold.expires_at))
    else:
        ledger.close_hold(conn, plan.key, "released", iso(now))


def apply_confirm(conn: sqlite3.Connection, plan, receipt, program, now: datetime, *, body: bytes,
                  fingerprint: bytes, answer: bytes) -> None:
    """The receipt's postings, hold, rule uses and events, then its row with its answer and
    line records."""
    lot_ids: list[int] = []
    if plan.member is not None:
        lot_ids = _post(conn, plan, receipt, program, now)
    lines = [_with_lot_ids(line, lot_ids) for line in plan.lines]
    ledger.insert_receipt(conn, plan.key, body_sha256=fingerprint,
                          member_id=plan.member.id if plan.member else None, ts=iso(receipt.ts),
                          local_date=str(plan.evaluation.local_date), total=receipt.total,
                          rules_version=program.version, body=body, result=answer, now=iso(now),
                          lines=line_records.encode(lines))


def _post(conn, plan, receipt, program, now: datetime) -> list[int]:
    member_id = plan.member.id
    at = PostingRef(effective_at=iso(receipt.ts), created_at=iso(now), rules_version=program.version,
                    receipt=plan.key)
    if plan.hold is not None:
        ledger.close_hold(conn, plan.key, "consumed", iso(now))
    lot_ids = [ledger.new_lot(conn, member_id, lot.available_from, lot.expires_on, lot.points) for lot in plan.lots]
    dates = [ledger.lot_dates(lot.available_from, lot.expires_on) for lot in plan.lots]
    for p in plan.postings:
        lot_id = lot_ids[p.lot] if p.new_lot else p.lot
        ref = at
        if not p.of_receipt:
            ref = PostingRef(effective_at=p.effective_at, created_at=iso(now), rules_version=program.version,
                             ref=f"{p.kind}:{lot_id}")
        ledger.post(conn, member_id, lot_id, p.kind, p.points, p.counter, ref, p.rule,
                    dates[p.lot] if p.new_lot else None, counted=p.kind == "accrual")
    if plan.expired_lots:
        conn.executemany("UPDATE lots SET expiry_done = 1 WHERE id = ?", [(lot_ids[i],) for i in plan.expired_lots])
    if plan.rule_uses:
        ledger.record_rule_fires(conn, member_id, plan.rule_uses, str(plan.evaluation.local_date), plan.key)
    for event in plan.events:
        fire_events(conn, program, event.member_id, event.on, event.occasion, now)
    return lot_ids


def _with_lot_ids(line: line_records.LineRecord, lot_ids: list[int]) -> line_records.LineRecord:
    if not line.accrued:
        return line
    accrued = tuple(line_records.Accrual(a.rule, a.points, lot_ids[a.lot] if lot_ids and a.lot is not None
                                         else None) for a in line.accrued)
    return line_records.LineRecord(line.line_no, line.qty, line.amount, accrued, line.redeemed, line.discount)


def fire_events(conn: sqlite3.Connection, program, member_id: int, on: str, occasion: str, now: datetime) -> None:
    """Credits the program's event rules for `on`, each at most once per member and occasion;
    the points pay the member's debts first."""
    today = now.astimezone(program.timezone).date()
    for event in program.events_on(on):
        if event.points <= 0 or not ledger.fire_event_once(conn, member_id, event.id, occasion, iso(now)):
            continue
        days = event.expires_in_days if event.expires_in_days is not None else program.expiry_days
        expires = today + timedelta(days=days) if days else None
        at = PostingRef(effective_at=iso(now), created_at=iso(now), rules_version=program.version,
                        ref=f"event:{event.id}:{occasion}")
        ledger.credit(conn, member_id, event.points, today, expires, "event", accounts.ISSUE_PROGRAM, at,
                      rule_id=event.id)


def apply_take_back(conn: sqlite3.Connection, member_id: int, postings, at: PostingRef) -> None:
    """A return's or a cancel's postings (server/returns.py take_back_postings), as planned."""
    for p in postings:
        ledger.post(conn, member_id, p.lot, p.kind, p.points, p.counter, at, p.rule)
