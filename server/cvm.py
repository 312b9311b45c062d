"""Segments, personal offers and coupon codes over HTTP (manager role): thin handlers over
storage/segments.py, storage/offers.py and storage/coupons.py.

What the program defines (its segments, its coupon campaigns, which rules are personal) is
read through `app[DEFINITIONS]`, a function of the serving program returning `Definitions`
(tests give their own): `definitions_of` reads the program's `segments.define`, `coupons`
and its rules' `personal` and `holdout`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import date
from typing import Callable

import msgspec
from aiohttp import web

from server import answer_types as A, member_care, report_audience, report_campaign, schema
from server.errors import ApiError, conflict, field_error, not_found, problems_error, unprocessable
from server.keys import CLOCK, DATABASE, PRIVACY, PROGRAMS
from server.ops import keyed_fingerprints
from server.privacy import candidates
from server.validation import Problems
from rules.problems import suggest
from storage import coupons, ledger, offers, segments
from storage.ledger import member_id_of_card
from storage.member_care import RetiredCard, reachable_holders, retired_card
from storage.schema import legacy_fingerprint
from storage.sql import WriteConflict


@dataclass(frozen=True)
class Definitions:
    """The program's side of customer value management, in the terms of this module."""
    segments: list[segments.SegmentDefinition] = field(default_factory=list)
    coupons: dict[str, coupons.Campaign] = field(default_factory=dict)
    # rule id -> whether it is `personal: true`; a rule the program does not have is absent.
    personal: dict[str, bool] = field(default_factory=dict)
    # Every rule, as the campaign effect report sees it (holdout None: no control group).
    rules: dict[str, report_campaign.CampaignRule] = field(default_factory=dict)

    def segment(self, segment_id: str) -> segments.SegmentDefinition | None:
        return next((s for s in self.segments if s.id == segment_id), None)


def no_such(kind: str, name: str, known) -> str:
    """A name the program does not define, with the nearest one it does: a manager's typo
    ("staf") is answered with the name meant, as `loyalty rules check` answers it."""
    if kind == "rule":
        return f"the program has no rule {name}{suggest(name, known)}"
    return f"the program defines no {kind} {name}{suggest(name, known)}"


def definitions_of(program) -> Definitions:
    """What the program defines (rules/program.py), in this module's terms."""
    def score_range(bounds):
        return segments.ScoreRange(*bounds) if bounds else None
    return Definitions(
        segments=[segments.SegmentDefinition(s.id, score_range(s.rfm.get("r")), score_range(s.rfm.get("f")),
                                             score_range(s.rfm.get("m")), list=s.kind == "list",
                                             when=s.kind == "when")
                  for s in program.segments.values()],
        coupons={c.id: coupons.Campaign(c.id, c.uses_per_code, c.valid_from, c.valid_to)
                 for c in program.coupons.values()},
        personal={r.id: r.personal for r in program.rules},
        rules={r.id: campaign_rule(program, r) for r in program.rules})


def campaign_rule(program, rule) -> report_campaign.CampaignRule:
    """The report's view of a rule: its period (the default report period), who meets its
    member conditions on a day (server/report_audience.py) and the lines in its scope (after
    the program's exclusions, as earning sees them)."""
    period_from, period_to = rule.period if rule.period else (None, None)
    return report_campaign.CampaignRule(rule.id, rule.holdout, period_from, period_to,
                                        audience_on=report_audience.audience_of(program, rule),
                                        in_scope=_scope_test(program.exclusions, rule.scope))


def _scope_test(exclusions, scope):
    def in_scope(line: dict) -> bool:
        facts = (line.get("category"), line.get("sku", ""), line.get("brand"), tuple(line.get("flags") or ()))
        return not exclusions.hits(*facts) and scope.selects(*facts)
    return in_scope


DEFINITIONS = web.AppKey("cvm_definitions", Callable)


def definitions(app) -> Definitions:
    return app.get(DEFINITIONS, definitions_of)(app[PROGRAMS].current)


