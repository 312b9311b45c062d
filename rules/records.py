"""What the rules package hands to the server: facts in, evaluations out."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import msgspec


class MemberFacts(msgspec.Struct, frozen=True):
    """What the conditions may know about the member behind a receipt."""

    member_id: str
    tier: str
    tags: frozenset[str] = frozenset()
    birthday: date | None = None
    enrolled_on: date | None = None
    receipt_number: int = 1  # this receipt is the member's n-th confirmed one


class Store(msgspec.Struct, frozen=True):
    id: str
    tags: tuple[str, ...] = ()
    partner: str | None = None


class Partner(msgspec.Struct, frozen=True):
    id: str
    name: str
    funding_share: Decimal  # share of points issued at its stores that it pays for


class EventRule(msgspec.Struct, frozen=True):
    id: str
    on: str
    points: int
    expires_in_days: int | None = None


class Evaluation(msgspec.Struct):
    """One receipt computed: what is redeemed, what is earned, and by which rule and line.

    Integers in pairs, by_rule and by_line all sum to accrued_points exactly;
    redeemed_by_line sums to redeemed_points and discount exactly.
    """

    local_date: date
    available_from: date
    expires_on: date | None
    redeemed_points: int = 0
    discount: int = 0
    redeemed_by_line: list[tuple[int, int, int]] = []  # (line_no, points, discount)
    redeem_refusal: str | None = None  # below_min_redemption | insufficient_points
    accrued_points: int = 0
    pairs: list[tuple[str, int, int]] = []  # (rule_id, line_no, points), points != 0
    by_rule: list[tuple[str, int]] = []  # fired rules in definition order
    by_line: list[tuple[int, int]] = []  # every line that may earn, 0 included
    fired: list[str] = []
    lots: list[tuple[date, date | None, int]] = []  # (available_from, expires_on, points)
