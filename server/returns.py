"""How much a return or a cancel takes back, as plain arithmetic over what was stored:
the receipt's line records (storage/line_records.py) and its postings.

rules.md step 5: returning q of a line's qty reverses floor(line points x q / qty) and
refunds the same share of the points spent on it; the return that completes the line
takes exactly what is left, so a full return reverses exactly what was earned.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction

import msgspec

from rules import largest_remainder
from server.errors import field_error, unprocessable
from server.plan import Posting
from storage.accounts import EXPIRY
from storage.ledger import ReceiptKey, ReturnedLine
from storage.line_records import LineRecord

# (kind, lot_id, rule_id, counter_account, points), as storage.ledger.receipt_postings gives them
Postings = list[tuple[str, int, str | None, str, int]]


@dataclass
class ReturnPlan:
    lines: dict[int, ReturnedLine] = field(default_factory=dict)
    by_rule: dict[str, int] = field(default_factory=dict)
    reversals: list[tuple[int, str, int, str]] = field(default_factory=list)   # (lot, rule, points, counter)
    refunds: list[tuple[int, int, str]] = field(default_factory=list)          # (lot, points, counter)

    @property
    def reversed_points(self) -> int:
        return sum(line.points_reversed for line in self.lines.values())

    @property
    def refunded_points(self) -> int:
        return sum(line.points_refunded for line in self.lines.values())

    @property
    def discount_refunded(self) -> int:
        return sum(line.discount_refunded for line in self.lines.values())

    def by_rule_json(self) -> list[dict]:
        return [{"rule": r, "points": p} for r, p in self.by_rule.items() if p]


def _share(whole: int, done: int, fraction: Fraction, completes: bool) -> int:
    if completes:
        return whole - done
    return (whole * fraction.numerator) // fraction.denominator


def plan_return(sold: dict[int, LineRecord], prior: dict[int, list[ReturnedLine]], postings: Postings,
                lines) -> ReturnPlan:
    """sold: the receipt's line records; prior: what earlier returns took per line."""
    plan = ReturnPlan()
    by_lot: dict[tuple[str, int | None], int] = {}
    for i, req in enumerate(lines):
        sold_line = sold.get(req.line_no)
        if sold_line is None:
            raise field_error(f"lines[{i}].line_no", f"line {req.line_no} is not on the receipt")
        before = prior.get(req.line_no, [])
        returned = sum((Decimal(b.qty) for b in before), Decimal(0))
        if returned + req.qty > sold_line.qty:
            raise unprocessable("return_exceeds_sold",
                                f"line {req.line_no}: {sold_line.qty - returned} left to return, {req.qty} asked",
                                [{"path": f"lines[{i}].qty", "message": f"at most {sold_line.qty - returned}"}])
        completes = returned + req.qty == sold_line.qty
        fraction = Fraction(req.qty) / Fraction(sold_line.qty)
        pairs_left = _pairs_left({a.rule: a.points for a in sold_line.accrued}, before)
        reversed_ = _share(sold_line.points, sum(b.points_reversed for b in before), fraction, completes)
        shares = (list(pairs_left.values()) if completes
                  else largest_remainder(reversed_, list(pairs_left.values())) if reversed_ else
                  [0] * len(pairs_left))
        by_rule = {r: s for r, s in zip(pairs_left, shares) if s}
        lot_of = {a.rule: a.lot for a in sold_line.accrued}
        for rule, points in by_rule.items():
            plan.by_rule[rule] = plan.by_rule.get(rule, 0) + points
            by_lot[(rule, lot_of[rule])] = by_lot.get((rule, lot_of[rule]), 0) + points
        plan.lines[req.line_no] = ReturnedLine(
            qty=str(req.qty),
            amount=_share(sold_line.amount, sum(b.amount for b in before), fraction, completes),
            points_reversed=reversed_,
            points_refunded=_share(sold_line.redeemed, sum(b.points_refunded for b in before), fraction, completes),
            discount_refunded=_share(sold_line.discount, sum(b.discount_refunded for b in before), fraction,
                                     completes),
            by_rule=msgspec.json.encode(by_rule))
    counter_of = {(lot, rule): counter for kind, lot, rule, counter, _ in postings if kind == "accrual"}
    # An anonymous receipt's points went to no lot: there is nothing to post.
    plan.reversals = [(lot, rule, points, counter_of[(lot, rule)])
                      for (rule, lot), points in by_lot.items() if points and lot is not None]
    plan.refunds = _refunds(postings, plan.refunded_points)
    return plan


def _pairs_left(pairs: dict[str, int], before: list[ReturnedLine]) -> dict[str, int]:
    left = dict(pairs)
    for b in before:
        for rule, points in msgspec.json.decode(b.by_rule).items():
            left[rule] -= points
    return left


def _refunds(postings: Postings, points: int) -> list[tuple[int, int, str]]:
    """Give spent points back to the lots they came from, most recently drawn first,
    so they keep their original expiry."""
    refundable: dict[tuple[int, str], int] = {}
    for kind, lot, _, counter, pts in postings:
        if kind in ("redemption", "refund"):
            refundable[(lot, counter)] = refundable.get((lot, counter), 0) - pts
    out = []
    for lot, counter in reversed(list(refundable)):
        if points == 0:
            break
        take = min(points, refundable[(lot, counter)])
        if take > 0:
            out.append((lot, take, counter))
            points -= take
    return out


