"""Members: enrollment, profile changes, the member view and statement, manual tiers."""
from __future__ import annotations

import sqlite3
from datetime import date, datetime

import msgspec

from rules import Program
from server import schema, webhooks
from server.privacy import candidates
from server.auth import Principal, require_store
from server.answer_types import (Balance, DatedPoints, MemberAnswer, MemberOffer, Profile, Rfm, StatementAnswer,
                                StatementPosting, TierView)
from server.errors import conflict, field_error, not_found, unprocessable
from server.member_state import segments_now, tier_view
from server.ops import JSON, Deps
from server.plan import local_date, local_day
from storage import events, ledger, offers, segments
from storage.apply import fire_events
from storage.ledger import iso
from storage.sql import integrity_errors


async def member_by_card(deps: Deps, card: str) -> ledger.MemberRow | None:
    """Members are found by the HMAC of the card number presented."""
    digest = deps.privacy.card(card)
    return await deps.db.lookup(lambda c: ledger.member_by_card(c, digest))


async def find_member(deps: Deps, card: str, path: str = "card") -> ledger.MemberRow:
    member = await member_by_card(deps, card)
    if member is None:
        raise unprocessable("unknown_card", f"card {card} is not enrolled", [{"path": path, "message": "not enrolled"}])
    return member


def refuse_if_card_moved(conn: sqlite3.Connection, deps: Deps, card: str, member: ledger.MemberRow,
                         path: str = "card") -> None:
    """For a write whose member was found by card before it began, under the member's lock
    (ledger.lock_member): a merge or a card replacement committed in between is refused as
    the card is now (unknown_card, which the routes explain as card_merged or
    card_replaced), never written to a member that no card reaches any more."""
    found = ledger.member_by_card(conn, deps.privacy.card(card))
    if found is None or found.id != member.id:
        raise unprocessable("unknown_card", f"card {card} is not enrolled", [{"path": path, "message": "not enrolled"}])


def member_view(deps: Deps, conn: sqlite3.Connection, program: Program, member: ledger.MemberRow,
                at: datetime | None = None, card: str | None = None) -> MemberAnswer:
    """card: the number the caller used; only last four digits of the others are known."""
    moment = at or deps.clock.now()
    as_of = iso(moment) if at else None
    lots = ledger.lots_of(conn, member.id, as_of)
    holds = ledger.open_holds(conn, member.id, iso(moment), live_only=at is None)
    balance = ledger.balance_of(lots, holds, local_day(program, moment))
    return MemberAnswer(
        card=card, card_last4=deps.privacy.card_last4(card) if card else None,
        cards_last4=ledger.member_cards(conn, member.id), member_id=member.public_id,
        # The tier view is the dict the receipt path reads too; its type is checked here.
        tier=msgspec.convert(tier_view(conn, program, member, moment, as_of)[0], TierView),
        balance=Balance(balance.available, balance.pending, balance.held),
        expiring=[DatedPoints(d, p) for d, p in balance.expiring],
        profile=Profile(member.phone, member.birthday, msgspec.json.decode(member.tags)),
        enrolled_at=member.enrolled_at, as_of=moment.isoformat())


def balance_now(deps: Deps, conn: sqlite3.Connection, program: Program, member_id: int) -> Balance:
    return member_view(deps, conn, program, ledger.member_by_id(conn, member_id)).balance


def enrolling_store(principal: Principal, store_id: str | None) -> str:
    """The store a register enrolls at: the one it names, or its only store when it names
    none (the contract's enrollment body has no store); a key of several stores must say."""
    if store_id is None:
        if len(principal.stores) != 1:
            raise field_error("store_id", "is required when a register key serves several stores")
        (store_id,) = principal.stores
    require_store(principal, store_id)
    return store_id


def refuse_birthday(birthday: date | None, program: Program, now: datetime) -> None:
    if birthday is not None and (problem := schema.birthday_problem(birthday, local_date(program, now))):
        raise field_error("birthday", problem)