# ------------------------------------------------------------------ handlers

# Cards a refused request lists in `details`, in the order sent; the message counts them all.
REFUSED_CARDS_LISTED_MAX = 100
NOT_ENROLLED = "is not an enrolled card"
RETIRED_CODES = {"replaced": "card_replaced", "merged": "card_merged"}


def members_of_cards(conn, privacy, cards: list[str]) -> list[int]:
    """The members of the cards, or a 422 naming every card that has none: not enrolled, or
    taken out of use by a replacement or a merge (which says the card to use instead, as a
    single card's call does). Each card is looked for under its hash in force and the
    earlier keys' (a card `privacy rotate-key` has not wrapped yet) in one statement, as
    every look-up is."""
    found, refused = [], []
    for i, card in enumerate(cards):
        digest = privacy.card(card)
        member_id = member_id_of_card(conn, digest)
        if member_id is None:
            refused.append((i, card, retired_card(conn, digest)))
        else:
            found.append(member_id)
    if refused:
        raise cards_refused(refused)
    return found


def locked_members_of_cards(conn, privacy, cards: list[str]) -> list[int]:
    """members_of_cards, read again under the members' locks (PostgreSQL), for a write that
    gives them an offer or changes their list segments: a merge that committed between the
    look-up and the lock moved the member's offers and lists before this wrote, and what
    this wrote would stay on a member no card reaches. Read again, such a card is refused as
    merged (or the write runs again, for a card given to another member meanwhile)."""
    found = members_of_cards(conn, privacy, cards)
    if ledger.lock_members(conn, found) and members_of_cards(conn, privacy, cards) != found:
        raise WriteConflict("a card changed members while its offer or segment was written")
    return found


def cards_refused(refused: list[tuple[int, str, RetiredCard | None]]) -> ApiError:
    """The code is the first refused card's (in the order sent): `unknown_card`,
    `card_replaced` or `card_merged`; `details` says what happened to each."""
    first = refused[0][2]
    code = "unknown_card" if first is None else RETIRED_CODES[first.reason]
    retired = sum(r is not None for _, _, r in refused)
    message = (f"{len(refused)} of the cards are not enrolled; nothing was changed" if not retired else
               f"{len(refused)} of the cards have no member ({len(refused) - retired} not enrolled, {retired} "
               "taken out of use by a replacement or a merge: details name the card to use); nothing was changed")
    return unprocessable(code, message, [{"path": f"cards[{i}]", "message": _why_refused(card, r)}
                                         for i, card, r in refused[:REFUSED_CARDS_LISTED_MAX]])


def _why_refused(card: str, retired: RetiredCard | None) -> str:
    if retired is None:
        return NOT_ENROLLED
    if retired.reason == "replaced":
        return (f"card {card} was replaced on {retired.retired_at[:10]} by the card ending {retired.successor}: "
                "use that card")
    return (f"card {card} belonged to m_{retired.member_id}, merged into {retired.successor} on "
            f"{retired.retired_at[:10]}: use that member's card")


def _list_segment(app, segment_id: str) -> segments.SegmentDefinition:
    d = definitions(app).segment(segment_id)
    if d is None:
        raise not_found("unknown_segment", no_such("segment", segment_id, (s.id for s in definitions(app).segments)))
    if not d.list:
        raise unprocessable("segment_not_list", f"segment {segment_id} is computed from its definition; "
                            "only a `list: true` segment takes members")
    return d


async def put_segment_members(app, call):
    return await _change_segment(app, call, segments.add_members)


async def delete_segment_members(app, call):
    return await _change_segment(app, call, segments.remove_members)


async def _change_segment(app, call, change):
    from server.routes import json_reply
    d = _list_segment(app, call.path["id"])
    privacy, now = app[PRIVACY], app[CLOCK].now()

    def write(conn):
        return change(conn, d.id, locked_members_of_cards(conn, privacy, call.body.cards), now)
    size = await app[DATABASE].write(write, off_loop=True)
    return json_reply(A.SegmentSizeAnswer(d.id, size))


