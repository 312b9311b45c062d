"""Member care through the API: the CRM's fields, finding a member by phone, replacing a
card, merging two members and erasing a member's personal data (SQL in storage/member_care.py).

Care operations address members by their id (`m_12`), which a search by phone answers with;
cards are only ever shown by their last four digits. Every one runs under /v1/admin, so the
audit middleware records who did it (server/routes.py). A card taken out of use by a
replacement or a merge is refused wherever it is presented, with a code saying which.
"""
from __future__ import annotations

import hashlib
import secrets

import msgspec

from server import answer_types as A, schema
from server.errors import ApiError, conflict, field_error, not_found, unprocessable
from server.keys import CLOCK, DATABASE, EVENTS_SETTLED, OPS, PRIVACY, PROGRAMS
from server.ops import members as member_ops
from server.privacy import candidates
from storage import coupons, events, ledger, member_care, segments
from storage.ledger import PostingRef, iso
from storage.member_care import CareRefused

JSON = msgspec.json.Encoder()
_STATUS = {"crm_id_taken": 409, "too_many_receipts": 422}


def member_number(public_id: str) -> int:
    """m_12 -> 12; anything else is no member."""
    if not public_id.startswith("m_") or not public_id[2:].isdigit() or len(public_id) > 20:
        raise not_found("unknown_member", f"{public_id} is not a member id")
    return int(public_id[2:])


def refusal(e: CareRefused) -> ApiError:
    return ApiError(_STATUS.get(e.code, 422), e.code, e.message,
                    [{"path": e.path, "message": e.message}] if e.path else None)


def _member(conn, member_id: int, public_id: str, path: str | None = None,
            usable: bool = True) -> member_care.CareState:
    """The member's care state; usable: refused when erased or merged away."""
    state = member_care.care_state(conn, member_id)
    if state is None:
        if path:
            raise unprocessable("unknown_member", f"{public_id} is not a member",
                                [{"path": path, "message": "no such member"}])
        raise not_found("unknown_member", f"{public_id} is not a member")
    if usable and state.erased_at:
        raise unprocessable("member_erased", f"{public_id} was erased on {state.erased_at}",
                            [{"path": path or "member_id", "message": "erased"}])
    if usable and state.merged_into:
        raise unprocessable("member_merged", f"{public_id} was merged into m_{state.merged_into}",
                            [{"path": path or "member_id", "message": f"merged into m_{state.merged_into}"}])
    return state


# ---------------------------------------------------------------- CRM fields

async def set_crm(app, card: str, patch: schema.MemberPatch) -> None:
    """The CRM's fields of PATCH /v1/members/{card}; the profile's are server/ops/members.py's."""
    if patch.crm_id is None and patch.consent is None:
        return
    consent = {c: v for c in member_care.CHANNELS if (v := getattr(patch.consent, c, None)) is not None}
    member = await member_ops.find_member(app[OPS], card)
    now = iso(app[CLOCK].now())

    def write(conn):
        # Found before the write: an erasure or a merge committed in between would have the
        # CRM's id and consent written onto a member erased or merged away, where the id then
        # stays taken from the member the customer is now.
        ledger.lock_member(conn, member.id)
        member_ops.refuse_if_card_moved(conn, app[OPS], card, member)
        try:
            member_care.set_crm(conn, member.id, patch.crm_id, consent, now)
        except CareRefused as e:
            raise refusal(e) from None
    await app[DATABASE].write(write)


async def with_crm(app, answer: A.MemberAnswer) -> A.MemberAnswer:
    """A member answer with the CRM's id and the consent per channel."""
    member_id = member_number(answer.member_id)
    state = await app[DATABASE].read(lambda conn: member_care.care_state(conn, member_id))
    return msgspec.structs.replace(answer, **member_care.crm_fields(state)) if state else answer


# ---------------------------------------------------------------- cards out of use

async def refuse_retired(app, card: str, error: ApiError | None = None, status: int | None = None) -> None:
    """Raises the reason a retired card is refused (keeping the status of `error`, or
    `status`); returns when the card was never retired."""
    digest = app[PRIVACY].card(card)
    retired = await app[DATABASE].read(lambda conn: member_care.retired_card(conn, digest))
    if retired is not None:
        raise retired_refusal(card, retired, error, status)


def retired_refusal(card: str, retired: member_care.RetiredCard, error: ApiError | None = None,
                    status: int | None = None) -> ApiError:
    """The refusal of a retired card, saying why (refuse_retired)."""
    if retired.reason == "replaced":
        code = "card_replaced"
        message = f"card {card} was replaced on {retired.retired_at[:10]} by the card ending {retired.successor}"
    else:
        code = "card_merged"
        message = (f"card {card} belonged to m_{retired.member_id}, merged into {retired.successor} on "
                   f"{retired.retired_at[:10]}: use that member's card")
    path = error.details[0]["path"] if error and error.details else "card"
    return ApiError(status or (error.status if error else 422), code, message,
                    [{"path": path, "message": f"{retired.reason}; no longer in use"}])


