"""The answers to a calculate, a confirm, a return and a cancel, built from their plans
(server/plan.py, server/returns.py): the numbers a register prints are the ones the
ledger got."""
from __future__ import annotations

from rules import Program
from server.plan import ReceiptPlan
from storage.ledger import member_public_id


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
    out = {"receipt": receipt_ref(plan.key), "member_id": member.public_id if member else None,
           "rules_version": program.version, "accrued": accrued, "redeemed": redeemed,
           "balance": balance, "messages": messages(plan, program, balance)}
    if plan.coupon_statuses is not None:
        out["coupons"] = [{"code": code, "status": status} for code, status in plan.coupon_statuses]
    return out


def messages(plan: ReceiptPlan, program: Program, balance: dict) -> list[str]:
    ev = plan.evaluation
    if plan.member is None:
        return []
    out = []
    if ev.redeemed_points:
        out.append(f"Paid with {ev.redeemed_points} points: {money(ev.discount)} {program.currency}")
    for rule, points in ev.by_rule:
        if points > 0 and rule in program.personal_rule_ids:   # only an offer lets one fire
            out.append(f"Personal offer {rule}: {points} points")
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


def return_answer(plan, ret_key, rec_key, member_id: int | None) -> dict:
    """A return's answer from its plan (server/returns.py); the caller adds the balance."""
    lines = plan.lines.items()
    return {"return": {"store_id": ret_key[0], "register_id": ret_key[1], "return_id": ret_key[2]},
            "receipt": receipt_ref(rec_key),
            "member_id": member_public_id(member_id) if member_id is not None else None,
            "reversed": {"points": plan.reversed_points, "by_rule": plan.by_rule_json(),
                         "by_line": [{"line_no": n, "points": ln.points_reversed} for n, ln in lines]},
            "refunded": {"points": plan.refunded_points, "discount": plan.discount_refunded,
                         "by_line": [{"line_no": n, "points": ln.points_refunded, "discount": ln.discount_refunded}
                                     for n, ln in lines]},
            "amount": sum(ln.amount for ln in plan.lines.values()),
            "replayed": False}


def cancel_answer(key, reversals, refunds) -> dict:
    """A cancel's answer from what it takes back (server/returns.py plan_cancel)."""
    by_rule: dict[str, int] = {}
    for _, rule_id, points, _ in reversals:
        by_rule[rule_id] = by_rule.get(rule_id, 0) + points
    return {"receipt": receipt_ref(key), "status": "cancelled", "already": False,
            "reversed": {"points": sum(r[2] for r in reversals),
                         "by_rule": [{"rule": r, "points": p} for r, p in by_rule.items()]},
            "refunded": {"points": sum(r[1] for r in refunds)}}
