"""Receipts: calculate, confirm and cancel.

A calculate or confirm is: read the member once (server/member_state.py) -> plan
(server/plan.py, no database, no clock) -> answer from the plan (server/answer.py) ->
apply the plan (storage/apply.py). Confirms are grouped writes (storage.db.Grouped): the
confirms of one batch are planned one after another, each against the state the earlier
ones leave, and applied together with one statement per table. A cancel plans from the
receipt's postings (server/returns.py) and applies through storage/ledger.py.
"""
from __future__ import annotations

import time
from datetime import datetime, timedelta

import msgspec

from rules import Program
from server import schema, webhooks
from server.answer import calculate_answer, cancel_answer, confirm_answer, points_words, receipt_ref
from server.answer_types import CalculateAnswer, CancelAnswer, ConfirmAnswer, ReceiptBalance
from server.auth import Principal, require_store
from server.errors import ApiError, problems_error
from server.member_state import TierTotals, judge_codes, read_member_state, tier_after_receipt
from server.ops import JSON, Deps, count, replay, sha256
from server.ops.members import balance_now
from server.plan import MemberState, evaluate, insufficient_points, local_day, plan_calculate, plan_confirm
from server.privacy import candidates
from server.returns import LotFacts, plan_cancel, plan_referral_take_back, take_back_postings
from server.validation import DAY_EARLIEST, DAY_LATEST, DAY_RANGE, Problems
from storage import coupons, imports, ledger, member_care, offers, receipt_takes, referrals
from storage.apply import (Confirmed, ReferralMoves, apply_calculate, apply_confirms, apply_referral_take_back,
                           apply_take_back)
from storage.db import Flush, Grouped, Ready
from storage.ledger import InsufficientPoints, PostingRef, iso
from storage.segments import MembershipCache
from storage.sql import is_postgresql

FUTURE_TS_TOLERANCE = timedelta(minutes=5)


def check_receipt(receipt: schema.Receipt, principal: Principal, now: datetime) -> None:
    """One 422 naming every problem of a well-typed receipt, as for a mistyped one. now: the
    moment the operation runs at, read once (the clock costs as much as the checks of a line)."""
    require_store(principal, receipt.store_id)
    found = Problems()
    if receipt.ts.tzinfo is None:
        found.add("ts", "needs a UTC offset, e.g. 2026-11-24T12:00:00+02:00")
    elif not DAY_EARLIEST <= receipt.ts.date() <= DAY_LATEST:
        found.add("ts", DAY_RANGE)
    elif receipt.ts - now > FUTURE_TS_TOLERANCE:
        found.add("ts", "is more than 5 minutes in the future")
    line_problems(receipt.lines, found)
    total = sum(line.amount for line in receipt.lines)
    if total != receipt.total:
        found.add("total", f"must equal the sum of line amounts ({total})")
    if found.count:
        raise problems_error(found)


def _timed(program: Program, receipt, state: MemberState | None, today: str, seconds: list[float]):
    """seconds: gets the evaluation's time, observed once the transaction is over (a write
    function may run again when another in its batch ended the transaction)."""
    started = time.perf_counter()
    try:
        return evaluate(program, receipt, state, today)
    finally:
        seconds.append(time.perf_counter() - started)


def _observe(deps: Deps, seconds: list[float]) -> None:
    if seconds:     # the last run is the one that counted
        deps.metrics.rules_eval.observe(seconds[-1])


async def calculate(deps: Deps, receipt: schema.Receipt, principal: Principal) -> CalculateAnswer:
    program, now = deps.program(), deps.clock.now()
    check_receipt(receipt, principal, now)
    card = None if receipt.card is None else deps.privacy.card(receipt.card)
    seconds: list[float] = []
    try:
        if card is None:     # anonymous: nothing to hold; its stored answer or its codes, in one read
            stored, codes = await deps.db.read(
                lambda conn: _stored_or_codes(conn, program, receipt, now, deps.privacy.coupon))
            if stored is not None:
                result = as_calculate(stored)
            else:
                ev = _timed(program, receipt, None, local_day(program, now), seconds)
                result = calculate_answer(plan_calculate(receipt, None, program, now, ev, codes), program)
        else:
            result = await deps.db.write(lambda conn: _calculate_in_tx(conn, program, receipt, now, card, seconds,
                                                                       deps.privacy.coupon, deps.segments))
    finally:
        _observe(deps, seconds)
    count(deps, "calculate", 200, result)     # `replayed` for a receipt already confirmed
    return result


