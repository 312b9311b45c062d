"""The member of a receipt replayed through a program: `rules diff`, the console's backtest
and the explanation of a stored receipt.

A receipt confirmed since member facts are recorded (storage/member_facts.py) is replayed
with them: the member's id (so control groups are drawn as at the server), their tier,
tags, birthday, enrolment, receipt number, segments, personal offers and the coupon
campaigns they had a usable code of. ReplayMember is that record as JSON, the `member`
object of a line of `loyalty export receipts`; a person may write one by hand with any
of its keys. A receipt without one is replayed as a returning member of the program's
first tier without tags, segments, offers or coupons, and the replay counts it.

The tier is the program's own: one that defines other levels gets the level the recorded
window totals reach (the manual tier when it defines that). A personal offer gives at
most what it had left when the receipt arrived, corrected by what the replayed program
gave on the member's earlier receipts of the replay against what the server gave.
"""
from __future__ import annotations

from datetime import date
from typing import Annotated

import msgspec

from rules import MemberFacts, Program
from storage.member_facts import USABLE, ReceiptMemberFacts

DEFAULT_RECEIPT_NUMBER = 2  # a returning member: first-purchase rules stay out of a replay
CODE_NOT_KEPT = "(code not kept)"   # what a usable code of a recorded receipt shows as: only its campaign is kept
ID_CHARS_MAX = 200


class ReplayTier(msgspec.Struct, forbid_unknown_fields=True):
    window_days: Annotated[int, msgspec.Meta(ge=1)]
    spend: int = 0          # net receipt totals in the window before ts, minor units
    receipts: Annotated[int, msgspec.Meta(ge=0)] = 0
    manual: str | None = None


class ReplayOffer(msgspec.Struct, forbid_unknown_fields=True):
    rule: str
    points_left: Annotated[int, msgspec.Meta(ge=0)] | None = None   # None: no budget of its own
    charged: Annotated[int, msgspec.Meta(ge=0)] = 0                 # what the server gave of it on this receipt


class ReplayCoupon(msgspec.Struct, forbid_unknown_fields=True):
    status: str             # as judged at the receipt's ts; `usable` makes its campaign's rules hold
    campaign: str | None = None


class ReplayHeldOut(msgspec.Struct, forbid_unknown_fields=True):
    rule: str
    points: int


class ReplayMember(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    member_id: Annotated[str, msgspec.Meta(min_length=1, max_length=ID_CHARS_MAX)] | None = None
    tier: str | None = None
    tier_facts: ReplayTier | None = None
    tags: list[str] = []
    birthday: date | None = None
    enrolled_on: date | None = None
    receipt_number: Annotated[int, msgspec.Meta(ge=1)] = DEFAULT_RECEIPT_NUMBER
    segments: list[str] = []
    offers: list[ReplayOffer] = []
    coupons: list[ReplayCoupon] = []
    held_out: list[ReplayHeldOut] = []      # what the server held back; the replay draws control groups anew


def from_record(record: ReceiptMemberFacts) -> ReplayMember:
    t = record.tier
    return ReplayMember(
        record.member_id, t.id, ReplayTier(t.window_days, t.spend, t.receipts, t.manual), list(record.tags),
        record.birthday, record.enrolled_on, record.receipt_number, list(record.segments),
        [ReplayOffer(o.rule, o.points_left, o.charged) for o in record.offers],
        [ReplayCoupon(c.status, c.campaign) for c in record.coupons],
        [ReplayHeldOut(h.rule, h.points) for h in record.held_out])


def tier_in(program: Program, member: ReplayMember) -> str:
    levels = [level for level, _ in program.tiers]
    facts = member.tier_facts
    if facts is not None and facts.manual in levels:
        return facts.manual
    if facts is not None and facts.window_days == program.tier_window_days:
        return program.tier_for(facts.spend if program.tier_metric == "spend" else facts.receipts)[0]
    # Totals of another window say nothing of this one: the tier as recorded, if the program has it.
    return member.tier if member.tier in levels else levels[0]


def facts_for(program: Program, member: ReplayMember | None, fallback_id: str,
              offers_left: dict[str, int | None] | None = None) -> MemberFacts:
    """What the program's rules see. offers_left: each offer's points left, when the replay
    corrected them (Replay); by default as recorded."""
    if member is None:
        return MemberFacts(member_id=fallback_id, tier=program.tiers[0][0], receipt_number=DEFAULT_RECEIPT_NUMBER)
    if offers_left is None:
        offers_left = {offer.rule: offer.points_left for offer in member.offers}
    return MemberFacts(
        member_id=member.member_id or fallback_id, tier=tier_in(program, member), tags=frozenset(member.tags),
        birthday=member.birthday, enrolled_on=member.enrolled_on, receipt_number=member.receipt_number,
        segments=frozenset(member.segments), offers=offers_left,
        coupons={c.campaign: CODE_NOT_KEPT for c in member.coupons if c.status == USABLE and c.campaign})


class OfferDrift:
    """Per member and personal rule: what the server gave on the replay's earlier receipts
    less what the replayed program gave, added to what each later receipt's offer had left,
    so a program that gives more exhausts the offer sooner, as it would have."""

    def __init__(self) -> None:
        self._drift: dict[tuple[str, str], int] = {}

    def left(self, who: str, member: ReplayMember) -> dict[str, int | None]:
        return {o.rule: None if o.points_left is None else max(0, o.points_left + self._drift.get((who, o.rule), 0))
                for o in member.offers}

    def given(self, who: str, member: ReplayMember, by_rule: dict[str, int]) -> None:
        for o in member.offers:
            if o.points_left is not None:
                self._drift[(who, o.rule)] = self._drift.get((who, o.rule), 0) + o.charged - by_rule.get(o.rule, 0)