def offer_fingerprints(privacy, body: schema.OfferAssignment) -> list[str]:
    """The offer's fingerprints (server.ops.keyed_fingerprints): its cards replaced by their
    keyed hashes, sorted, so the same cards in another order are the same offer; last, the
    one m031 left an offer assigned before fingerprints were keyed."""
    if body.cards is None:      # no card in it; marked with the key all the same, as rotate-key reads them
        fingerprints = keyed_fingerprints(lambda i: schema.canonical(body), privacy.key_ids)
    else:
        hashes = [candidates(privacy.card(card)) for card in body.cards]
        fingerprints = keyed_fingerprints(lambda i: schema.canonical(
            msgspec.structs.replace(body, cards=sorted(h[i] for h in hashes))), privacy.key_ids)
    return fingerprints + [legacy_fingerprint(body.offer_id, body.rule, body.from_.isoformat(), body.to.isoformat(),
                                              body.points)]


def check_offer(defs: Definitions, body: schema.OfferAssignment) -> None:
    """A 422 for an offer that cannot be: dates the wrong way, not one of cards and segment,
    a rule the program lacks or one that is not personal."""
    problems = Problems()
    if body.to < body.from_:
        problems.add("to", "must not be before from")
    if (body.cards is None) == (body.segment is None):
        problems.add("cards", "give either cards or segment, not both and not neither")
    if problems.count:
        raise problems_error(problems)
    personal = defs.personal.get(body.rule)
    if personal is None:
        raise field_error("rule", f"is {body.rule}, a rule the program does not have{suggest(body.rule, defs.personal)}",
                          "unknown_rule")
    if not personal:
        raise field_error("rule", f"is {body.rule}, a rule that is not personal (it applies without an offer)",
                          "rule_not_personal")


def offer_warnings(body: schema.OfferAssignment, rule: report_campaign.CampaignRule | None,
                   today: date) -> list[str]:
    """What is odd about an offer that is taken all the same: a receipt sent late is judged
    at its ts, so dates already past, or outside the rule's period, are not refused."""
    found = []
    if body.to < today:
        found.append(f"the offer ends {body.to}, before today ({today}): it applies only to receipts "
                     "dated up to then")
    if rule is None or rule.period_from is None or rule.period_to is None:
        return found
    start, end = rule.period_from, rule.period_to
    if end < body.from_:
        found.append(f"the rule's period ends {end}, before the offer starts ({body.from_}): the offer "
                     "never applies")
    elif start > body.to:
        found.append(f"the rule's period starts {start}, after the offer ends ({body.to}): the offer "
                     "never applies")
    else:
        if body.from_ < start:
            found.append(f"the offer starts {body.from_}, before the rule's period ({start}): it applies "
                         f"from {start}")
        if body.to > end:
            found.append(f"the offer ends {body.to}, after the rule's period ({end}): it applies up to {end}")
    return found


def coupon_warnings(campaign: coupons.Campaign, today: date) -> list[str]:
    """As offer_warnings: codes of a campaign that has ended are made all the same."""
    if campaign.valid_to is not None and campaign.valid_to < today:
        return [f"the campaign's codes are valid until {campaign.valid_to}, before today ({today}): they "
                "apply only to receipts dated up to then"]
    return []


def _today(app, now) -> date:
    """The program's local date: offers' and campaigns' dates are local dates."""
    return now.astimezone(app[PROGRAMS].current.timezone).date()


