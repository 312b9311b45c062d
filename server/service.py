"""What the API does, without HTTP: receipts, returns, members, adjustments.

Concurrency: everything that reads a member's points and then changes them (a receipt's
evaluation and postings, a return, a cancel, an adjustment) runs as one function inside
the single write connection's transaction (storage.db.Database.write), so operations on
one member happen one after another by construction: a receipt sees the postings, limits
and budget use of every receipt written before it, committed or still in the same batch,
and nothing it decided can go stale before it is written. Identical requests in flight
at the same moment therefore write once: the second finds the first one's receipt.
"""
from __future__ import annotations

import hashlib
import sqlite3
import time
from datetime import date, datetime, timedelta
from typing import NamedTuple

import msgspec

from rules import MemberFacts, Program
from server import schema
from server.auth import Principal, require_store
from server.clock import Clock
from server.errors import ApiError, conflict, field_error, forbidden, not_found, unprocessable
from server.metrics import Metrics
from server.privacy import Privacy
from server.programs import ProgramHolder
from server.returns import pairs_to_store, plan_cancel, plan_return, receipt_lines
from server import webhooks
from storage import accounts, events, ledger
from storage.db import Database
from storage.ledger import InsufficientPoints, PostingRef, iso

FUTURE_TS_TOLERANCE = timedelta(minutes=5)
JSON = msgspec.json.Encoder()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def receipt_ref(key: ledger.ReceiptKey) -> dict:
    return {"store_id": key[0], "register_id": key[1], "receipt_id": key[2]}


def money(minor: int) -> str:
    return f"{minor // 100}.{minor % 100:02d}"


def ddmmyyyy(day: str) -> str:
    y, m, d = day.split("-")
    return f"{d}.{m}.{y}"


class MemberState(NamedTuple):
    """What the rules need about a receipt's member, read inside the write transaction."""
    member: ledger.MemberRow
    facts: MemberFacts
    balance: ledger.Balance
    own_hold: int           # points held for this very receipt (by its calculate)
    usage: dict[str, int]   # times each limited rule fired within its window
    hold_open: bool         # a hold under the receipt's identity is open


