"""What a calculate or a confirm does, decided without touching the database or the clock.

The receipt path is: read the member's state once (server/member_state.py) -> plan it here
-> apply the plan (storage/apply.py) -> answer from the plan (server/answer.py). A plan
holds every number the ledger and the answer need, each computed once: the lots with
their dates and points, every posting (redemption draws, accruals, debt repayment, expiry
of points that arrived already expired), the hold change, the rule uses, the line records,
the member facts the rules read (kept with the receipt for backtests) and the events it
fires. Nothing here reads a connection, the clock or a metric, so it is tested with
hand-built states (tests/test_receipt_plan.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, tzinfo
from functools import lru_cache

import msgspec

from rules import MemberFacts, Program
from rules.records import Evaluation
from server.errors import ApiError, unprocessable
from storage import accounts, member_facts, offers, referrals
from storage.coupons import USABLE, Judged
from storage.ledger import (Balance, Hold, Lot, LotTotals, MemberRow, ReceiptKey, after_holds, balance_of, day_text,
                            draw, iso)
from storage.line_records import ReceiptLines, build
from storage.member_facts import ReceiptMemberFacts, TierFacts
from storage.offers import OfferRow


class MemberState(msgspec.Struct, frozen=True):
    """A receipt's member as read once, inside the write transaction."""
    member: MemberRow
    facts: MemberFacts              # as the rules see the member at the receipt's ts
    lots: list[Lot] | None          # lots with points left, debts (below zero) included; None: only their
    #                                 totals were read (lot_totals), for a receipt that neither redeems nor repays
    holds: list[Hold]               # holds reserving points now
    usage: dict[str, int]           # times each limited rule fired within its window at ts
    budget_left: dict[str, int] | None  # points each budgeted rule may still issue
    hold_open: bool                 # a hold under this receipt's key is open, even a lapsed one
    coupons: Judged | None = None   # the receipt's codes judged at its ts; None: it sent none
    tier: TierFacts | None = None   # what facts.tier was computed from, for the receipt's record
    # (receipts, net spend) the member's tier at arrival counts before this receipt: the
    # tier.changed check after it adds the receipt instead of counting again
    tier_now: tuple[int, int] | None = None
    offer_rows: list[OfferRow] = []     # the offers behind facts.offers, which a confirm charges
    lot_totals: LotTotals | None = None     # the lots summed at arrival, when `lots` were not read

    def own_hold(self, key: ReceiptKey) -> int:
        return sum(h.points for h in self.holds if h.key == key)


class NewLot(msgspec.Struct, frozen=True):
    available_from: date
    expires_on: date | None
    points: int                     # what its accruals bring


class Posting(msgspec.Struct, frozen=True):
    """One transfer between the member and `counter`. The lot is an existing lot's id, or
    (new_lot) the index of one of the plan's new lots."""
    kind: str
    points: int
    counter: str
    lot: int
    new_lot: bool = False
    rule: str | None = None         # an accrual's: the lot's one earning rule, else None (see rules)
    rules: tuple[tuple[str, int], ...] = ()     # an accrual's points by rule (posting_rules)
    of_receipt: bool = True         # False: effective at `effective_at`, not the receipt's ts, without its key
    effective_at: str | None = None
    lot_dates: tuple[str, str | None] | None = None     # an existing lot's, as stored


class HoldChange(msgspec.Struct, frozen=True):
    action: str                     # put | consume | release
    points: int = 0
    expires_at: datetime | None = None


class CouponUse(msgspec.Struct, frozen=True):
    campaign: str
    code_hmac: str
    uses_per_code: int


class OfferCharge(msgspec.Struct, frozen=True):
    """What a personal rule gave, charged to the member's offers of it: `takes` is what each
    budget gives (offer id, points), the one ending first first (storage/offers.py takes);
    None when an offer of the rule has no budget, which nothing is charged to."""
    rule: str
    points: int
    takes: tuple[tuple[str, int], ...] | None


class EventFire(msgspec.Struct, frozen=True):
    member_id: int
    on: str
    occasion: str


