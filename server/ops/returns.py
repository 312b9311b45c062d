"""Returns: which store may take back which receipt, then the return planned from the
receipt's line records and postings (server/returns.py) and applied through storage."""
from __future__ import annotations

import msgspec

from rules import Program
from server import schema, webhooks
from server.answer import return_answer
from server.answer_types import ReturnAnswer
from server.auth import Principal, require_store
from server.errors import forbidden, unprocessable
from server.ops import JSON, Deps, count, replay, sha256
from server.ops.members import balance_now
from server.ops.receipts import (announce_referral_moves, check_lines, give_back_customer_value, referral_reversed,
                                take_back)
from server.plan import local_day, partner_of
from server.returns import plan_referral_take_back, plan_return, returns_whole
from storage import imports, ledger, member_care, referrals
from storage.apply import apply_referral_take_back, apply_take_back
from storage.ledger import PostingRef, iso


async def return_items(deps: Deps, req: schema.ReturnRequest,
                       principal: Principal) -> tuple[int, ReturnAnswer]:
    require_store(principal, req.store_id)
    ret_key = (req.store_id, req.register_id, req.return_id)
    rec_key = (req.receipt.store_id, req.receipt.register_id, req.receipt.receipt_id)
    fingerprint = sha256(schema.canonical(req))
    check_lines(req.lines)
    status, result = await deps.db.write(
        lambda conn: _return_in_tx(deps, conn, req, ret_key, rec_key, fingerprint, principal))
    count(deps, "return", status, result)
    if status == 201:
        deps.metrics.points_reversed.inc(result.reversed.points)
    return status, result


def _return_in_tx(deps: Deps, conn, req, ret_key, rec_key, fingerprint,
                  principal) -> tuple[int, ReturnAnswer]:
    program, now = deps.program(), deps.clock.now()
    previous = ledger.get_return(conn, ret_key)
    if previous is not None:
        return 200, replay(previous[0], fingerprint, previous[1], ReturnAnswer)
    # Before the receipt is looked up, so a refused key learns nothing about it.
    check_return_store(program, principal, ret_key[0], rec_key[0])
    stored = ledger.get_receipt(conn, rec_key)
    if stored is not None and member_care.lock_receipt(conn, rec_key, stored.member_id):
        # As the returns and the cancel before this one left it: the same return sent twice
        # at once is a replay, and two returns never take back the same units.
        previous = ledger.get_return(conn, ret_key)
        if previous is not None:
            return 200, replay(previous[0], fingerprint, previous[1], ReturnAnswer)
        stored = ledger.get_receipt(conn, rec_key)
    if stored is None:
        raise unprocessable("receipt_not_found", "no confirmed receipt with that identity",
                            [{"path": "receipt", "message": "not found"}])
    if stored.status == "cancelled":
        raise unprocessable("receipt_cancelled", "the receipt was cancelled; nothing is left to return")
    imports.refuse_if_imported(conn, rec_key, "returned")   # history brought in earned nothing to take back
    sold, prior = ledger.receipt_line_records(conn, rec_key), ledger.returned_lines(conn, rec_key)
    plan = plan_return(sold, prior, ledger.receipt_postings(conn, rec_key, stored.member_id), req.lines)
    at = PostingRef(effective_at=iso(now), created_at=iso(now), rules_version=program.version,
                    receipt=rec_key, ref="/".join(ret_key))
    holder = None if stored.member_id is None else member_care.lock_points_holder(conn, stored.member_id)
    whole, today = returns_whole(sold, prior, req.lines), local_day(program, now)
    referral = None if not whole else plan_referral_take_back(
        referrals.referral_of(conn, stored.member_id, rec_key), stored.member_id, False, today)
    if holder is not None:
        apply_take_back(conn, stored.member_id, take_back(conn, plan.reversals, plan.refunds, today), at)
        if whole:
            give_back_customer_value(deps, conn, rec_key, holder)
    moves = None if referral is None else apply_referral_take_back(conn, referral, at, program, now)
    for line_no, line in plan.lines.items():
        ledger.insert_return_line(conn, rec_key, line_no, ret_key, line, iso(now))
    result = return_answer(plan, ret_key, rec_key, holder)
    if holder is not None:
        result.balance = balance_now(deps, conn, program, holder)
    ledger.insert_return(conn, ret_key, rec_key, body_sha256=fingerprint, member_id=stored.member_id,
                         result=JSON.encode(result), now=iso(now))
    if holder is not None:
        webhooks.emit_noting_tier(conn, program, holder, "return.accepted", {
            "return": msgspec.to_builtins(result.return_), "receipt": msgspec.to_builtins(result.receipt),
            "reversed_points": plan.reversed_points, "refunded_points": plan.refunded_points,
            "amount": result.amount, "balance": msgspec.to_builtins(result.balance),
            "referral_reversed": referral_reversed(moves)}, now)
    if moves is not None:
        announce_referral_moves(conn, moves, referral, rec_key, "return.accepted", now)
    return 201, result


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