class Service:
    def __init__(self, db: Database, programs: ProgramHolder, clock: Clock, metrics: Metrics, privacy: Privacy):
        self.db, self.programs, self.clock, self.metrics = db, programs, clock, metrics
        self.privacy = privacy

    # ------------------------------------------------------------ plumbing

    def program(self) -> Program:
        return self.programs.current

    def local_day(self, program: Program, moment: datetime) -> str:
        return moment.astimezone(program.timezone).date().isoformat()

    async def member_by_card(self, card: str) -> ledger.MemberRow | None:
        """Members are found by the HMAC of the card number presented."""
        digest = self.privacy.card(card)
        return self.db.read_now(lambda c: ledger.member_by_card(c, digest))

    async def find_member(self, card: str, path: str = "card") -> ledger.MemberRow:
        member = await self.member_by_card(card)
        if member is None:
            raise unprocessable("unknown_card", f"card {card} is not enrolled",
                                [{"path": path, "message": "not enrolled"}])
        return member

    # ------------------------------------------------------------ member facts

    def member_facts(self, conn: sqlite3.Connection, program: Program, member: ledger.MemberRow,
                     ts: datetime) -> MemberFacts:
        """As the rules see the member on a receipt stamped `ts`: the tier at ts, the
        receipt_number in arrival order (this receipt not stored yet)."""
        tier, ever = tier_view(conn, program, member, ts, of_receipt=True)
        return MemberFacts(
            member_id=member.public_id,
            tier=tier["id"],
            tags=frozenset(msgspec.json.decode(member.tags)),
            birthday=date.fromisoformat(member.birthday) if member.birthday else None,
            enrolled_on=ledger.from_iso(member.enrolled_at).astimezone(program.timezone).date(),
            receipt_number=ever + 1,
        )

    def member_view(self, conn: sqlite3.Connection, program: Program, member: ledger.MemberRow,
                    at: datetime | None = None, card: str | None = None) -> dict:
        """card: the number the caller used; only last four digits of the others are known."""
        moment = at or self.clock.now()
        as_of = iso(moment) if at else None
        lots = ledger.lots_of(conn, member.id, as_of)
        holds = ledger.open_holds(conn, member.id, iso(moment), live_only=at is None)
        balance = ledger.balance_of(lots, holds, self.local_day(program, moment))
        cards = ledger.member_cards(conn, member.id)
        return {
            "card": card, "card_last4": self.privacy.card_last4(card) if card else None, "cards_last4": cards,
            "member_id": member.public_id,
            "tier": tier_view(conn, program, member, moment, as_of)[0],
            "balance": balance.as_json(),
            "expiring": [{"date": d, "points": p} for d, p in balance.expiring],
            "profile": {"phone_last4": member.phone, "birthday": member.birthday,
                        "tags": msgspec.json.decode(member.tags)},
            "enrolled_at": member.enrolled_at,
            "as_of": moment.isoformat(),
        }

    # ------------------------------------------------------------ receipts

    def _check_receipt(self, receipt: schema.Receipt, principal: Principal) -> None:
        require_store(principal, receipt.store_id)
        if receipt.ts.tzinfo is None:
            raise field_error("ts", "needs a UTC offset, e.g. 2026-11-24T12:00:00+02:00")
        if receipt.ts - self.clock.now() > FUTURE_TS_TOLERANCE:
            raise field_error("ts", "is more than 5 minutes in the future")
        check_lines(receipt.lines)
        total = sum(line.amount for line in receipt.lines)
        if total != receipt.total:
            raise field_error("total", f"must equal the sum of line amounts ({total})")

    def _member_state(self, conn, receipt: schema.Receipt, program: Program, now: datetime,
                      card: str | None) -> MemberState | None:
        """The receipt's member as the rules need it; None for an anonymous receipt.
        card: the card number's HMAC."""
        if card is None:
            return None
        member = ledger.member_by_card(conn, card)
        if member is None:
            raise unprocessable("unknown_card", f"card {receipt.card} is not enrolled",
                                [{"path": "card", "message": "not enrolled"}])
        key = (receipt.store_id, receipt.register_id, receipt.receipt_id)
        windows = program.limit_windows(receipt.ts.astimezone(program.timezone).date())
        facts = self.member_facts(conn, program, member, receipt.ts)
        holds = ledger.open_holds(conn, member.id, iso(now))
        balance = ledger.balance_of(ledger.lots_of(conn, member.id), holds, self.local_day(program, now))
        own = sum(h.points for h in holds if h.key == key)
        hold_open = own > 0 or ledger.hold_member(conn, key, open_only=True) is not None
        return MemberState(member, facts, balance, own, ledger.rule_usage(conn, member.id, windows), hold_open)

    @staticmethod
    def _budget_left(conn, program: Program) -> dict[str, int] | None:
        """Points each budgeted rule may still issue. rule_totals is kept by a trigger in
        the postings' own transaction, so it counts every receipt written before this one,
        committed or not, and a receipt undone by its savepoint takes its points with it."""
        if not program.budgets:
            return None
        used = ledger.rule_totals(conn, list(program.budgets))
        return {r: max(0, cap - used[r]) for r, cap in program.budgets.items()}

    def _evaluate(self, conn, program: Program, receipt: schema.Receipt, state: MemberState | None,
                  seconds: list[float]):
        """seconds: gets the evaluation's time, observed once the transaction is over (a write
        function may run again when another in its batch ended the transaction)."""
        # The budgets are a read: outside the time loyalty_rules_evaluation_seconds reports.
        budget_left = None if state is None else self._budget_left(conn, program)
        started = time.perf_counter()
        if state is None:
            ev = program.evaluate(receipt, None, 0, 0, {})
        else:
            ev = program.evaluate(receipt, state.facts, receipt.redeem_points,
                                  state.balance.available + state.own_hold, state.usage, budget_left)
        seconds.append(time.perf_counter() - started)
        if ev.redeem_refusal:
            raise self._refusal(ev.redeem_refusal, program, receipt)
        return ev

    def _refusal(self, code: str, program: Program, receipt: schema.Receipt) -> ApiError:
        if code == "below_min_redemption":
            message = f"at least {program.redemption_min_points} points must be redeemed at once"
        else:
            message = "not enough points available for this redemption"
        return unprocessable(code, message, [{"path": "redeem_points", "message": message}])

    def _result(self, program: Program, receipt: schema.Receipt, member, ev, balance: dict,
                today: str) -> dict:
        key = (receipt.store_id, receipt.register_id, receipt.receipt_id)
        accrued = {"points": ev.accrued_points,
                   "available_from": str(ev.available_from) if member else None,
                   "expires_on": str(ev.expires_on) if member and ev.expires_on else None,
                   "by_rule": [{"rule": r, "points": p} for r, p in ev.by_rule],
                   "by_line": [{"line_no": n, "points": p} for n, p in ev.by_line]}
        redeemed = {"points": ev.redeemed_points, "discount": ev.discount,
                    "by_line": [{"line_no": n, "points": p, "discount": d} for n, p, d in ev.redeemed_by_line]}
        return {"receipt": receipt_ref(key), "member_id": member.public_id if member else None,
                "rules_version": program.version, "accrued": accrued, "redeemed": redeemed,
                "balance": balance, "messages": self._messages(program, ev, balance, today, member)}

    def _messages(self, program: Program, ev, balance: dict, today: str, member) -> list[str]:
        if member is None:
            return []
        out = []
        if ev.redeemed_points:
            out.append(f"Paid with {ev.redeemed_points} points: {money(ev.discount)} {program.currency}")
        if ev.accrued_points:
            if str(ev.available_from) > today:
                out.append(f"{ev.accrued_points} points will be available from {ddmmyyyy(str(ev.available_from))}")
            else:
                out.append(f"{ev.accrued_points} points earned")
        out.append(f"Balance: {balance['available']} points")
        return out

    def _balance_after(self, before: ledger.Balance, own_hold: int, ev, today: str, new_hold: int = 0,
                       confirmed: bool = False) -> dict:
        available = before.available + own_hold - new_hold
        pending = before.pending
        if confirmed:
            available -= ev.redeemed_points
            for available_from, expires_on, points in ev.lots:
                if expired_by(expires_on, today):
                    continue        # a late receipt's points that expired before it arrived
                if str(available_from) <= today:
                    available += points
                else:
                    pending += points
        return {"available": available, "pending": pending, "held": before.held - own_hold + new_hold}

    async def calculate(self, receipt: schema.Receipt, principal: Principal) -> dict:
        self._check_receipt(receipt, principal)
        program, now = self.program(), self.clock.now()
        card = None if receipt.card is None else self.privacy.card(receipt.card)
        seconds: list[float] = []
        try:
            if card is None:     # anonymous: nothing to read or hold
                ev = self._evaluate(None, program, receipt, None, seconds)
                result = {**self._result(program, receipt, None, ev, {}, self.local_day(program, now)),
                          "hold": None}
            else:
                result = await self.db.write(
                    lambda conn: self._calculate_in_tx(conn, program, receipt, now, card, seconds))
        finally:
            self._observe_evaluation(seconds)
        self.metrics.receipts.labels("calculate", "ok").inc()
        return result

    def _observe_evaluation(self, seconds: list[float]) -> None:
        if seconds:     # the last run is the one that counted
            self.metrics.rules_eval.observe(seconds[-1])

    def _calculate_in_tx(self, conn, program: Program, receipt: schema.Receipt, now: datetime, card: str,
                         seconds: list[float]) -> dict:
        """Holds the points to be redeemed (replacing this receipt's earlier hold) until the confirm."""
        key = (receipt.store_id, receipt.register_id, receipt.receipt_id)
        state = self._member_state(conn, receipt, program, now, card)
        ev = self._evaluate(conn, program, receipt, state, seconds)
        today = self.local_day(program, now)
        held = ev.redeemed_points
        expires_at = now + timedelta(minutes=program.hold_ttl_minutes)
        if held:
            ledger.put_hold(conn, key, state.member.id, held, iso(now), iso(expires_at))
        elif state.own_hold:
            ledger.close_hold(conn, key, "released", iso(now))
        balance = self._balance_after(state.balance, state.own_hold, ev, today, new_hold=held)
        result = self._result(program, receipt, state.member, ev, balance, today)
        result["hold"] = {"points": held, "expires_at": expires_at.isoformat()} if held else None
        return result

    async def confirm(self, receipt: schema.Receipt, principal: Principal) -> tuple[int, dict]:
        self._check_receipt(receipt, principal)
        key = (receipt.store_id, receipt.register_id, receipt.receipt_id)
        card = None if receipt.card is None else self.privacy.card(receipt.card)
        # Stored and fingerprinted with the card's HMAC in place of the number.
        body = schema.canonical(receipt if card is None else msgspec.structs.replace(receipt, card=card))
        fingerprint = sha256(body)
        program, now = self.program(), self.clock.now()
        seconds: list[float] = []
        try:
            status, result, ev = await self.db.write(
                lambda conn: self._confirm_in_tx(conn, program, receipt, key, card, body, fingerprint, now, seconds))
        except InsufficientPoints as e:
            raise unprocessable("insufficient_points", str(e)) from None
        finally:
            self._observe_evaluation(seconds)
        # Refusals are counted by their code where the answer is made (server/app.py).
        self._count("confirm", status, result)
        if ev is not None:
            for rule, points in ev.by_rule:
                if points:
                    self.metrics.points_accrued.labels(rule).inc(points)
            if ev.redeemed_points:
                self.metrics.points_redeemed.inc(ev.redeemed_points)
        return status, result

    @staticmethod
    def _replay(stored_sha: str, fingerprint: str, stored_result: bytes) -> dict:
        # Runs inside write transactions: no side effects beyond the answer.
        if stored_sha != fingerprint:
            raise conflict("idempotency_conflict",
                           "this identity was already used with a different body; use a new id")
        return {**msgspec.json.decode(stored_result), "replayed": True}

    def _cancelled_replay(self, conn, program: Program, answer: dict, member_id: int | None,
                          now: datetime) -> dict:
        """The stored answer of a receipt cancelled since, with the member's balance now: the
        stored balance and messages (points earned, paid with) no longer hold."""
        answer["cancelled"] = True
        if member_id is None:
            return answer
        today = self.local_day(program, now)
        holds = ledger.open_holds(conn, member_id, iso(now))
        balance = ledger.balance_of(ledger.lots_of(conn, member_id), holds, today).as_json()
        answer["balance"] = balance
        answer["messages"] = ["Receipt cancelled", f"Balance: {balance['available']} points"]
        return answer

    def _count(self, endpoint: str, status: int, result: dict | None = None) -> None:
        outcome = "replayed" if status == 200 and result and result.get("replayed") else "ok"
        self.metrics.receipts.labels(endpoint, outcome).inc()

    def _confirm_in_tx(self, conn, program: Program, receipt: schema.Receipt, key: ledger.ReceiptKey,
                       card: str | None, body: bytes, fingerprint: str, now: datetime, seconds: list[float]) -> tuple:
        """(status, answer, evaluation or None for a replay). Raises ApiError with nothing written."""
        stored = ledger.get_receipt(conn, key)
        if stored is not None:
            answer = self._replay(stored.body_sha256, fingerprint, stored.result)
            if stored.status == "cancelled":
                answer = self._cancelled_replay(conn, program, answer, stored.member_id, now)
            return 200, answer, None
        state = self._member_state(conn, receipt, program, now, card)
        ev = self._evaluate(conn, program, receipt, state, seconds)
        today = self.local_day(program, now)
        member = state.member if state else None
        balance = self._balance_after(state.balance, state.own_hold, ev, today, confirmed=True) if state else {}
        result = self._result(program, receipt, member, ev, balance, today)
        result["replayed"] = False
        if state is not None:
            self._post_receipt(conn, program, receipt, key, state, ev, now, today)
            if state.balance.owed and ev.accrued_points:
                # The new points paid back a debt: the balance is no longer a simple sum.
                holds = ledger.open_holds(conn, member.id, iso(now))
                result["balance"] = ledger.balance_of(ledger.lots_of(conn, member.id), holds, today).as_json()
                result["messages"] = self._messages(program, ev, result["balance"], today, member)
        ledger.insert_receipt(conn, key, body_sha256=bytes.fromhex(fingerprint),
                              member_id=member.id if member else None, ts=iso(receipt.ts),
                              local_date=str(ev.local_date), total=receipt.total, rules_version=program.version,
                              body=body, result=JSON.encode(result), detail=pairs_to_store(ev), now=iso(now))
        if member is not None:
            # EVENTS: receipt.confirmed (and tier.changed), in the receipt's transaction.
            webhooks.emit_noting_tier(conn, program, member.id, "receipt.confirmed", {
                "receipt": receipt_ref(key), "ts": iso(receipt.ts), "total": receipt.total,
                "accrued_points": ev.accrued_points, "redeemed_points": ev.redeemed_points,
                "rules_version": program.version, "balance": result["balance"]}, now,
                card_last4=self.privacy.card_last4(receipt.card), member=member)
        return 201, result, ev

    def _post_receipt(self, conn, program: Program, receipt: schema.Receipt, key: ledger.ReceiptKey,
                      state: MemberState, ev, now: datetime, today: str) -> None:
        """The receipt's postings: the redemption, the accrual lots, rule-limit usage, a referral."""
        member, partner = state.member, partner_of(program, receipt.store_id)
        at = PostingRef(effective_at=iso(receipt.ts), created_at=iso(now), rules_version=program.version,
                        receipt=key)
        if state.hold_open:
            ledger.close_hold(conn, key, "consumed", iso(now))
        if ev.redeemed_points:
            ledger.spend(conn, member.id, ev.redeemed_points, today, "redemption",
                         accounts.redemption_account(partner), at, state.balance.held - state.own_hold)
        rule_dates = {r: program.rule_dates(r, ev.local_date) for r, _ in ev.by_rule}
        lots = post_accrual(conn, member.id, ev.by_rule, rule_dates, accounts.issue_account(partner), at,
                            today, repay=state.balance.owed > 0)
        expire_on_arrival(conn, program, member.id, lots, today, now)
        # The rules with a limit are the ones whose usage was read for this receipt.
        limited = [r for r in ev.fired if r in state.usage]
        if limited:
            ledger.record_rule_fires(conn, member.id, limited, str(ev.local_date), key)
        if member.referred_by is not None and state.facts.receipt_number == 1:
            fire_events(conn, program, member.referred_by, "referred_first_purchase", f"referral:{member.id}", now)

    async def cancel(self, key: ledger.ReceiptKey, principal: Principal) -> dict:
        require_store(principal, key[0])
        result = await self.db.write(lambda conn: self._cancel_in_tx(conn, key))
        self.metrics.receipts.labels("cancel", result["status"]).inc()
        if "reversed" in result:
            self.metrics.points_reversed.inc(result["reversed"]["points"])
        return result

    def _cancel_in_tx(self, conn, key) -> dict:
        program, now = self.program(), self.clock.now()
        stored = ledger.get_receipt(conn, key)
        out = {"receipt": receipt_ref(key)}
        if stored is None:
            released = ledger.close_hold(conn, key, "released", iso(now))
            return {**out, "status": "hold_released" if released else "nothing_to_cancel",
                    "released_points": released}
        if stored.status == "cancelled":
            return {**out, "status": "cancelled", "already": True}
        at = PostingRef(effective_at=iso(now), created_at=iso(now), rules_version=program.version,
                        receipt=key, ref="cancel")
        reversed_, refunded = plan_cancel(ledger.receipt_postings(conn, key))
        today = self.local_day(program, now)
        for lot_id, rule_id, points, counter in reversed_:
            ledger.reverse(conn, stored.member_id, lot_id, points, counter, at, rule_id, today)
        for lot_id, points, counter in refunded:
            ledger.refund(conn, stored.member_id, lot_id, points, counter, at, today)
        ledger.mark_cancelled(conn, key)
        by_rule: dict[str, int] = {}
        for _, rule_id, points, _ in reversed_:
            by_rule[rule_id] = by_rule.get(rule_id, 0) + points
        result = {**out, "status": "cancelled", "already": False,
                  "reversed": {"points": sum(r[2] for r in reversed_),
                               "by_rule": [{"rule": r, "points": p} for r, p in by_rule.items()]},
                  "refunded": {"points": sum(r[1] for r in refunded)}}
        if stored.member_id is not None:
            result["balance"] = self.member_view(conn, program, ledger.member_by_id(conn, stored.member_id))["balance"]
            # EVENTS: receipt.cancelled (and tier.changed), in the cancel's transaction.
            webhooks.emit_noting_tier(conn, program, stored.member_id, "receipt.cancelled", {
                "receipt": receipt_ref(key), "reversed_points": result["reversed"]["points"],
                "refunded_points": result["refunded"]["points"], "balance": result["balance"]}, now)
        return result

    # ------------------------------------------------------------ returns

    async def return_items(self, req: schema.ReturnRequest, principal: Principal) -> tuple[int, dict]:
        require_store(principal, req.store_id)
        ret_key = (req.store_id, req.register_id, req.return_id)
        rec_key = (req.receipt.store_id, req.receipt.register_id, req.receipt.receipt_id)
        fingerprint = sha256(schema.canonical(req))
        check_lines(req.lines)
        status, result = await self.db.write(
            lambda conn: self._return_in_tx(conn, req, ret_key, rec_key, fingerprint, principal))
        self._count("return", status, result)
        if status == 201:
            self.metrics.points_reversed.inc(result["reversed"]["points"])
        return status, result

    def _return_in_tx(self, conn, req, ret_key, rec_key, fingerprint, principal) -> tuple[int, dict]:
        program, now = self.program(), self.clock.now()
        previous = ledger.get_return(conn, ret_key)
        if previous is not None:
            return 200, self._replay(previous[0], fingerprint, previous[1])
        # Before the receipt is looked up, so a refused key learns nothing about it.
        check_return_store(program, principal, ret_key[0], rec_key[0])
        stored = ledger.get_receipt(conn, rec_key)
        if stored is None:
            raise unprocessable("receipt_not_found", "no confirmed receipt with that identity",
                                [{"path": "receipt", "message": "not found"}])
        if stored.status == "cancelled":
            raise unprocessable("receipt_cancelled", "the receipt was cancelled; nothing is left to return")
        sold = receipt_lines(*ledger.receipt_detail_parts(conn, rec_key))
        plan = plan_return(sold, ledger.returned_lines(conn, rec_key), ledger.receipt_postings(conn, rec_key),
                           req.lines)
        at = PostingRef(effective_at=iso(now), created_at=iso(now), rules_version=program.version,
                        receipt=rec_key, ref="/".join(ret_key))
        if stored.member_id is not None:
            today = self.local_day(program, now)
            for lot_id, rule_id, points, counter in plan.reversals:
                ledger.reverse(conn, stored.member_id, lot_id, points, counter, at, rule_id, today)
            for lot_id, points, counter in plan.refunds:
                ledger.refund(conn, stored.member_id, lot_id, points, counter, at, today)
        for line_no, line in plan.lines.items():
            ledger.insert_return_line(conn, rec_key, line_no, ret_key, line, iso(now))
        result = {"return": {"store_id": ret_key[0], "register_id": ret_key[1], "return_id": ret_key[2]},
                  "receipt": receipt_ref(rec_key), "member_id": ledger.member_public_id(stored.member_id)
                  if stored.member_id is not None else None,
                  "reversed": {"points": plan.reversed_points, "by_rule": plan.by_rule_json(),
                               "by_line": [{"line_no": n, "points": ln.points_reversed}
                                           for n, ln in plan.lines.items()]},
                  "refunded": {"points": plan.refunded_points, "discount": plan.discount_refunded,
                               "by_line": [{"line_no": n, "points": ln.points_refunded,
                                            "discount": ln.discount_refunded} for n, ln in plan.lines.items()]},
                  "amount": sum(ln.amount for ln in plan.lines.values()),
                  "replayed": False}
        if stored.member_id is not None:
            member = ledger.member_by_id(conn, stored.member_id)
            result["balance"] = self.member_view(conn, program, member)["balance"]
        ledger.insert_return(conn, ret_key, rec_key, body_sha256=fingerprint, member_id=stored.member_id,
                             result=JSON.encode(result), now=iso(now))
        if stored.member_id is not None:
            # EVENTS: return.accepted (and tier.changed), in the return's transaction.
            webhooks.emit_noting_tier(conn, program, stored.member_id, "return.accepted", {
                "return": result["return"], "receipt": result["receipt"],
                "reversed_points": plan.reversed_points, "refunded_points": plan.refunded_points,
                "amount": result["amount"], "balance": result["balance"]}, now)
        return 201, result

    # ------------------------------------------------------------ members

    async def enroll(self, req: schema.Enrollment, principal: Principal) -> dict:
        if principal.role == "register":
            if req.store_id is None:
                raise field_error("store_id", "is required when a register enrolls a member")
            require_store(principal, req.store_id)
        program, now = self.program(), self.clock.now()
        referrer = await self.find_member(req.referred_by, "referred_by") if req.referred_by else None

        def write(conn):
            try:
                member_id = ledger.insert_member(
                    conn, card=self.privacy.card(req.card), card_last4=self.privacy.card_last4(req.card),
                    phone_hmac=self.privacy.phone(req.phone) if req.phone else None,
                    phone_last4=self.privacy.phone_last4(req.phone) if req.phone else None,
                    birthday=req.birthday.isoformat() if req.birthday else None,
                    tags=JSON.encode(sorted(set(req.tags))).decode(), referred_by=referrer.id if referrer else None,
                    store_id=req.store_id, now=iso(now))
            except sqlite3.IntegrityError:
                raise conflict("card_already_enrolled", f"card {req.card} is already enrolled") from None
            fire_events(conn, program, member_id, "enrolled", "enrolled", now)
            # EVENTS: member.enrolled, in the enrollment's transaction; a new member's tier is the first level.
            events.emit(conn, "member.enrolled", member_id, {"store_id": req.store_id,
                                                             "tier": program.tier_for(0)[0]}, now)
            if req.phone and req.birthday:
                fire_events(conn, program, member_id, "profile_completed", "profile", now)
            return self.member_view(conn, program, ledger.member_by_id(conn, member_id), card=req.card)
        return await self.db.write(write)

    async def patch_member(self, card: str, patch: schema.MemberPatch) -> dict:
        member = await self.find_member(card)
        program, now = self.program(), self.clock.now()
        changes = {}
        if patch.phone is not None:
            changes["phone_hmac"] = self.privacy.phone(patch.phone)
            changes["phone_last4"] = self.privacy.phone_last4(patch.phone)
        if patch.birthday is not None:
            changes["birthday"] = patch.birthday.isoformat()
        if patch.tags is not None:
            changes["tags"] = JSON.encode(sorted(set(patch.tags))).decode()

        def write(conn):
            ledger.update_member(conn, member.id, changes, iso(now))
            fresh = ledger.member_by_id(conn, member.id)
            if fresh.phone and fresh.birthday:
                fire_events(conn, program, member.id, "profile_completed", "profile", now)
            return self.member_view(conn, program, fresh, card=card)
        return await self.db.write(write)

    async def get_member(self, card: str, at: datetime | None) -> dict:
        program = self.program()
        member = await self.member_by_card(card)
        if member is None:
            raise not_found("unknown_card", f"card {card} is not enrolled")
        return await self.db.read(lambda c: self.member_view(c, program, member, at, card=card))

    async def statement(self, card: str, since: datetime | None, until: datetime | None, limit: int) -> dict:
        member = await self.member_by_card(card)
        if member is None:
            raise not_found("unknown_card", f"card {card} is not enrolled")
        rows = await self.db.read(lambda c: ledger.statement(
            c, member.id, iso(since) if since else None, iso(until) if until else None, limit))
        return {"card_last4": self.privacy.card_last4(card), "member_id": member.public_id, "postings": rows}

    async def set_tier(self, card: str, req: schema.TierAssignment) -> dict:
        program = self.program()
        if req.tier not in {t for t, _ in program.tiers}:
            raise field_error("tier", f"is not a tier of program {program.id}")
        member = await self.find_member(card)
        now = self.clock.now()

        def write(conn):
            ledger.update_member(conn, member.id, {"manual_tier": req.tier,
                                                   "manual_tier_until": req.until.isoformat()}, iso(now))
            # EVENTS: tier.changed when the assignment changes the member's tier.
            webhooks.note_tier(conn, program, member.id, now, "assigned")
            return self.member_view(conn, program, ledger.member_by_id(conn, member.id), card=card)
        return await self.db.write(write)

    async def adjust(self, req: schema.Adjustment, principal: Principal) -> tuple[int, dict]:
        if req.points == 0:
            raise field_error("points", "must not be 0")
        member = await self.find_member(req.card)
        fingerprint = sha256(schema.canonical(req))
        try:
            return await self.db.write(lambda conn: self._adjust_in_tx(conn, req, member, principal, fingerprint))
        except InsufficientPoints as e:
            raise unprocessable("insufficient_points", str(e)) from None

    def _adjust_in_tx(self, conn, req, member, principal, fingerprint) -> tuple[int, dict]:
        program, now = self.program(), self.clock.now()
        previous = ledger.get_adjustment(conn, req.adjustment_id)
        if previous is not None:
            return 200, self._replay(previous[0], fingerprint, previous[1])
        at = PostingRef(effective_at=iso(now), created_at=iso(now), rules_version=program.version,
                        ref=f"adjustment:{req.adjustment_id}", key_id=principal.key_id, note=req.reason)
        today = now.astimezone(program.timezone).date()
        if req.points > 0:
            expires = today + timedelta(days=program.expiry_days) if program.expiry_days else None
            ledger.credit(conn, member.id, req.points, today, expires, "adjustment", accounts.ADJUSTMENT, at)
        else:
            held = sum(h.points for h in ledger.open_holds(conn, member.id, iso(now)))
            ledger.spend(conn, member.id, -req.points, today.isoformat(), "adjustment", accounts.ADJUSTMENT, at,
                         held)
        result = {"adjustment_id": req.adjustment_id, "member_id": member.public_id, "points": req.points,
                  "reason": req.reason, "key_id": principal.key_id, "replayed": False,
                  "balance": self.member_view(conn, program, member)["balance"]}
        ledger.insert_adjustment(conn, req.adjustment_id, body_sha256=fingerprint, member_id=member.id,
                                 points=req.points, reason=req.reason, key_id=principal.key_id,
                                 result=JSON.encode(result), now=iso(now))
        return 201, result