@dataclass
class ReceiptPlan:
    key: ReceiptKey
    evaluation: Evaluation
    today: str                      # the program's local date when the receipt arrived
    member: MemberRow | None = None
    lots: list[NewLot] = field(default_factory=list)
    postings: list[Posting] = field(default_factory=list)
    expired_lots: list[int] = field(default_factory=list)   # new lots whose points expired on arrival
    hold: HoldChange | None = None
    rule_uses: list[str] = field(default_factory=list)
    lines: ReceiptLines | None = None   # its lots are indexes of `lots` until applied
    events: list[EventFire] = field(default_factory=list)
    balance: Balance | None = None  # the member's balance once the plan is applied
    # What the receipt sent as coupons, each with its status for the answer (docs/integrators.md); None: it sent none.
    coupon_statuses: list[tuple[str, str]] | None = None
    coupon_uses: list[CouponUse] = field(default_factory=list)   # one use of each code a fired rule needed
    offer_charges: list[OfferCharge] = field(default_factory=list)
    held_out: list[tuple[str, int]] = field(default_factory=list)  # (rule, points a control member was not given)
    member_facts: ReceiptMemberFacts | None = None    # what the rules knew of the member, kept with the receipt
    tier_now: tuple[int, int] | None = None     # MemberState.tier_now


def local_day(program: Program, moment: datetime) -> str:
    return _local_day(moment, program.timezone)


def local_date(program: Program, moment: datetime) -> date:
    """moment's date in the program's timezone. A receipt asks it of its ts and of its
    arrival several times (limits, tier, offers, the plan, the tier after it): remembered,
    since converting costs several times a look-up."""
    return _local_date(moment, program.timezone)


@lru_cache(maxsize=256)
def _local_date(moment: datetime, zone: tzinfo) -> date:
    return moment.astimezone(zone).date()  # equal moments are the same instant: the same date


@lru_cache(maxsize=256)
def _local_day(moment: datetime, zone: tzinfo) -> str:
    # Remembered as text too: a date's isoformat() costs more than the look-up of the date.
    return day_text(_local_date(moment, zone))


def evaluate(program: Program, receipt, state: MemberState | None, today: str) -> Evaluation:
    """The rules on the receipt; a refused redemption is an ApiError."""
    available = 0
    if state is None:
        ev = program.evaluate(receipt, None, 0, 0, {})
    else:
        # What the member may spend matters only to a redemption: most receipts ask none.
        # Its own hold is what it may spend again; the others' holds are reserved from it.
        key = key_of(receipt)
        available = 0 if not receipt.redeem_points else \
            balance_of(lots_read(state), [h for h in state.holds if h.key != key], today).available
        ev = program.evaluate(receipt, state.facts, receipt.redeem_points, available, state.usage, state.budget_left)
    if ev.redeem_refusal:
        raise refusal(ev.redeem_refusal, program, ev.redeem_most, receipt.redeem_points, available)
    return ev


def key_of(receipt) -> ReceiptKey:
    return receipt.store_id, receipt.register_id, receipt.receipt_id


def refusal(code: str, program: Program, most: int | None = None, asked: int = 0, available: int = 0) -> ApiError:
    """most: the most the receipt lets be paid with points, when that (not the request) is
    below the minimum: the register should not ask for more points, it cannot. asked and
    available: the points the receipt asked for and those the member may spend on it."""
    if code == "insufficient_points":
        return insufficient_points(asked, available, program.redemption_min_points)
    if most is not None:
        message = (f"this receipt may be paid with at most {most} points (its lines that points may pay for), "
                   f"fewer than the {program.redemption_min_points} that must be redeemed at once")
    else:
        message = f"at least {program.redemption_min_points} points must be redeemed at once"
    return unprocessable(code, message, [{"path": "redeem_points", "message": message}])


def insufficient_points(asked: int, available: int, min_points: int = 0, path: str = "redeem_points") -> ApiError:
    """The member's points fall short. The cashier offers what there is, so the message
    says how many the member may spend (its own hold counts for a receipt; every other
    receipt's hold is set aside) and how many were asked for; `details` says it on `path`,
    the field that asked."""
    message = (f"{asked} point{'' if asked == 1 else 's'} asked for; the member has {max(available, 0)} available "
               f"after what registers hold for other receipts")
    if min_points > 1 and available < min_points:
        message += f", fewer than the {min_points} that must be redeemed at once"
    return unprocessable("insufficient_points", message, [{"path": path, "message": message}])