# ---------------------------------------------------------------- search

async def find_by_phone(app, body: schema.PhoneSearch) -> A.MemberSearchAnswer:
    deps = app[OPS]
    digests = candidates(app[PRIVACY].phone(body.phone))
    program = deps.program()

    def read(conn):
        out = []
        for member_id in member_care.members_by_phone(conn, digests):
            state = member_care.care_state(conn, member_id)
            view = member_ops.member_view(deps, conn, program, ledger.member_by_id(conn, member_id))
            out.append(A.FoundMember(
                member_id=view.member_id, cards_last4=view.cards_last4, phone_last4=view.profile.phone_last4,
                enrolled_at=view.enrolled_at, balance=view.balance, tier=view.tier.id,
                merged_into=f"m_{state.merged_into}" if state.merged_into else None,
                **member_care.crm_fields(state)))
        return out
    members = await app[DATABASE].read(read)
    return A.MemberSearchAnswer(members, member_care.PHONE_MATCHES_MAX)


# ---------------------------------------------------------------- replace a card

async def replace_card(app, public_id: str, body: schema.CardReplacement) -> tuple[int, A.CardReplacementAnswer]:
    """The member keeps everything (the member id holds the balance, lots and history);
    only the card changes. Sending the same replacement again answers 200 replayed; a card
    the member already had otherwise (itself, another of theirs) replaces nothing: 422 on new_card."""
    member_id = member_number(public_id)
    privacy, now = app[PRIVACY], iso(app[CLOCK].now())
    new = privacy.card(body.new_card)
    new_last4 = privacy.card_last4(body.new_card)

    def write(conn):
        # Its cards are read under the member's lock (PostgreSQL): the same replacement sent
        # twice at once finds the new card in use and answers as a replay, rather than
        # retiring a card the first one already retired.
        ledger.lock_member(conn, member_id)
        _member(conn, member_id, public_id)
        cards = member_care.active_cards(conn, member_id)
        own = [card for card, _ in cards if card in candidates(new)]
        if own:
            replaced = member_care.replaced_by(conn, member_id, own[0])
            if replaced is None or body.old_card_last4 not in (None, replaced[0]):
                raise field_error("new_card", f"is already this member's card ending {new_last4}: a replacement "
                                              "needs a card the member does not have")
            # The register or desk that resends after a timeout learns which card went, as the first answer said.
            return 200, _replaced(public_id, replaced[0], new_last4, conn, replayed=True)
        _check_new_card(conn, new, body.new_card)
        old, old_last4 = _card_to_replace(cards, body.old_card_last4)
        member_care.retire_card(conn, old, member_id, "replaced", new_last4, now)
        member_care.add_card(conn, new, new_last4, member_id, now)
        coupons.rebind_codes(conn, privacy.forms("card", old), new)
        events.emit(conn, "card.replaced", member_id, {"old_card_last4": old_last4, "new_card_last4": new_last4},
                    now, card_last4=new_last4)
        return 201, _replaced(public_id, old_last4, new_last4, conn)
    return await app[DATABASE].write(write)


def _check_new_card(conn, new: str, number: str) -> None:
    if ledger.member_by_card(conn, new) is not None:
        raise ApiError(409, "card_already_enrolled", f"card {number} is already enrolled",
                       [{"path": "new_card", "message": "already enrolled"}])
    if member_care.retired_card(conn, new) is not None:
        raise ApiError(409, "card_retired", f"card {number} was taken out of use and cannot be given again",
                       [{"path": "new_card", "message": "taken out of use"}])


def _card_to_replace(cards: list[tuple[str, str]], last4: str | None) -> tuple[str, str]:
    matching = [c for c in cards if last4 is None or c[1] == last4]
    if len(matching) == 1:
        return matching[0]
    ends = ", ".join(c[1] for c in cards) or "none"
    if not matching:
        raise field_error("old_card_last4", f"matches none of the member's cards (ending {ends})")
    raise field_error("old_card_last4", f"is needed: the member has {len(cards)} cards (ending {ends})")


def _replaced(public_id: str, old_last4: str | None, new_last4: str, conn,
              replayed: bool = False) -> A.CardReplacementAnswer:
    return A.CardReplacementAnswer(public_id, new_last4, old_last4,
                                   ledger.member_cards(conn, member_number(public_id)), replayed)


# ---------------------------------------------------------------- merge