QTY_DECIMALS_MAX = 6
QTY_MAX = 10**9
# Quantities already found valid, by their exact text ("1.0" and "1" are different
# entries): a till sells the same few hundred quantities all day, and checking a Decimal
# through as_tuple() cost ~1.2 us a line, a third of a 34-line receipt's checks.
QTY_KNOWN_GOOD_MAX = 4_096
_qty_known_good: set[str] = set()


def check_lines(lines) -> None:
    """Line numbers are unique; quantities positive, finite, at most 6 decimals."""
    if len({line.line_no for line in lines}) != len(lines):
        seen = set()
        for i, line in enumerate(lines):
            if line.line_no in seen:
                raise field_error(f"lines[{i}].line_no", f"repeats line_no {line.line_no}")
            seen.add(line.line_no)
    for i, line in enumerate(lines):
        text = str(line.qty)
        if text not in _qty_known_good:
            _check_qty(line.qty, f"lines[{i}].qty")
            if len(_qty_known_good) >= QTY_KNOWN_GOOD_MAX:
                _qty_known_good.clear()
            _qty_known_good.add(text)


def _check_qty(qty, path: str) -> None:
    if not qty.is_finite() or qty <= 0:
        raise field_error(path, "must be > 0")
    if qty.as_tuple().exponent < -QTY_DECIMALS_MAX or qty > QTY_MAX:
        raise field_error(path, f"has more than {QTY_DECIMALS_MAX} decimals or is too large")