def plan_calculate(receipt, state: MemberState | None, program: Program, now: datetime,
                   ev: Evaluation | None = None, codes: Judged | None = None) -> ReceiptPlan:
    """A calculate holds the points it would redeem (replacing this receipt's earlier hold)
    until the confirm. ev: the evaluation when the caller timed it already; codes: the codes
    of a receipt without a card, judged (coupon_statuses)."""
    key, today = key_of(receipt), local_day(program, now)
    ev = ev or evaluate(program, receipt, state, today)
    plan = ReceiptPlan(key, ev, today)
    plan.coupon_statuses = coupon_statuses(receipt, state, ev, codes)
    if state is None:
        return plan
    plan.member = state.member
    holds = [h for h in state.holds if h.key != key]
    if ev.redeemed_points:
        expires_at = now + timedelta(minutes=program.hold_ttl_minutes)
        plan.hold = HoldChange("put", ev.redeemed_points, expires_at)
        holds.append(Hold(key, ev.redeemed_points, iso(expires_at)))
    elif state.own_hold(key):
        plan.hold = HoldChange("release")
    plan.balance = member_balance(state, holds, today)
    return plan


def plan_confirm(receipt, state: MemberState | None, program: Program, now: datetime,
                 ev: Evaluation | None = None, codes: Judged | None = None) -> ReceiptPlan:
    """A confirm: the redemption drawn from the member's lots (soonest expiry first), one
    new lot per distinct pair of dates its rules give, one accrual on each (split by rule),
    debts paid back from the new points, points already expired when they arrived expired,
    the limited rules' uses, a referrer's first-purchase event, the line records. codes: as
    plan_calculate's."""
    key, today = key_of(receipt), local_day(program, now)
    ev = ev or evaluate(program, receipt, state, today)
    plan = ReceiptPlan(key, ev, today)
    plan.coupon_statuses = coupon_statuses(receipt, state, ev, codes)
    sold = [(line.line_no, line.qty, line.amount) for line in receipt.lines]
    if state is None:
        plan.lines = build(sold, ev.pairs, ev.redeemed_by_line, {})
        return plan
    plan.member, plan.tier_now = state.member, state.tier_now
    partner = partner_of(program, receipt.store_id)
    if state.hold_open:
        plan.hold = HoldChange("consume")
    holds = [h for h in state.holds if h.key != key]
    # Copies of the member's lots this receipt draws from or repays, by id; the others are
    # the state's own, which nothing here changes: copying every lot cost more than the rest.
    changed: dict[int, Lot] = {}
    if ev.redeemed_points:
        _redeem(plan, lots_read(state), changed, ev.redeemed_points, today, sum(h.points for h in holds),
                accounts.redemption_account(partner))
    lot_of_rule = _accrue(plan, program, ev, accounts.issue_account(partner))
    new_remaining = [lot.points for lot in plan.lots]
    debts = [lot for lot in state.lots or () if lot.remaining < 0]   # totals alone: the member has none
    if debts:
        changed.update((lot.id, _copy(lot)) for lot in debts)  # draw never takes from a debt
        _repay(plan, changed, new_remaining, today)
    _expire_on_arrival(plan, program, new_remaining, today)
    plan.rule_uses = [r for r in ev.fired if r in state.usage]
    _customer_value(plan, program, state, ev)
    plan.member_facts = recorded_facts(state, plan)
    if state.member.referred_by is not None and state.facts.receipt_number == 1:
        plan.events.append(EventFire(state.member.referred_by, "referred_first_purchase",
                                     referrals.occasion(state.member.id)))
    plan.lines = build(sold, ev.pairs, ev.redeemed_by_line, lot_of_rule)
    new = [Lot(-1 - i, day_text(lot.available_from), _text(lot.expires_on), points)
           for i, (lot, points) in enumerate(zip(plan.lots, new_remaining)) if points]
    plan.balance = member_balance(state, holds, today, new, changed)
    return plan