async def enroll(deps: Deps, req: schema.Enrollment, principal: Principal) -> MemberAnswer:
    if principal.role == "register":
        req = msgspec.structs.replace(req, store_id=enrolling_store(principal, req.store_id))
    program, now = deps.program(), deps.clock.now()
    refuse_birthday(req.birthday, program, now)
    referrer = await find_member(deps, req.referred_by, "referred_by") if req.referred_by else None
    privacy = deps.privacy

    def write(conn):
        if referrer is not None:
            # Found before the write: a merge of the referrer committed in between would
            # record the member merged away, which no card reaches, as the referrer.
            ledger.lock_member(conn, referrer.id)
            refuse_if_card_moved(conn, deps, req.referred_by, referrer, "referred_by")
        card = privacy.card(req.card)
        # The table's key refuses the card under the key in force only: during a key rotation one
        # still stored under an earlier key would be enrolled again, as a second, empty member.
        if len(candidates(card)) > 1 and ledger.member_id_of_card(conn, card) is not None:
            raise conflict("card_already_enrolled", f"card {req.card} is already enrolled")
        try:
            member_id = ledger.insert_member(
                conn, card=card, card_last4=privacy.card_last4(req.card),
                phone_hmac=privacy.phone(req.phone) if req.phone else None,
                phone_last4=privacy.phone_last4(req.phone) if req.phone else None,
                birthday=req.birthday.isoformat() if req.birthday else None,
                tags=JSON.encode(sorted(set(req.tags))).decode(), referred_by=referrer.id if referrer else None,
                store_id=req.store_id, now=iso(now))
        except integrity_errors():
            raise conflict("card_already_enrolled", f"card {req.card} is already enrolled") from None
        fire_events(conn, program, member_id, "enrolled", "enrolled", now)
        # A new member's tier is the first level; tier.changed compares later tiers with it.
        events.emit(conn, "member.enrolled", member_id, {"store_id": req.store_id,
                                                         "tier": program.tier_for(0)[0]}, now)
        if req.phone and req.birthday:
            fire_events(conn, program, member_id, "profile_completed", "profile", now)
        return member_view(deps, conn, program, ledger.member_by_id(conn, member_id), card=req.card)
    return await deps.db.write(write)


async def patch_member(deps: Deps, card: str, patch: schema.MemberPatch) -> MemberAnswer:
    program, now = deps.program(), deps.clock.now()
    refuse_birthday(patch.birthday, program, now)
    member = await find_member(deps, card)
    changes = {}
    if patch.phone is not None:
        changes["phone_hmac"] = deps.privacy.phone(patch.phone)
        changes["phone_last4"] = deps.privacy.phone_last4(patch.phone)
    if patch.birthday is not None:
        changes["birthday"] = patch.birthday.isoformat()
    if patch.tags is not None:
        changes["tags"] = JSON.encode(sorted(set(patch.tags))).decode()

    def write(conn):
        ledger.lock_member(conn, member.id)     # a merge waiting for it, or waited for, is seen below
        refuse_if_card_moved(conn, deps, card, member)      # a profile completed would credit a merged member
        ledger.update_member(conn, member.id, changes, iso(now))
        fresh = ledger.member_by_id(conn, member.id)
        if fresh.phone and fresh.birthday:
            fire_events(conn, program, member.id, "profile_completed", "profile", now)
        return member_view(deps, conn, program, fresh, card=card)
    return await deps.db.write(write)


async def get_member(deps: Deps, card: str, at: datetime | None) -> MemberAnswer:
    program = deps.program()
    member = await member_by_card(deps, card)
    if member is None:
        raise not_found("unknown_card", f"card {card} is not enrolled")
    def read(conn):
        view = member_view(deps, conn, program, member, at, card=card)
        return msgspec.structs.replace(
            view, **customer_value_view(conn, program, member, at or deps.clock.now()))
    return await deps.db.read(read)


def customer_value_view(conn: sqlite3.Connection, program: Program, member: ledger.MemberRow,
                        moment: datetime) -> dict:
    """The segments the member is in, their RFM scores, their offers not yet over and the
    rules whose control group they are in (docs/integrators.md). Like the segments, the
    offers are only the program's: an offer of a rule it no longer has (or no longer
    personal) gives nothing."""
    score = segments.scores_of(conn, member.id)
    member_of = segments_now(conn, program, member.id)
    day = moment.astimezone(program.timezone).date()
    offered = [o for o in offers.listed(conn, member.id, day) if o["rule"] in program.personal_rule_ids]
    return {"segments": [s for s in program.segments if s in member_of],     # in the program's order
            "rfm": Rfm(score.r, score.f, score.m) if score else None,
            "offers": msgspec.convert(offered, list[MemberOffer]),
            "held_out_of": program.held_out_of(member.public_id)}


async def statement(deps: Deps, card: str, since: datetime | None, until: datetime | None,
                    limit: int) -> StatementAnswer:
    member = await member_by_card(deps, card)
    if member is None:
        raise not_found("unknown_card", f"card {card} is not enrolled")
    rows = await deps.db.read(lambda c: ledger.statement(
        c, member.id, iso(since) if since else None, iso(until) if until else None, limit))
    return StatementAnswer(deps.privacy.card_last4(card), member.public_id,
                           msgspec.convert(rows, list[StatementPosting]))


async def set_tier(deps: Deps, card: str, req: schema.TierAssignment) -> MemberAnswer:
    program = deps.program()
    if req.tier not in {t for t, _ in program.tiers}:
        raise field_error("tier", f"is not a tier of program {program.id}")
    member = await find_member(deps, card)
    now = deps.clock.now()

    def write(conn):
        ledger.lock_member(conn, member.id)
        refuse_if_card_moved(conn, deps, card, member)
        ledger.update_member(conn, member.id, {"manual_tier": req.tier,
                                               "manual_tier_until": req.until.isoformat()}, iso(now))
        webhooks.note_tier(conn, program, member.id, now, "assigned")
        return member_view(deps, conn, program, ledger.member_by_id(conn, member.id), card=card)
    return await deps.db.write(write)