def tier_view(conn: sqlite3.Connection, program: Program, member: ledger.MemberRow, moment: datetime,
              as_of: str | None = None, of_receipt: bool = False) -> tuple[dict, int]:
    """The member's tier at `moment`, and how many receipts they confirmed (in arrival order).

    The tier is a manual one while its date holds and the program defines it, else the level
    the program's metric reached over the rolling window before `moment` (of_receipt: a
    receipt's own tier, which leaves receipts stamped at its very moment out). `next` and
    `to_next` follow the tier the member actually has. A manual tier the program no longer
    defines is ignored (shown under `manual_ignored`): the rules only know their own tiers."""
    today = moment.astimezone(program.timezone).date().isoformat()
    since = iso(moment - timedelta(days=program.tier_window_days))
    until = iso(moment) if of_receipt else as_of
    ever, count, spend = ledger.receipt_counts(conn, member.id, since, until, until_inclusive=not of_receipt)
    metric = spend if program.tier_metric == "spend" else count
    tier, nxt, to_next = program.tier_for(metric)
    view = {"id": tier, "next": nxt, "to_next": to_next, "metric": program.tier_metric, "value": metric,
            "manual": False}
    if member.manual_tier and member.manual_tier_until and member.manual_tier_until >= today:
        levels = [level for level, _ in program.tiers]
        if member.manual_tier in levels:
            nxt, to_next = tier_after(program, levels.index(member.manual_tier), metric)
            view.update(id=member.manual_tier, next=nxt, to_next=to_next, manual=True,
                        until=member.manual_tier_until)
        else:
            view["manual_ignored"] = {"tier": member.manual_tier, "until": member.manual_tier_until,
                                      "reason": f"not a tier of program {program.id}"}
    return view, ever