def member_balance(state: MemberState, holds: list[Hold], today: str, new: list[Lot] | None = None,
                   changed: dict[int, Lot] | None = None) -> Balance:
    """The member's balance on `today` with the receipt's `new` lots and the `changed`
    copies of the lots it drew from or repaid. When only the totals were read nothing was
    drawn or repaid, so the totals are as they were."""
    new = new or []
    if state.lots is None:
        return with_totals(balance_of(new, [], today), state.lot_totals, holds)
    lots = [changed.get(lot.id, lot) for lot in state.lots] if changed else state.lots
    return balance_of(lots + new, holds, today)    # a lot drawn to zero counts nothing


def lots_read(state: MemberState) -> list[Lot]:
    """The member's lots, which a redemption draws from: read_member_state reads them for a
    receipt that asks to redeem, and only their totals otherwise."""
    if state.lots is None:
        raise RuntimeError("a redemption was planned against lot totals: its member's lots were not read")
    return state.lots


def with_totals(balance: Balance, totals: LotTotals, holds: list[Hold]) -> Balance:
    """`balance` (of the lots a receipt adds) with the member's other lots counted from
    their totals, then the holds reserving from them all. Their dates were not read, so
    `expiring` is left empty: no receipt answer shows it. `owed` is the new lots' (none):
    totals are read only for a member without debts."""
    available, held = after_holds(balance.available + totals.available, holds)
    return Balance(available, balance.pending + totals.pending, held, [], balance.owed)


def _redeem(plan: ReceiptPlan, lots: list[Lot], changed: dict[int, Lot], points: int, today: str, reserved: int,
            counter: str) -> None:
    """The redemption drawn from the member's lots (soonest expiry first), each lot drawn
    from copied into `changed` with what it keeps."""
    by_id = {lot.id: lot for lot in lots}
    for lot_id, taken in draw(lots, points, today, reserved):
        lot = by_id[lot_id]
        plan.postings.append(Posting("redemption", -taken, counter, lot_id, lot_dates=_dates(lot)))
        changed[lot_id] = Lot(lot.id, lot.available_from, lot.expires_on, lot.remaining - taken)


def coupon_statuses(receipt, state: MemberState | None, ev: Evaluation,
                    codes: Judged | None = None) -> list[tuple[str, str]] | None:
    """Each code the receipt sent with its status: a usable code is `applied` when a fired
    rule needed it, else `not_needed` (it keeps its use); the others say why they do not
    apply (unknown, used, expired, ...). A receipt without a card earns nothing, so none of
    its codes is needed: `codes` are its codes judged (server/member_state.py judge_codes)."""
    sent = getattr(receipt, "coupons", None)
    if not sent:
        return None
    judged = state.coupons if state is not None else codes
    if judged is None:      # not judged (a state built by hand): nothing says a code is not usable
        return [(code, "not_needed") for code in sent]
    used = set(ev.coupons_used.values())
    return [(code, ("applied" if code in used else "not_needed") if status == USABLE else status)
            for code, status in judged.statuses]


def _customer_value(plan: ReceiptPlan, program: Program, state: MemberState, ev: Evaluation) -> None:
    """The coupon uses, personal offer charges and control group records the confirm writes."""
    if ev.coupons_used:
        usable = state.coupons.usable
        plan.coupon_uses = [CouponUse(campaign, usable[campaign][1], program.coupons[campaign].uses_per_code)
                            for campaign in ev.coupons_used]
    if state.facts.offers:
        plan.offer_charges = [OfferCharge(rule, points, offers.takes(state.offer_rows, rule, points))
                              for rule, points in ev.by_rule if points > 0 and rule in state.facts.offers]
    plan.held_out = list(ev.held_out)


