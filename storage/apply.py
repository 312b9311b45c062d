"""Writes what a plan (server/plan.py, server/returns.py) decided, inside the write transaction.

Nothing here decides: the lots, their points and dates, every posting and its amount come
from the plan. The confirms of one batch are written together (apply_confirms): one
INSERT for all their lots, one for their postings, one for the accruals' split by rule
(posting_rules), one UPDATE of the lots' remaining points, one INSERT of their receipt rows
(each with its line records and member facts);
their coupon uses and personal offer charges likewise, from the rows their plans read
(what each receipt took is kept in its row, storage/receipt_takes.py; on PostgreSQL in rows
of their own).

What a plan reads and writes is its own member's rows, plus two things every member
shares: the budgets' rule_totals (added to once per batch by append_postings; on
PostgreSQL by its triggers, in shards; taken off by the planner for plans of the batch not yet applied) and the ledger's order (posting
ids, the hash chain, lot ids), which follows the one writer. On PostgreSQL a plan is
applied alone in its own transaction: the member's row lock serializes its member, a
budgeted rule's total is read under the rule's lock, and the ids and each member's chain
come from storage/pg/ledger.py.
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from storage import accounts, coupons, ledger, line_records, member_care, member_facts, offers, receipt_takes, referrals
from storage.ledger import PostingRef, iso
from storage.sql import WriteConflict, is_postgresql


def apply_calculate(conn: sqlite3.Connection, plan, now: datetime) -> None:
    if plan.hold is None:
        return
    if plan.hold.action == "put":
        ledger.put_hold(conn, plan.key, plan.member.id, plan.hold.points, iso(now), iso(plan.hold.expires_at))
    else:
        ledger.close_hold(conn, plan.key, "released", iso(now))


@dataclass
class Confirmed:
    """A confirm's plan with what its receipt row needs, for apply_confirms."""
    plan: Any
    receipt: Any
    program: Any
    now: datetime
    body: bytes
    fingerprint: bytes
    answer: bytes
    result: Any = None      # handed back by apply_confirms
    # The referral rewards its first purchase paid, for the referrer's events: set by apply_confirms.
    referral_paid: tuple[ReferralPoints, ...] = ()


class ReferralPoints(NamedTuple):
    """A referral reward paid or taken back: the member holding the referrer's points then
    (the end of its chain of merges), the points, and that member's balance right after."""
    member_id: int
    points: int
    balance: ledger.Balance


def _balance_after(conn: sqlite3.Connection, member_id: int, program, now: datetime) -> ledger.Balance:
    """Read as soon as the points moved: another friend's first purchase in the same batch
    may pay the same referrer next, and each event tells the balance its own change left."""
    day = ledger.day_text(now.astimezone(program.timezone).date())
    return ledger.balance_of(ledger.lots_of(conn, member_id), ledger.open_holds(conn, member_id, iso(now)), day)


def apply_confirms(conn: sqlite3.Connection, confirms: list[Confirmed]) -> list:
    """The confirms' holds, lots, postings, rule uses, receipt rows and events, with one
    statement per table for all of them (their results, in order). The plans were made in
    this order against the state the earlier ones leave; the postings chain in it."""
    lots = [(c.plan.member.id, *ledger.lot_dates(lot.available_from, lot.expires_on), lot.points)
            for c in confirms if c.plan.member is not None for lot in c.plan.lots]
    lot_ids = iter(ledger.new_lots(conn, lots))
    postings, holds, expired, fires, receipts = [], [], [], [], []
    taken = [_taken(c) for c in confirms]
    in_rows = is_postgresql(conn)   # uses and charges as rows of their own there (storage/receipt_takes.py)
    for c, (uses, charges) in zip(confirms, taken):
        plan, now = c.plan, iso(c.now)
        ids = [next(lot_ids) for _ in plan.lots] if plan.member is not None else []
        if plan.member is not None:
            postings += _postings(c, ids)
            holds += [(now, plan.key)] if plan.hold is not None else []
            expired += [(ids[at],) for at in plan.expired_lots]
            fires += [(plan.member.id, rule, ledger.day_text(plan.evaluation.local_date), *plan.key)
                      for rule in plan.rule_uses]
        lines = line_records.encode(line_records.with_lots(plan.lines, {
            rule: ids[at] for rule, at in plan.lines.lots.items()} if ids else {}))
        receipts.append(ledger.receipt_row(
            plan.key, body_sha256=c.fingerprint, member_id=plan.member.id if plan.member else None,
            ts=iso(c.receipt.ts), local_date=ledger.day_text(plan.evaluation.local_date), total=c.receipt.total,
            rules_version=c.program.version, body=c.body, result=c.answer, lines=lines,
            member_facts=None if plan.member_facts is None else member_facts.encode(plan.member_facts),
            takes=None if in_rows else _kept(uses, charges), now=now))
    # Most batches at low load hold one receipt without a hold, a late lot or a limited
    # rule: a statement with nothing to write is not sent.
    if holds:
        ledger.close_holds(conn, holds, "consumed")
    ledger.append_postings(conn, postings)
    if expired:
        conn.executemany("UPDATE lots SET expiry_done = 1 WHERE id = ?", expired)
    if fires:
        ledger.record_fires(conn, fires)
    ledger.insert_receipts(conn, receipts)
    _customer_value(conn, confirms, taken, in_rows)
    for c in confirms:
        if c.plan.events:
            c.referral_paid = _fire_referrals(conn, c)
    return [c.result for c in confirms]


