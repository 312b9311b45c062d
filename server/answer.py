"""The answers to a calculate, a confirm, a return and a cancel, built from their plans
(server/plan.py, server/returns.py) as the types of server/answer_types.py, which the server
encodes and /openapi.json describes: the numbers a register prints are the ones the ledger
got, in the shape the document gives."""
from __future__ import annotations

from msgspec import UNSET, UnsetType

from rules import Program
from server import answer_types as A
from server.plan import ReceiptPlan
from storage.ledger import day_text, member_public_id


def receipt_ref(key) -> A.ReceiptKey:
    return A.ReceiptKey(key[0], key[1], key[2])


def money(minor: int) -> str:
    return f"{minor // 100}.{minor % 100:02d}"


def ddmmyyyy(day: str) -> str:
    y, m, d = day.split("-")
    return f"{d}.{m}.{y}"


def receipt_parts(plan: ReceiptPlan, program: Program) -> tuple:
    """The fields a calculate and a confirm share, in their order."""
    ev, member = plan.evaluation, plan.member
    b = plan.balance
    balance = A.ReceiptBalance(b.available, b.pending, b.held) if b is not None else A.ReceiptBalance()
    accrued = A.Accrued(ev.accrued_points,
                        day_text(ev.available_from) if member else None,
                        first_expiry(plan) if member else None,
                        [A.RulePoints(r, p) for r, p in ev.by_rule],
                        [A.LinePoints(n, p) for n, p in ev.by_line])
    redeemed = A.Redeemed(ev.redeemed_points, ev.discount,
                          [A.LineRedeemed(n, p, d) for n, p, d in ev.redeemed_by_line])
    return (receipt_ref(plan.key), member.public_id if member else None, program.version, accrued, redeemed,
            balance, messages(plan, program))


def first_expiry(plan: ReceiptPlan) -> str | None:
    """`accrued.expires_on`: the earliest date any of the receipt's points expire. A rule with
    its own `expires_in_days` puts its points in a lot of their own, so one receipt's points
    may expire on several dates; the member's `expiring` list shows each. The dates are the
    plan's own lots (a confirm's, as written to the ledger) or, for a calculate, which writes
    none, the evaluation's that they are made from. No points: the program's date; points
    that never expire: null."""
    ev = plan.evaluation
    dates = [lot.expires_on for lot in plan.lots] if plan.lots else [expires for _, expires, _ in ev.lots]
    if not dates:
        return day_text(ev.expires_on) if ev.expires_on else None
    expiring = [day for day in dates if day is not None]
    return day_text(min(expiring)) if expiring else None


def points_words(n: int) -> str:
    """"1 point", "2 points": the lines are printed on the customer's receipt."""
    return f"{n} point" if abs(n) == 1 else f"{n} points"


def messages(plan: ReceiptPlan, program: Program) -> list[str]:
    ev = plan.evaluation
    if plan.member is None:
        return []
    out = []
    if ev.redeemed_points:
        out.append(f"Paid with {points_words(ev.redeemed_points)}: {money(ev.discount)} {program.currency}")
    for rule, points in ev.by_rule:
        if points > 0 and rule in program.personal_rule_ids:   # only an offer lets one fire
            out.append(f"Personal offer {rule}: {points_words(points)}")
    if ev.accrued_points:
        if day_text(ev.available_from) > plan.today:
            out.append(f"{points_words(ev.accrued_points)} will be available from "
                       f"{ddmmyyyy(day_text(ev.available_from))}")
        else:
            out.append(f"{points_words(ev.accrued_points)} earned")
    out.append(f"Balance: {points_words(plan.balance.available)}")
    return out


def calculate_answer(plan: ReceiptPlan, program: Program) -> A.CalculateAnswer:
    hold = plan.hold if plan.hold is not None and plan.hold.action == "put" else None
    return A.CalculateAnswer(*receipt_parts(plan, program),
                             A.Hold(hold.points, hold.expires_at.isoformat()) if hold else None,
                             coupons=coupon_statuses(plan))


def confirm_answer(plan: ReceiptPlan, program: Program) -> A.ConfirmAnswer:
    return A.ConfirmAnswer(*receipt_parts(plan, program), replayed=False, coupons=coupon_statuses(plan))


def coupon_statuses(plan: ReceiptPlan) -> list[A.CouponStatus] | UnsetType:
    """What happened to each code the receipt sent; no `coupons` key when it sent none."""
    if plan.coupon_statuses is None:
        return UNSET
    return [A.CouponStatus(code, status) for code, status in plan.coupon_statuses]


def return_answer(plan, ret_key, rec_key, member_id: int | None) -> A.ReturnAnswer:
    """A return's answer from its plan (server/returns.py); the caller adds the balance."""
    lines = plan.lines.items()
    return A.ReturnAnswer(
        A.ReturnKey(ret_key[0], ret_key[1], ret_key[2]), receipt_ref(rec_key),
        member_public_id(member_id) if member_id is not None else None,
        A.ReturnReversed(plan.reversed_points, [A.RulePoints(r, p) for r, p in plan.by_rule.items() if p],
                         [A.LinePoints(n, ln.points_reversed) for n, ln in lines]),
        A.ReturnRefunded(plan.refunded_points, plan.discount_refunded,
                         [A.LineRedeemed(n, ln.points_refunded, ln.discount_refunded) for n, ln in lines]),
        sum(ln.amount for ln in plan.lines.values()), replayed=False)


def cancel_answer(key, reversals, refunds) -> A.CancelAnswer:
    """A cancel's answer from what it takes back (server/returns.py plan_cancel)."""
    by_rule: dict[str, int] = {}
    for _, rule_id, points, _ in reversals:
        by_rule[rule_id] = by_rule.get(rule_id, 0) + points
    return A.CancelAnswer(receipt_ref(key), "cancelled", already=False,
                          reversed=A.ReversedPoints(sum(r[2] for r in reversals),
                                                    [A.RulePoints(r, p) for r, p in by_rule.items()]),
                          refunded=A.RefundedPoints(sum(r[1] for r in refunds)))