def _stored_or_codes(conn, program: Program, receipt: schema.Receipt, now: datetime,
                     coupon_mac) -> tuple[ConfirmAnswer | None, coupons.Judged | None]:
    """A receipt without a card: its stored answer when it was confirmed, else its codes judged."""
    stored = stored_answer(conn, program, receipt, None, now)
    return (stored, None) if stored is not None else (None, judge_codes(conn, receipt, program, coupon_mac))


def _calculate_in_tx(conn, program: Program, receipt: schema.Receipt, now: datetime, card: str,
                     seconds: list[float], coupon_mac, kept: MembershipCache | None = None) -> CalculateAnswer:
    # The member's lock first (PostgreSQL): its hold is seen by the member's next write, and
    # a confirm of this receipt that committed while this waited is read below, so no hold
    # is put for a receipt already confirmed (no confirm would ever take it).
    locked = ledger.lock_member_of_card(conn, card)
    stored = stored_answer(conn, program, receipt, card, now)
    if stored is not None:
        return as_calculate(stored)
    state = _locked_member_state(conn, locked, receipt, program, now, card, coupon_mac, kept)
    plan = plan_calculate(receipt, state, program, now, _timed(program, receipt, state, local_day(program, now),
                                                               seconds))
    apply_calculate(conn, plan, now)
    return calculate_answer(plan, program)


async def confirm(deps: Deps, receipt: schema.Receipt,
                  principal: Principal) -> tuple[int, ConfirmAnswer, bytes | None]:
    """(status, answer, the answer as JSON when it was encoded to be stored, else None). A new
    receipt's answer is encoded once, as its row stores it: the HTTP body is the same bytes."""
    program, now = deps.program(), deps.clock.now()
    check_receipt(receipt, principal, now)
    card = None if receipt.card is None else deps.privacy.card(receipt.card)
    # Stored and fingerprinted with the card's HMAC in place of the number.
    body = schema.canonical(receipt if card is None else msgspec.structs.replace(receipt, card=card))
    fingerprint = sha256(body)
    seconds: list[float] = []
    try:
        status, result, ev, encoded = await deps.db.write_grouped(
            confirm_write(program, receipt, card, body, fingerprint, now, seconds, deps.privacy.coupon, deps.segments))
    except InsufficientPoints as e:
        raise insufficient_points(receipt.redeem_points, e.available, program.redemption_min_points) from None
    finally:
        _observe(deps, seconds)
    # Refusals are counted by their code where the answer is made (server/app.py).
    count(deps, "confirm", status, result)
    if ev is not None:
        add = deps.metrics.points_accrued.add
        for rule, points in ev.by_rule:
            if points:
                add(rule, points)
        if ev.redeemed_points:
            deps.metrics.points_redeemed.inc(ev.redeemed_points)
    return status, result, encoded


def confirm_write(program: Program, receipt: schema.Receipt, card: str | None, body: bytes, fingerprint: str,
                  now: datetime, seconds: list[float], coupon_mac,
                  kept: MembershipCache | None = None) -> Grouped:
    """The confirm as a grouped write: planned against the state the confirms before it in
    its batch leave, then applied with them (storage/apply.py apply_confirms). Its result is
    (status, answer, evaluation, the answer as stored); the last two None for a replay; a
    refusal is raised with nothing written. kept: members' segments kept in memory."""
    key = (receipt.store_id, receipt.register_id, receipt.receipt_id)

    def plan(conn, group: dict):
        if key in group.setdefault("keys", set()):
            raise Flush     # the same receipt twice in one batch: the second is a replay
        answer = stored_answer(conn, program, receipt, card, now, fingerprint)
        if answer is not None:
            return Ready((200, answer, None, None))
        # Several processes (PostgreSQL): the member's other writes wait, or are waited for;
        # the same receipt sent to two then fails on the receipt's key, and runs again as a replay.
        locked = None if card is None else ledger.lock_member_of_card(conn, card)
        state = _locked_member_state(conn, locked, receipt, program, now, card, coupon_mac, kept)
        if state is not None and state.member.id in group.setdefault("members", set()):
            raise Flush     # its lots, holds, limits, offers and tier depend on a plan not yet applied
        codes = judge_codes(conn, receipt, program, coupon_mac) if state is None else None   # a cardless receipt's
        judged = state.coupons if state is not None else codes
        if judged is not None and \
                not group.setdefault("coupons", set()).isdisjoint(h for _, h in judged.usable.values()):
            raise Flush     # a code it may use is one a plan not yet applied uses: judged again after it
        state = _less_budget(state, group.get("budget_used"))
        planned = plan_confirm(receipt, state, program, now,
                               _timed(program, receipt, state, local_day(program, now), seconds), codes)
        answer = confirm_answer(planned, program)
        _count_in_group(group, planned, program)
        encoded = JSON.encode(answer)
        return Confirmed(planned, receipt, program, now, body, bytes.fromhex(fingerprint), encoded,
                         result=(201, answer, planned.evaluation, encoded))
    return Grouped(plan, apply_announced)