def _fire_referrals(conn: sqlite3.Connection, c: Confirmed) -> tuple[ReferralPoints, ...]:
    """The first purchase's referral events fired: what each paid, to whom."""
    paid = []
    for event in c.plan.events:
        # A referrer merged into another member since: no card reaches it, its points went
        # to that member, and so does its reward (once per occasion there). Looked up under
        # that member's lock: a merge committed meanwhile would strand the reward.
        holder = member_care.lock_points_holder(conn, event.member_id)
        points = fire_events(conn, c.program, holder, event.on, event.occasion, c.now)
        if points:
            paid.append(ReferralPoints(holder, points, _balance_after(conn, holder, c.program, c.now)))
    return tuple(paid)


class CustomerValueConflict(WriteConflict):
    """A coupon use or offer budget the plan counted on was gone when applied. On SQLite the
    planner reads them in this write transaction and keeps two plans of a batch from sharing
    one, so this is a fault, and the batch is rolled back rather than give points twice; on
    PostgreSQL another process used them meanwhile, and the write runs again."""


def _taken(c: Confirmed) -> tuple[list[coupons.CodeUse], list[offers.Charge]]:
    """The code uses and offer charges the confirm's plan counted on (what its member's read found)."""
    plan = c.plan
    if plan.member is None:
        return [], []
    uses = [coupons.CodeUse(plan.key, use.code_hmac, use.uses_per_code, iso(c.now)) for use in plan.coupon_uses]
    charges = [offers.Charge(plan.key, plan.member.id, offer_id, points) for charge in plan.offer_charges
               for offer_id, points in _takes(c, charge)]
    return uses, charges


def _kept(uses: list[coupons.CodeUse], charges: list[offers.Charge]) -> bytes | None:
    """What the receipt's row keeps of its uses and charges (storage/receipt_takes.py)."""
    return receipt_takes.encode([str(use.code_hmac) for use in uses], [(c.offer_id, c.points) for c in charges])


def _customer_value(conn: sqlite3.Connection, confirms: list[Confirmed],
                    taken: list[tuple[list[coupons.CodeUse], list[offers.Charge]]], in_rows: bool) -> None:
    """The codes' uses, the personal offers' budgets and the control group's records, one
    statement of each kind for the batch, from what the plans read (nothing is read again).
    in_rows: each use and charge is also a row of its own (else the receipt's row keeps them)."""
    uses = [use for u, _ in taken for use in u]
    if uses and not coupons.use_codes(conn, uses, in_rows):
        raise CustomerValueConflict(f"a coupon was used up before {[use.receipt_key for use in uses]} applied")
    charges = [charge for _, ch in taken for charge in ch]
    if charges and not offers.charge(conn, charges, in_rows):
        raise CustomerValueConflict(f"an offer budget had less left than {[c.receipt_key for c in charges]} took")
    held_out = [(*c.plan.key, rule, c.plan.member.id, points) for c in confirms if c.plan.member is not None
                for rule, points in c.plan.held_out]
    if held_out:
        conn.executemany("INSERT INTO holdout_points (store_id, register_id, receipt_id, rule_id, member_id, points) "
                         "VALUES (?, ?, ?, ?, ?, ?)", held_out)


def _takes(c: Confirmed, charge) -> tuple[tuple[str, int], ...]:
    """What the offer budgets give of a personal rule's points: all of them, as the rule was
    capped at what the budgets the plan read had left."""
    if charge.takes is None:
        return ()
    if sum(points for _, points in charge.takes) != charge.points:
        raise CustomerValueConflict(f"offers of rule {charge.rule} give {charge.takes} of {charge.points} points "
                                    f"for {c.plan.key}")
    return charge.takes