async def assign_offer(app, call):
    from server.routes import json_reply
    body: schema.OfferAssignment = call.body
    check_offer(definitions(app), body)
    d = None
    if body.segment is not None:
        d = definitions(app).segment(body.segment)
        if d is None:
            raise field_error("segment", f"is {body.segment}, a segment the program does not define"
                              + suggest(body.segment, (s.id for s in definitions(app).segments)), "unknown_segment")
    privacy, now = app[PRIVACY], app[CLOCK].now()
    digest = offer_fingerprints(privacy, body)

    def write(conn):
        # A member merged away since the segment was decided is no one's card: the offer is
        # its customer's, on the member that took it over, as a merge moves offers. One
        # erased since has no card at all: it gets nothing.
        members = reachable_holders(conn, segments.members_of(conn, d)) if d else \
            locked_members_of_cards(conn, privacy, body.cards)
        return offers.assign(conn, body.offer_id, body.rule, digest, body.from_, body.to, body.points, members, now)
    try:
        done = await app[DATABASE].write(write, off_loop=True)
    except offers.OfferConflict as e:
        raise conflict("idempotency_conflict", str(e)) from None
    warnings = offer_warnings(body, definitions(app).rules.get(body.rule), _today(app, now))
    return json_reply(A.OfferAnswer(body.offer_id, body.rule, done.members, warnings),
                      201 if done.created else 200)


async def create_coupons(app, call):
    from server.routes import json_reply
    campaign = call.path["campaign"]
    if campaign not in definitions(app).coupons:
        raise not_found("unknown_coupon_campaign", no_such("coupon campaign", campaign, definitions(app).coupons))
    body: schema.CouponRequest = call.body
    if body.card:   # a card taken out of use can never present them: say which card to use
        await member_care.refuse_retired(app, body.card)
    privacy, now = app[PRIVACY], app[CLOCK].now()
    card_hmac = privacy.card(body.card) if body.card else None
    codes = [coupons.new_code() for _ in range(body.count)]

    taken = await app[DATABASE].write(
        lambda conn: add_codes_for_card(conn, campaign, codes, body.card, card_hmac, privacy, now), off_loop=True)
    if taken:   # two draws of 60 random bits met: answer only codes that are the caller's alone
        raise ApiError(503, "try_again", "a generated code collided with an existing one; nothing was lost, "
                       "ask again", headers={"Retry-After": "0"})
    warnings = coupon_warnings(definitions(app).coupons[campaign], _today(app, now))
    return json_reply(A.CouponCodesAnswer(campaign, codes, warnings), 201)


def add_codes_for_card(conn, campaign: str, codes: list[str], card: str | None, card_hmac: str | None, privacy,
                       now) -> list[str]:
    """coupons.add_codes, refusing (card_replaced, card_merged) a card taken out of use: no
    register could ever present codes bound to it. Checked in the write: a replacement or a
    merge of the card committed after any earlier look at it rebound the codes it found, not
    these. Under its member's lock (PostgreSQL) a replacement or merge waits for these, or is
    seen here."""
    if card_hmac is not None:
        ledger.lock_member_of_card(conn, card_hmac)
        if (retired := retired_card(conn, card_hmac)) is not None:
            raise member_care.retired_refusal(card, retired)
    return coupons.add_codes(conn, campaign, codes, card_hmac, privacy.coupon, now)


def routes():
    from server.routes import MANAGER, Route, created, ok
    manager = frozenset({MANAGER})
    return [
        Route("PUT", "/v1/admin/segments/{id}/members", put_segment_members, manager, schema.SegmentCards,
              "Add cards' members to a `list` segment: {cards}; answers its size; idempotent",
              answers=ok(A.SegmentSizeAnswer)),
        Route("DELETE", "/v1/admin/segments/{id}/members", delete_segment_members, manager, schema.SegmentCards,
              "Remove cards' members from a `list` segment: {cards}; answers its size; idempotent",
              answers=ok(A.SegmentSizeAnswer)),
        Route("POST", "/v1/admin/offers", assign_offer, manager, schema.OfferAssignment,
              "Offer a personal rule to cards or to a segment's members now: {offer_id, rule, cards | segment, "
              "from, to, points?}; 200 when repeated with the same body, 409 with another",
              answers=created(A.OfferAnswer)),
        Route("POST", "/v1/admin/coupons/{campaign}/codes", create_coupons, manager, schema.CouponRequest,
              "New random codes of a coupon campaign: {count, card?}",
              answers=created(A.CouponCodesAnswer, replayed=False)),
    ]