def recorded_facts(state: MemberState, plan: ReceiptPlan) -> ReceiptMemberFacts | None:
    """The member as the rules saw them on this receipt, for its backtests. The codes are
    kept as their campaign and status only: a code is as good as money until used."""
    facts = state.facts
    if state.tier is None:      # a state not read from the database (tests, benchmarks) has no tier facts
        return None
    charged = {charge.rule: charge.points for charge in plan.offer_charges}
    judged = state.coupons
    codes = [] if judged is None else [
        member_facts.CouponFact(campaign, status) for (_, status), campaign in zip(judged.statuses, judged.campaigns)]
    return ReceiptMemberFacts(
        member_facts.VERSION, facts.member_id, state.tier, sorted(facts.tags), facts.birthday, facts.enrolled_on,
        facts.receipt_number, sorted(facts.segments),
        [member_facts.OfferFact(rule, left, charged.get(rule, 0)) for rule, left in sorted(facts.offers.items())],
        codes, [member_facts.HeldOut(rule, points) for rule, points in plan.held_out])


def _dates(lot: Lot) -> tuple[str, str | None]:
    return lot.available_from, lot.expires_on


def _copy(lot: Lot) -> Lot:
    return Lot(lot.id, lot.available_from, lot.expires_on, lot.remaining)


def _text(day: date | None) -> str | None:
    return None if day is None else day_text(day)


def _accrue(plan: ReceiptPlan, program: Program, ev: Evaluation, counter: str) -> dict[str, int]:
    """One new lot per distinct (activation, expiry) pair, written once with all its points,
    and one accrual posting on it carrying its split by rule: a posting per rule cost a
    hash, four index entries and a trigger each. Returns each earning rule's lot index."""
    usual = (ev.available_from, ev.expires_on)   # program.rule_dates of a rule without its own expiry
    own_expiry = program.rule_expiry_days
    index: dict[tuple, int] = {}
    lot_of_rule: dict[str, int] = {}
    split: list[list[tuple[str, int]]] = []
    for rule, points in ev.by_rule:
        if points <= 0:
            continue
        dates = program.rule_dates(rule, ev.local_date) if rule in own_expiry else usual
        at = index.get(dates)
        if at is None:
            at = index[dates] = len(plan.lots) + len(split)
            split.append([])
        lot_of_rule[rule] = at
        split[at - len(plan.lots)].append((rule, points))
    for (available_from, expires_on), rules in zip(index, split):
        points = sum(points for _, points in rules)
        plan.postings.append(Posting("accrual", points, counter, len(plan.lots), new_lot=True,
                                     rule=rules[0][0] if len(rules) == 1 else None, rules=tuple(rules)))
        plan.lots.append(NewLot(available_from, expires_on, points))
    return lot_of_rule


def _repay(plan: ReceiptPlan, lots: dict[int, Lot], new_remaining: list[int], today: str) -> None:
    """New points first pay back what the member owes (a return of points already spent
    leaves a lot below zero), oldest debt first; not points that expired before arriving."""
    member = accounts.member_account(plan.member.id)
    for at, new in enumerate(plan.lots):
        if expired_by(new.expires_on, today):
            continue
        for debt in sorted((lot for lot in lots.values() if lot.remaining < 0), key=lambda lot: lot.id):
            take = min(new_remaining[at], -debt.remaining)
            if take <= 0:
                break
            plan.postings.append(Posting("repayment", -take, member, at, new_lot=True))
            plan.postings.append(Posting("repayment", take, member, debt.id, lot_dates=_dates(debt)))
            new_remaining[at] -= take
            debt.remaining += take


def _expire_on_arrival(plan: ReceiptPlan, program: Program, new_remaining: list[int], today: str) -> None:
    """A late receipt's points whose expiry date had passed when it arrived are posted and
    expire at once, effective at the first moment of the expiry date as the expiry job
    would have posted them, so no answer ever counts them as spendable."""
    for at, new in enumerate(plan.lots):
        if not expired_by(new.expires_on, today):
            continue
        expired_at = datetime.combine(new.expires_on, datetime.min.time(), program.timezone)
        plan.postings.append(Posting("expiry", -new_remaining[at], accounts.EXPIRY, at, new_lot=True,
                                     of_receipt=False, effective_at=iso(expired_at)))
        plan.expired_lots.append(at)
        new_remaining[at] = 0


def expired_by(expires_on, today: str) -> bool:
    return expires_on is not None and day_text(expires_on) <= today


def partner_of(program: Program, store_id: str) -> str | None:
    store = program.stores.get(store_id)
    return store.partner if store is not None else None