# How many times a receipt reads its member again because the card moved under it: each
# time needs another enrolment, replacement or merge of that card committed meanwhile.
CARD_MOVES_MAX = 4


def _locked_member_state(conn, locked: int | None, receipt: schema.Receipt, program: Program, now: datetime,
                         card: str | None, coupon_mac, kept: MembershipCache | None):
    """read_member_state under the lock of the member it reads (PostgreSQL). locked: the
    member lock_member_of_card took, if any. A card enrolled or given by a replacement just
    after that lock found no one belongs to a member whose lock this transaction does not
    hold: a plan read from it would race the member's other writes (a redemption drawn from
    a lot another receipt is spending, a daily limit given twice). So that member is locked
    and read again."""
    state = read_member_state(conn, receipt, program, now, card, coupon_mac, kept)
    if not is_postgresql(conn):
        return state
    for _ in range(CARD_MOVES_MAX):
        if state is None or state.member.id == locked:
            return state
        locked = state.member.id
        ledger.lock_member(conn, locked)
        state = read_member_state(conn, receipt, program, now, card, coupon_mac, kept)
    raise ApiError(503, "try_again", "the card changed members while the receipt was read; nothing was written, "
                   "send it again", headers={"Retry-After": "0"})


def stored_answer(conn, program: Program, receipt: schema.Receipt, card: str | None, now: datetime,
                  fingerprint: str | None = None) -> ConfirmAnswer | None:
    """What a confirm of a receipt already stored answers: its stored result replayed (once
    cancelled, with the balance now), or 409 for another body; None for a new receipt. A
    calculate answers it too, and holds nothing: a confirm would never take that hold."""
    stored = ledger.get_receipt(conn, (receipt.store_id, receipt.register_id, receipt.receipt_id))
    if stored is None:
        return None
    if fingerprint is None:
        fingerprint = sha256(schema.canonical(receipt if card is None else
                                              msgspec.structs.replace(receipt, card=card)))
    answer = replay(stored.body_sha256, as_stored(stored.body_sha256, fingerprint, receipt, card),
                    stored.result, ConfirmAnswer)
    if stored.status == "cancelled":
        answer = _cancelled_replay(conn, program, answer, stored.member_id, now)
    return answer


def as_calculate(stored: ConfirmAnswer) -> CalculateAnswer:
    """A receipt already confirmed, calculated again: its stored answer, holding nothing."""
    return CalculateAnswer(stored.receipt, stored.member_id, stored.rules_version, stored.accrued,
                           stored.redeemed, stored.balance, stored.messages, None, coupons=stored.coupons,
                           replayed=True, cancelled=stored.cancelled)


def as_stored(stored_sha: str, fingerprint: str, receipt: schema.Receipt, card: str | None) -> str:
    """The body's fingerprint as it was taken when the receipt was stored. A body is
    fingerprinted with its card's hash under the key then in force, so a receipt confirmed
    before a card-hash key rotation and sent again after it (or while `privacy rotate-key`
    runs) is compared under each earlier hash of its card, as look-ups try them; only a
    retry whose fingerprint differs pays for it."""
    if stored_sha == fingerprint or card is None:
        return fingerprint
    for older in candidates(card)[1:]:
        earlier = sha256(schema.canonical(msgspec.structs.replace(receipt, card=older)))
        if earlier == stored_sha:
            return earlier
    return fingerprint