def plan_cancel(postings: Postings) -> tuple[list[tuple[int, str, int, str]], list[tuple[int, int, str]]]:
    """Everything the receipt still holds: accruals not yet reversed, spends not yet refunded."""
    earned: dict[tuple[int, str, str], int] = {}
    for kind, lot, rule, counter, pts in postings:
        if kind in ("accrual", "reversal"):
            earned[(lot, rule, counter)] = earned.get((lot, rule, counter), 0) + pts
    reversals = [(lot, rule, pts, counter) for (lot, rule, counter), pts in earned.items() if pts > 0]
    outstanding = sum(-pts for kind, _, _, _, pts in postings if kind in ("redemption", "refund"))
    return reversals, _refunds(postings, outstanding)


@dataclass(frozen=True)
class LotFacts:
    """What a take-back needs of a lot it touches: when it expires and how many points its
    expiry postings have taken from it so far."""
    expires_on: str | None
    expired: int


def take_back_postings(reversals, refunds, lots: dict[int, LotFacts], today: str) -> list[Posting]:
    """The postings of a return or a cancel. Points earned on a lot that has expired since
    are taken from the expiry account, not from the member (who no longer had them); spent
    points refunded to an expired lot go back expired. Reversals come first, and each sees
    the expiry postings planned before it, as it would in the ledger."""
    expired = {lot: facts.expired for lot, facts in lots.items()}
    out: list[Posting] = []
    for lot, rule, points, counter in reversals:
        out.append(Posting("reversal", -points, counter, lot, rule=rule))
        back = min(points, expired[lot]) if _expired(lots[lot], today) else 0
        if back > 0:
            out.append(Posting("expiry", back, EXPIRY, lot))
            expired[lot] -= back
    for lot, points, counter in refunds:
        out.append(Posting("refund", points, counter, lot))
        if _expired(lots[lot], today):
            out.append(Posting("expiry", -points, EXPIRY, lot))
            expired[lot] += points
    return out


def _expired(lot: LotFacts, today: str) -> bool:
    return lot.expires_on is not None and lot.expires_on <= today


@dataclass
class ReferralTakeBack:
    """What a cancel or a whole return of a referee's first purchase takes back of the
    referral reward it paid: postings per (member it was paid to, the reward's ref), and
    the fires of the occasion forgotten, so that the referee's next first purchase pays again."""
    referee_id: int
    postings: list[tuple[int, str, list[Posting]]] = field(default_factory=list)
    forget: list[tuple[int, str]] = field(default_factory=list)    # (member it fired for, event id)
    # The referrer the reward is paid to again, as the first purchase's that follows a
    # cancelled one (the occasion forgotten first, so it fires once more); None: no payment.
    pay_to: int | None = None
    pay_for: ReceiptKey | None = None   # that first purchase, which the referrer's event names

    def by_member(self) -> dict[int, int]:
        """Points taken back, by the member they were paid to."""
        out: dict[int, int] = {}
        for member_id, _, postings in self.postings:
            out[member_id] = out.get(member_id, 0) - sum(p.points for p in postings if p.kind == "reversal")
        return out


def plan_referral_take_back(referral, referee_id: int | None, cancel: bool, today: str) -> ReferralTakeBack | None:
    """referral: storage.referrals.Referral of the receipt's member, None for one nobody
    referred. The reward belongs to the referee's first purchase: a cancel of it takes the
    reward back (expired points from the expiry account, as a return does) unless another
    receipt of the referee stands, which is then the first purchase and keeps it; a cancel
    makes the next receipt a first purchase, so the occasion is forgotten. A return of the
    whole of it takes the reward back but leaves receipt_number, and the occasion, as they
    are. Nothing is taken twice: a reward taken back gives no points any more.

    A cancel of a first purchase whose whole return took the reward back, while another
    receipt of the referee stands, pays the reward again: that receipt is the first
    purchase now, and its reward is due, unless it was wholly returned too (a whole return
    of the first purchase takes the reward back)."""
    if referral is None or not referral.first_purchase:
        return None
    if cancel and referral.others:
        # A reward still paid stays with the receipt after; one taken back is due to it again.
        if referral.rewards or referral.successor is None or (
                referral.successor_returned
                and returns_whole(referral.successor_sold, referral.successor_returned, ())):
            return None
        return ReferralTakeBack(referee_id, forget=list(referral.fires), pay_to=referral.referrer,
                                pay_for=referral.successor)
    plan = ReferralTakeBack(referee_id, forget=list(referral.fires) if cancel else [])
    for reward in referral.rewards:
        postings = take_back_postings([(reward.lot_id, None, reward.points, reward.counter)], [],
                                      {reward.lot_id: LotFacts(reward.expires_on, reward.expired)}, today)
        plan.postings.append((reward.member_id, reward.ref, postings))
    return plan if plan.postings or plan.forget else None


def returns_whole(sold: dict, prior: dict, lines) -> bool:
    """Whether, with this return, every unit of every line of the receipt has come back."""
    now_returned: dict[int, Decimal] = {}
    for line in lines:
        now_returned[line.line_no] = now_returned.get(line.line_no, Decimal(0)) + line.qty
    return all(sum((Decimal(b.qty) for b in prior.get(n, [])), now_returned.get(n, Decimal(0))) >= Decimal(rec.qty)
               for n, rec in sold.items())