def _postings(c: Confirmed, lot_ids: list[int]) -> list[ledger.NewPosting]:
    plan, now, version = c.plan, iso(c.now), c.program.version
    ts = iso(c.receipt.ts)
    out = []
    for p in plan.postings:
        if p.new_lot:
            lot_id, new = lot_ids[p.lot], plan.lots[p.lot]
            dates = ledger.lot_dates(new.available_from, new.expires_on)
        else:
            lot_id, dates = p.lot, p.lot_dates
        if p.of_receipt:
            effective, receipt, ref = ts, plan.key, None
        else:
            effective, receipt, ref = p.effective_at, None, f"{p.kind}:{lot_id}"
        out.append(ledger.NewPosting(plan.member.id, lot_id, dates, p.kind, p.points, p.counter, effective, now,
                                     p.rule, version, receipt, ref, counted=p.kind == "accrual" and p.new_lot,
                                     rules=p.rules))
    return out


def fire_events(conn: sqlite3.Connection, program, member_id: int, on: str, occasion: str, now: datetime) -> int:
    """Credits the program's event rules for `on`, each at most once per member and occasion;
    the points pay the member's debts first. The points credited (0: none fired)."""
    today = now.astimezone(program.timezone).date()
    paid = 0
    for event in program.events_on(on):
        if event.points <= 0 or not ledger.fire_event_once(conn, member_id, event.id, occasion, iso(now)):
            continue
        days = event.expires_in_days if event.expires_in_days is not None else program.expiry_days
        expires = today + timedelta(days=days) if days else None
        at = PostingRef(effective_at=iso(now), created_at=iso(now), rules_version=program.version,
                        ref=f"event:{event.id}:{occasion}")
        ledger.credit(conn, member_id, event.points, today, expires, "event", accounts.ISSUE_PROGRAM, at,
                      rule_id=event.id)
        paid += event.points
    return paid


def apply_take_back(conn: sqlite3.Connection, member_id: int, postings, at: PostingRef) -> None:
    """A return's or a cancel's postings (server/returns.py take_back_postings), as planned;
    for a merged member's receipt they then follow its points to the member it was merged into."""
    for p in postings:
        ledger.post(conn, member_id, p.lot, p.kind, p.points, p.counter, at, p.rule)
    member_care.follow_merge(conn, member_id, at)


@dataclass(frozen=True)
class ReferralMoves:
    """What apply_referral_take_back did to the referrer's points."""
    # Per member the reward was paid to: the member holding its points now, and the points
    # taken back (the friend's event lists them so, as `referral_reversed`).
    taken: list[tuple[int, int]]
    reversed: list[ReferralPoints]      # the same, once per member holding the points
    paid: ReferralPoints | None         # the reward paid again, to the member holding the points


def apply_referral_take_back(conn: sqlite3.Connection, plan, at: PostingRef, program, now: datetime) -> ReferralMoves:
    """A referral reward taken back (server/returns.py plan_referral_take_back): each as a
    take-back of its own, under the reward's ref, on the member it was paid to and on to the
    member its points went to since. A reward paid again (plan.pay_to) is fired as a first
    purchase's confirm fires it (apply_confirms), at `now`, once its occasion is forgotten."""
    for member_id, ref, postings in plan.postings:
        apply_take_back(conn, member_id, postings, PostingRef(at.effective_at, at.created_at, at.rules_version,
                                                              ref=ref))
    taken = [(member_care.points_holder(conn, member_id), points) for member_id, points in plan.by_member().items()]
    by_holder: dict[int, int] = {}
    for holder, points in taken:
        by_holder[holder] = by_holder.get(holder, 0) + points
    reversed_ = [ReferralPoints(holder, points, _balance_after(conn, holder, program, now))
                 for holder, points in by_holder.items()]
    if plan.forget:
        referrals.forget(conn, plan.forget, plan.referee_id)
    paid = None
    if plan.pay_to is not None:
        holder = member_care.lock_points_holder(conn, plan.pay_to)
        points = fire_events(conn, program, holder, "referred_first_purchase", referrals.occasion(plan.referee_id),
                             now)
        paid = ReferralPoints(holder, points, _balance_after(conn, holder, program, now)) if points else None
    return ReferralMoves(taken, reversed_, paid)
