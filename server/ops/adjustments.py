"""Adjustments: points added or removed by hand, once per adjustment id."""
from __future__ import annotations

from datetime import timedelta

import msgspec

from server import schema
from server.auth import Principal
from server.answer_types import AdjustmentAnswer
from server.errors import field_error
from server.ops import JSON, Deps, keyed_fingerprints, replay_any
from server.ops.members import balance_now, find_member, refuse_if_card_moved
from server.plan import insufficient_points
from server.privacy import candidates
from storage import accounts, ledger
from storage.ledger import InsufficientPoints, PostingRef, iso
from storage.schema import legacy_fingerprint


async def adjust(deps: Deps, req: schema.Adjustment, principal: Principal) -> tuple[int, AdjustmentAnswer]:
    if req.points == 0:
        raise field_error("points", "must not be 0")
    member = await find_member(deps, req.card)
    hashes = candidates(deps.privacy.card(req.card))
    fingerprints = keyed_fingerprints(
        lambda i: schema.canonical(msgspec.structs.replace(req, card=hashes[i])), deps.privacy.key_ids)
    # An adjustment stored before fingerprints were keyed is compared by its fields (m031).
    fingerprints.append(legacy_fingerprint(req.adjustment_id, member.id, req.points, req.reason))
    try:
        return await deps.db.write(lambda conn: _adjust_in_tx(deps, conn, req, member, principal, fingerprints))
    except InsufficientPoints as e:
        raise insufficient_points(e.requested, e.available, path="points") from None


def _adjust_in_tx(deps: Deps, conn, req, member, principal, fingerprints) -> tuple[int, AdjustmentAnswer]:
    program, now = deps.program(), deps.clock.now()
    previous = ledger.get_adjustment(conn, req.adjustment_id)
    if previous is None and ledger.lock_member(conn, member.id):
        # The same adjustment sent twice at once: the copy that waited here finds the first
        # one's row, rather than spending again and being refused for the points it spent.
        previous = ledger.get_adjustment(conn, req.adjustment_id)
    if previous is not None:
        return 200, replay_any(previous[0], fingerprints, previous[1], AdjustmentAnswer)
    refuse_if_card_moved(conn, deps, req.card, member)     # the points would reach no card
    at = PostingRef(effective_at=iso(now), created_at=iso(now), rules_version=program.version,
                    ref=f"adjustment:{req.adjustment_id}", key_id=principal.key_id, note=req.reason)
    today = now.astimezone(program.timezone).date()
    if req.points > 0:
        expires = today + timedelta(days=program.expiry_days) if program.expiry_days else None
        ledger.credit(conn, member.id, req.points, today, expires, "adjustment", accounts.ADJUSTMENT, at)
    else:
        held = sum(h.points for h in ledger.open_holds(conn, member.id, iso(now)))
        ledger.spend(conn, member.id, -req.points, today.isoformat(), "adjustment", accounts.ADJUSTMENT, at, held)
    result = AdjustmentAnswer(req.adjustment_id, member.public_id, req.points, req.reason, principal.key_id,
                              replayed=False, balance=balance_now(deps, conn, program, member.id))
    ledger.insert_adjustment(conn, req.adjustment_id, body_sha256=fingerprints[0], member_id=member.id,
                             points=req.points, reason=req.reason, key_id=principal.key_id,
                             result=JSON.encode(result), now=iso(now))
    return 201, result