def tier_after(program: Program, position: int, metric: int) -> tuple[str | None, int | None]:
    """The level after the one at `position`, and how much metric it still needs (0 when a
    manual tier below what the metric reached holds the member back)."""
    if position + 1 >= len(program.tiers):
        return None, None
    following, start = program.tiers[position + 1]
    return following, max(0, start - metric)


def fire_events(conn, program: Program, member_id: int, on: str, occasion: str, now: datetime) -> None:
    """Credits the program's event rules for `on`, each at most once per member and occasion."""
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


def check_return_store(program: Program, principal: Principal, store_id: str, receipt_store_id: str) -> None:
    """A receipt is returned at a store its key may use; at another only when the program
    allows returns across stores, and never across partners, whose settlements differ."""
    if principal.may_use_store(receipt_store_id):
        return
    partner, receipt_partner = partner_of(program, store_id), partner_of(program, receipt_store_id)
    if program.returns_cross_store and partner == receipt_partner:
        return
    if not program.returns_cross_store:
        why = "not one of this key's stores, and the program does not allow returns across stores"
    else:
        why = (f"store {receipt_store_id} is {_owner(receipt_partner)} and store {store_id} is "
               f"{_owner(partner)}; returns never cross partners")
    raise forbidden(f"a receipt of store {receipt_store_id} cannot be returned at store {store_id}",
                    [{"path": "receipt.store_id", "message": why}])


