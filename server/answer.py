"""The answers to a calculate and a confirm, built from their plan (server/plan.py): the
numbers a register prints are the ones the ledger got."""
from __future__ import annotations

from rules import Program
from server.plan import ReceiptPlan


def receipt_ref(key) -> dict:
    return {"store_id": key[0], "register_id": key[1], "receipt_id": key[2]}


def money(minor: int) -> str:
    return f"{minor // 100}.{minor % 100:02d}"


def ddmmyyyy(day: str) -> str:
    y, m, d = day.split("-")
    return f"{d}.{m}.{y}"


def receipt_answer(plan: ReceiptPlan, program: Program) -> dict:
    ev, member = plan.evaluation, plan.member
    balance = plan.balance.as_json() if plan.balance is not None else {}
    accrued = {"points": ev.accrued_points,
               "available_from": str(ev.available_from) if member else None,
               "expires_on": str(ev.expires_on) if member and ev.expires_on else None,
               "by_rule": [{"rule": r, "points": p} for r, p in ev.by_rule],
               "by_line": [{"line_no": n, "points": p} for n, p in ev.by_line]}
    redeemed = {"points": ev.redeemed_points, "discount": ev.discount,
                "by_line": [{"line_no": n, "points": p, "discount": d} for n, p, d in ev.redeemed_by_line]}
    return {"receipt": receipt_ref(plan.key), "member_id": member.public_id if member else None,
            "rules_version": program.version, "accrued": accrued, "redeemed": redeemed,
            "balance": balance, "messages": messages(plan, program, balance)}


def messages(plan: ReceiptPlan, program: Program, balance: dict) -> list[str]:
    ev = plan.evaluation
    if plan.member is None:
        return []
    out = []
    if ev.redeemed_points:
        out.append(f"Paid with {ev.redeemed_points} points: {money(ev.discount)} {program.currency}")
    if ev.accrued_points:
        if str(ev.available_from) > plan.today:
            out.append(f"{ev.accrued_points} points will be available from {ddmmyyyy(str(ev.available_from))}")
        else:
            out.append(f"{ev.accrued_points} points earned")
    out.append(f"Balance: {balance['available']} points")
    return out


def calculate_answer(plan: ReceiptPlan, program: Program) -> dict:
    hold = plan.hold if plan.hold is not None and plan.hold.action == "put" else None
    return {**receipt_answer(plan, program),
            "hold": {"points": hold.points, "expires_at": hold.expires_at.isoformat()} if hold else None}


def confirm_answer(plan: ReceiptPlan, program: Program) -> dict:
    return {**receipt_answer(plan, program), "replayed": False}