async def merge(app, body: schema.MemberMerge, principal) -> tuple[int, A.MergeAnswer]:
    """Moves the points of `from_member_id` to `into_member_id` through transfer postings, its
    personal offers and list segments with them, and takes the first member's cards out of
    use (the codes bound to them go to the second member's first card); one transaction,
    idempotent by merge_id."""
    source, target = member_number(body.from_member_id), member_number(body.into_member_id)
    if source == target:
        raise field_error("into_member_id", "must be another member than from_member_id")
    fingerprint = hashlib.sha256(schema.canonical(body)).hexdigest()
    now, privacy = app[CLOCK].now(), app[PRIVACY]

    def write(conn):
        # Their receipts wait: offers and segments move too. Taken before the merge is looked
        # for, so the same merge sent twice at once finds the first one's row and answers it,
        # rather than finding the member merged.
        ledger.lock_members(conn, [source, target])
        previous = member_care.get_merge(conn, body.merge_id)
        if previous is not None:
            if previous[0] != fingerprint:
                raise conflict("idempotency_conflict", f"merge {body.merge_id} was made with another body")
            return 200, msgspec.structs.replace(msgspec.json.decode(previous[1], type=A.MergeAnswer), replayed=True)
        _member(conn, source, body.from_member_id, "from_member_id")
        _member(conn, target, body.into_member_id, "into_member_id")
        at = PostingRef(effective_at=iso(now), created_at=iso(now), ref=f"merge:{body.merge_id}",
                        key_id=principal.key_id, note=body.reason)
        lots, points = member_care.move_points(conn, source, target, at)
        member_care.move_offers(conn, source, target)
        segments.take_over_lists(conn, source, target, now)
        member_care.release_holds(conn, source, iso(now))
        cards = member_care.active_cards(conn, source)
        heir = [privacy.rewrap("card", card) or card for card, _ in member_care.active_cards(conn, target)[:1]]
        for card, _ in cards:
            member_care.retire_card(conn, card, source, "merged", body.into_member_id, iso(now))
            for successor in heir:
                coupons.rebind_codes(conn, privacy.forms("card", card), successor)
        member_care.mark_merged(conn, source, target, iso(now))
        events.emit(conn, "member.merged", source, {"merge_id": body.merge_id, "into_member_id": body.into_member_id,
                                                    "lots_moved": lots, "points_moved": points},
                    now, card_last4=cards[0][1] if cards else None)
        result = A.MergeAnswer(body.merge_id, body.from_member_id, body.into_member_id, lots_moved=lots,
                               points_moved=points, cards_retired_last4=[last4 for _, last4 in cards],
                               key_id=principal.key_id, replayed=False)
        member_care.insert_merge(conn, body.merge_id, body_sha256=fingerprint, from_member=source,
                                 into_member=target, result=JSON.encode(result), key_id=principal.key_id,
                                 now=iso(now))
        return 201, result
    return await app[DATABASE].write(write)


# ---------------------------------------------------------------- erase

async def erase(app, public_id: str, body: schema.Erasure) -> A.ErasureAnswer:
    """Erasing twice answers the first erasure's moment, with nothing left to remove."""
    member_id = member_number(public_id)
    moment = app[CLOCK].now()
    now, today = iso(moment), moment.astimezone(app[PROGRAMS].current.timezone).date()
    # The member's events found on a reader first: the write then scans only newer ones.
    # PostgreSQL's writers commit event ids out of their order: "newer" is above the settled
    # id, read in a snapshot taken after it, or an event of the member still uncommitted
    # below the newest id would be neither found nor scanned.
    db = app[DATABASE]
    upto = await db.read(app[EVENTS_SETTLED].settle) if db.backend == "postgresql" else None
    seen = await db.read(lambda conn: events.seen(conn, member_care.with_merged(conn, member_id), upto))
    nobodys_card = app[PRIVACY].card(secrets.token_hex(16))

    def write(conn):
        # Under the lock of each member erased (PostgreSQL): the same erasure sent twice at
        # once answers the copy that waited with the first one's moment, as a repeat, and a
        # receipt of the member runs wholly before it or finds the card unknown.
        member_care.lock_with_merged(conn, member_id)
        state = _member(conn, member_id, public_id, usable=False)
        if state.erased_at:
            return A.ErasureAnswer(public_id, state.erased_at, cards_removed=0, receipts_scrubbed=0,
                                   members_erased=[], replayed=True)
        try:
            done = member_care.erase(conn, member_id, now, today, seen, nobodys_card,
                                     lambda card: app[PRIVACY].forms("card", card))
        except CareRefused as e:
            raise refusal(e) from None
        for erased in done["members_erased"]:     # after the erasure: nothing personal left to name
            events.emit(conn, "member.erased", member_number(erased), {"members_erased": done["members_erased"]},
                        now)
        return A.ErasureAnswer(public_id, now, **done, replayed=False)
    return await app[DATABASE].write(write)