def apply_announced(conn, confirms: list[Confirmed]) -> list:
    """apply_confirms, then each member's receipt.confirmed event (and tier.changed), in the
    same transaction. The tier after the receipt is what its plan read at arrival plus the
    receipt; a plan without that (a state not read from the database) counts the stored rows."""
    results = apply_confirms(conn, confirms)
    for c, (status, answer, ev, _) in zip(confirms, results):
        member = c.plan.member
        if member is None:
            continue
        receipt = c.receipt
        tier = None if c.plan.tier_now is None else \
            tier_after_receipt(c.program, member, TierTotals(*c.plan.tier_now), receipt, c.now)
        webhooks.emit_noting_tier(conn, c.program, member.id, "receipt.confirmed", {
            "receipt": msgspec.to_builtins(answer.receipt), "ts": iso(receipt.ts), "total": receipt.total,
            "accrued_points": ev.accrued_points, "redeemed_points": ev.redeemed_points,
            "rules_version": c.program.version, "balance": msgspec.to_builtins(answer.balance)}, c.now,
            card_last4=receipt.card[-4:], member=member, tier=tier)
        for paid in c.referral_paid:
            webhooks.emit_referral(conn, "referral.rewarded", paid, member.id, c.plan.key, "receipt.confirmed", c.now)
    return results


def _less_budget(state: MemberState | None, used: dict[str, int] | None) -> MemberState | None:
    """Budgets are shared by every member: what plans of the batch not yet applied issue
    is not in rule_totals yet, so it is taken off here."""
    if state is None or state.budget_left is None or not used:
        return state
    left = {rule: max(0, points - used.get(rule, 0)) for rule, points in state.budget_left.items()}
    return msgspec.structs.replace(state, budget_left=left)


def _count_in_group(group: dict, planned, program: Program) -> None:
    group.setdefault("keys", set()).add(planned.key)
    members = group.setdefault("members", set())
    if planned.member is not None:
        members.add(planned.member.id)
    members.update(event.member_id for event in planned.events)
    group.setdefault("coupons", set()).update(use.code_hmac for use in planned.coupon_uses)
    used = group.setdefault("budget_used", {})
    for posting in planned.postings:
        for rule, points in posting.rules:
            if rule in program.budgets:
                used[rule] = used.get(rule, 0) + points


def _cancelled_replay(conn, program: Program, answer: ConfirmAnswer, member_id: int | None,
                      now: datetime) -> ConfirmAnswer:
    """The stored answer of a receipt cancelled since, with the balance now of the member
    holding its points: the stored balance and messages (points earned, paid with) no
    longer hold."""
    answer.cancelled = True
    if member_id is None:
        return answer
    member_id = member_care.points_holder(conn, member_id)
    holds = ledger.open_holds(conn, member_id, iso(now))
    balance = ledger.balance_of(ledger.lots_of(conn, member_id), holds, local_day(program, now))
    answer.balance = ReceiptBalance(balance.available, balance.pending, balance.held)
    answer.messages = ["Receipt cancelled", f"Balance: {points_words(balance.available)}"]
    return answer


async def cancel(deps: Deps, key: ledger.ReceiptKey, principal: Principal) -> CancelAnswer:
    require_store(principal, key[0])
    result = await deps.db.write(lambda conn: _cancel_in_tx(deps, conn, key))
    deps.metrics.receipts_of("cancel", result.status).inc()
    if result.reversed is not msgspec.UNSET:
        deps.metrics.points_reversed.inc(result.reversed.points)
    return result


def _cancel_in_tx(deps: Deps, conn, key) -> CancelAnswer:
    program, now = deps.program(), deps.clock.now()
    stored = ledger.get_receipt(conn, key)
    if stored is not None and member_care.lock_receipt(conn, key, stored.member_id):
        stored = ledger.get_receipt(conn, key)      # as the member's writes and the receipt's returns left it
    if stored is None:
        released = ledger.close_hold(conn, key, "released", iso(now))
        return CancelAnswer(receipt_ref(key), "hold_released" if released else "nothing_to_cancel",
                            released_points=released)
    if stored.status == "cancelled":
        # A till resending a void after a timeout still has a balance to print.
        again = CancelAnswer(receipt_ref(key), "cancelled", already=True)
        if stored.member_id is not None:
            again.balance = balance_now(deps, conn, program, member_care.points_holder(conn, stored.member_id))
        return again
    imports.refuse_if_imported(conn, key, "cancelled")   # history brought in earned nothing to take back
    at = PostingRef(effective_at=iso(now), created_at=iso(now), rules_version=program.version, receipt=key,
                    ref="cancel")
    today = local_day(program, now)
    reversed_, refunded = plan_cancel(ledger.receipt_postings(conn, key, stored.member_id))
    referral = plan_referral_take_back(referrals.referral_of(conn, stored.member_id, key), stored.member_id,
                                       True, today)
    holder = None if stored.member_id is None else member_care.lock_points_holder(conn, stored.member_id)
    if holder is not None:
        apply_take_back(conn, stored.member_id, take_back(conn, reversed_, refunded, today), at)
        give_back_customer_value(deps, conn, key, holder)
    moves = None if referral is None else apply_referral_take_back(conn, referral, at, program, now)
    ledger.mark_cancelled(conn, key)
    result = cancel_answer(key, reversed_, refunded)
    if holder is not None:
        result.balance = balance_now(deps, conn, program, holder)
        webhooks.emit_noting_tier(conn, program, holder, "receipt.cancelled", {
            "receipt": msgspec.to_builtins(receipt_ref(key)), "reversed_points": result.reversed.points,
            "refunded_points": result.refunded.points, "balance": msgspec.to_builtins(result.balance),
            "referral_reversed": referral_reversed(moves)}, now)
    if moves is not None:
        announce_referral_moves(conn, moves, referral, key, "receipt.cancelled", now)
    return result