def _owner(partner: str | None) -> str:
    return f"partner {partner}'s" if partner else "the program's own"


def partner_of(program: Program, store_id: str) -> str | None:
    store = program.stores.get(store_id)
    return store.partner if store is not None else None


def post_accrual(conn, member_id: int, by_rule, rule_dates: dict, counter: str, at: PostingRef, today: str,
                 repay: bool) -> dict[tuple, int]:
    """One lot per distinct (activation, expiry) pair, one posting per rule on it; new
    points pay back any debt first (`repay`: the member owed points when read), except
    points that had expired before they arrived. Returns the lots by their dates."""
    earning = [(rule_id, points, rule_dates[rule_id]) for rule_id, points in by_rule if points > 0]
    totals: dict[tuple, int] = {}
    for _, points, dates in earning:
        totals[dates] = totals.get(dates, 0) + points
    # Each lot is written once with all its points: no update of the lot per rule.
    lots = {dates: ledger.new_lot(conn, member_id, dates[0], dates[1], total) for dates, total in totals.items()}
    for rule_id, points, dates in earning:
        ledger.post(conn, member_id, lots[dates], "accrual", points, counter, at, rule_id, ledger.lot_dates(*dates),
                    counted=True)
    if repay:
        for dates, lot_id in lots.items():
            if not expired_by(dates[1], today):
                ledger.repay_debts(conn, member_id, lot_id, at)
    return lots


def expired_by(expires_on, today: str) -> bool:
    return expires_on is not None and str(expires_on) <= today


def expire_on_arrival(conn, program: Program, member_id: int, lots: dict[tuple, int], today: str,
                      now: datetime) -> None:
    """A late receipt's points whose expiry date had passed when it arrived are posted, then
    expire in the same transaction, as the expiry job would have posted them (effective at
    the first moment of the expiry date), so no answer ever counts them as spendable."""
    for (_, expires_on), lot_id in lots.items():
        if not expired_by(expires_on, today):
            continue
        points = conn.execute("SELECT remaining FROM lots WHERE id = ?", (lot_id,)).fetchone()[0]
        conn.execute("UPDATE lots SET expiry_done = 1 WHERE id = ?", (lot_id,))
        expired_at = datetime.combine(expires_on, datetime.min.time(), program.timezone)
        at = PostingRef(effective_at=iso(expired_at), created_at=iso(now), rules_version=program.version,
                        ref=f"expiry:{lot_id}")
        ledger.post(conn, member_id, lot_id, "expiry", -points, accounts.EXPIRY, at)
