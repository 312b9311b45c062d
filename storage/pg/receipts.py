"""The receipt path on PostgreSQL: a confirm or a calculate as one transaction of its own.

The same steps as on SQLite (server/ops/receipts.py): read the member once
(server/member_state.py), plan (server/plan.py), answer from the plan (server/answer.py),
apply the plan. What the one SQLite writer gave for free is explicit here:

- The member's row is locked before their state is read, so two receipts of one member,
  in two processes, run one after the other and the second plans against the first's
  postings, holds and rule uses: no point is spent twice.
- The receipt's key is the receipts table's unique key. The same receipt sent to two
  processes at once: both find no stored receipt, the second waits (at the member's lock,
  or at the key for a receipt without a card) until the first commits, and its insert
  then fails on the key; Connection.transaction runs it again, and it finds the stored
  receipt and answers 200, replayed, from it.

Not yet here: the events outbox (webhooks), segments, personal offers, coupon campaigns and
control groups, whose tables the PostgreSQL schema does not have yet; a program that uses
one is refused with Unsupported before anything is read or written.
"""
from __future__ import annotations

from datetime import datetime, timedelta

from rules import Program
from server.answer import calculate_answer, confirm_answer
from server.answer_types import CalculateAnswer, ConfirmAnswer
from server.member_state import read_member_state
from server.ops import JSON, replay
from server.ops.receipts import _cancelled_replay
from server.plan import evaluate, key_of, local_day, plan_calculate, plan_confirm
from storage import accounts, ledger, line_records
from storage.apply import Confirmed, _postings, apply_calculate
from storage.ledger import PostingRef, iso
from storage.pg import ledger as pg_ledger
from storage.pg.connection import Connection


class Unsupported(RuntimeError):
    """A plan needs a part of the ledger the PostgreSQL backend does not write yet."""


def confirm(conn: Connection, program: Program, receipt, card: str | None, body: bytes, fingerprint: str,
            now: datetime, coupon_mac=None) -> tuple[int, ConfirmAnswer | dict]:
    """(201, the answer) for a receipt confirmed now, (200, the stored answer) for one
    confirmed before with the same body; idempotency_conflict (409) for another body."""
    return conn.transaction(lambda c: _confirm_in_tx(c, program, receipt, card, body, fingerprint, now, coupon_mac))


def supported(program: Program) -> None:
    """Unsupported when the program needs tables the PostgreSQL schema does not have yet."""
    missing = [name for name, used in (("segments", program.segments), ("personal offers", program.personal_rule_ids),
                                       ("coupon campaigns", program.coupons),
                                       ("control groups", program.holdout_rules)) if used]
    if missing:
        raise Unsupported(f"program {program.id} uses {', '.join(missing)}, not kept on PostgreSQL yet")


def _confirm_in_tx(conn: Connection, program: Program, receipt, card, body, fingerprint, now, coupon_mac):
    supported(program)
    stored = ledger.get_receipt(conn, key_of(receipt))
    if stored is not None:
        answer = replay(stored.body_sha256, fingerprint, stored.result)
        if stored.status == "cancelled":
            answer = _cancelled_replay(conn, program, answer, stored.member_id, now)
        return 200, answer
    if card is not None:
        pg_ledger.lock_member_by_card(conn, card)   # no member: read_member_state refuses the card
    state = read_member_state(conn, receipt, program, now, card, coupon_mac)
    planned = plan_confirm(receipt, state, program, now, evaluate(program, receipt, state, local_day(program, now)))
    answer = confirm_answer(planned, program)
    apply_confirm(conn, Confirmed(planned, receipt, program, now, body, bytes.fromhex(fingerprint),
                                  JSON.encode(answer)))
    return 201, answer


def apply_confirm(conn: Connection, c: Confirmed) -> None:
    """storage/apply.py apply_confirms for one confirm: its hold consumed, its lots, its
    postings chained to its member's, its rule uses, its receipt row, its event points.

    Sent as one pipeline: the writes after the last read they need (the new lots' ids, the
    chain head) go out together and are answered at once, where each executemany alone
    waited for its own answer (benchmarks/RESULTS.md: 19 % less time and 13 % less client
    CPU a confirm). An error, the receipt's key taken meanwhile among them, is raised when
    the pipeline ends, inside the transaction, which runs again as it would have."""
    supported(c.program)
    with conn.raw.pipeline():
        _apply(conn, c)


def _apply(conn: Connection, c: Confirmed) -> None:
    plan, now = c.plan, iso(c.now)
    ids: list[int] = []
    if plan.member is not None:
        ids = pg_ledger.new_lots(conn, [(plan.member.id, *ledger.lot_dates(lot.available_from, lot.expires_on),
                                         lot.points) for lot in plan.lots])
        if plan.hold is not None:
            ledger.close_holds(conn, [(now, plan.key)], "consumed")
        pg_ledger.append_postings(conn, _postings(c, ids))
        if plan.expired_lots:
            conn.executemany("UPDATE lots SET expiry_done = 1 WHERE id = ?", [(ids[at],) for at in plan.expired_lots])
        if plan.rule_uses:
            ledger.record_fires(conn, [(plan.member.id, rule, str(plan.evaluation.local_date), *plan.key)
                                       for rule in plan.rule_uses])
    lines = line_records.encode(line_records.with_lots(
        plan.lines, {rule: ids[at] for rule, at in plan.lines.lots.items()} if ids else {}))
    ledger.insert_receipts(conn, [ledger.receipt_row(
        plan.key, body_sha256=c.fingerprint, member_id=plan.member.id if plan.member else None,
        ts=iso(c.receipt.ts), local_date=str(plan.evaluation.local_date), total=c.receipt.total,
        rules_version=c.program.version, body=c.body, result=c.answer, lines=lines, now=now)])
    for event in plan.events:
        if event.member_id != plan.member.id:
            pg_ledger.lock_member(conn, event.member_id)     # a referrer's points: their lock too
        fire_events(conn, c.program, event.member_id, event.on, event.occasion, c.now)


def fire_events(conn: Connection, program: Program, member_id: int, on: str, occasion: str, now: datetime) -> None:
    """storage/apply.py fire_events: each event rule for `on` credited at most once per
    member and occasion. The caller holds the member's lock."""
    today = now.astimezone(program.timezone).date()
    for event in program.events_on(on):
        if event.points <= 0 or not pg_ledger.fire_event_once(conn, member_id, event.id, occasion, iso(now)):
            continue
        days = event.expires_in_days if event.expires_in_days is not None else program.expiry_days
        expires = today + timedelta(days=days) if days else None
        at = PostingRef(effective_at=iso(now), created_at=iso(now), rules_version=program.version,
                        ref=f"event:{event.id}:{occasion}")
        pg_ledger.credit(conn, member_id, event.points, today, expires, "event", accounts.ISSUE_PROGRAM, at,
                         rule_id=event.id)


def calculate(conn: Connection, program: Program, receipt, card: str, now: datetime,
              coupon_mac=None) -> CalculateAnswer:
    """A calculate of a member's receipt: its hold put, moved or released under the
    member's lock, so a hold taken through one process is seen by every other."""
    supported(program)

    def in_tx(c: Connection) -> CalculateAnswer:
        pg_ledger.lock_member_by_card(c, card)
        state = read_member_state(c, receipt, program, now, card, coupon_mac)
        plan = plan_calculate(receipt, state, program, now, evaluate(program, receipt, state,
                                                                     local_day(program, now)))
        apply_calculate(c, plan, now)       # its statements are the same on both databases
        return calculate_answer(plan, program)
    return conn.transaction(in_tx)