def referral_reversed(moves: ReferralMoves | None) -> list[dict]:
    """The friend's event's account of the rewards its cancel or return took back."""
    return [] if moves is None else [{"member_id": ledger.member_public_id(member_id), "points": points}
                                     for member_id, points in moves.taken]


def announce_referral_moves(conn, moves: ReferralMoves, plan, key, reason: str, now: datetime) -> None:
    """The referrer's events of a cancel's or a return's referral moves, after the friend's
    own: what was taken back, then a reward paid again for the receipt that is the first
    purchase now. plan: the ReferralTakeBack applied; key: the receipt cancelled or returned."""
    for taken in moves.reversed:
        webhooks.emit_referral(conn, "referral.reversed", taken, plan.referee_id, key, reason, now)
    if moves.paid is not None:
        webhooks.emit_referral(conn, "referral.rewarded", moves.paid, plan.referee_id, plan.pay_for, reason, now)


def give_back_customer_value(deps: Deps, conn, key, holder: int) -> None:
    """A cancel, or a return of the whole receipt: the coupon uses and personal offer points
    it took are the customer's again (rules.md), those its row kept (storage/receipt_takes.py)
    and those in rows of their own alike. holder: the member holding the receipt's member's
    points (member_care.points_holder), whose offers a merge made the ones charged."""
    record = receipt_takes.take_out(conn, key)
    coupons.give_back(conn, key, record.codes, lambda code: deps.privacy.forms("coupon", code))
    offers.give_back(conn, key, record.charges, holder)


def take_back(conn, reversals, refunds, today: str) -> list:
    """The take-back's postings, planned from the facts of the lots it touches."""
    facts = ledger.lot_facts(conn, [r[0] for r in reversals] + [r[0] for r in refunds])
    return take_back_postings(reversals, refunds, {lot: LotFacts(*f) for lot, f in facts.items()}, today)


QTY_DECIMALS_MAX = 6
QTY_MAX = 10**9
# Quantities already found valid, by their exact text ("1.0" and "1" are different
# entries): a till sells the same few hundred quantities all day, and checking a Decimal
# through as_tuple() cost ~1.2 us a line, a third of a 34-line receipt's checks.
QTY_KNOWN_GOOD_MAX = 4_096
_qty_known_good: set[str] = set()


def check_lines(lines) -> None:
    """Line numbers are unique; quantities positive, finite, at most 6 decimals: one 422
    naming every line that breaks this."""
    found = Problems()
    line_problems(lines, found)
    if found.count:
        raise problems_error(found)


def line_problems(lines, found: Problems) -> None:
    if len({line.line_no for line in lines}) != len(lines):
        seen = set()
        for i, line in enumerate(lines):
            if line.line_no in seen:
                found.add(f"lines[{i}].line_no", f"repeats line_no {line.line_no}")
            seen.add(line.line_no)
    for i, line in enumerate(lines):
        text = str(line.qty)
        if text not in _qty_known_good:
            if not _qty_problem(line.qty, f"lines[{i}].qty", found):
                if len(_qty_known_good) >= QTY_KNOWN_GOOD_MAX:
                    _qty_known_good.clear()
                _qty_known_good.add(text)


def _qty_problem(qty, path: str, found: Problems) -> bool:
    if not qty.is_finite() or qty <= 0:
        found.add(path, "must be > 0")
        return True
    if qty.as_tuple().exponent < -QTY_DECIMALS_MAX or qty > QTY_MAX:
        found.add(path, f"has more than {QTY_DECIMALS_MAX} decimals or is too large")
        return True
    return False
