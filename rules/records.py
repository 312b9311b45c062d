"""What the rules package hands to the server: facts in, evaluations out."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import msgspec


class MemberFacts(msgspec.Struct, frozen=True):
    """What the conditions may know about the member behind a receipt.

    segments: the segments the member is in when the receipt arrives. offers: for each
    personal rule the member holds an offer of valid at the receipt's ts, the points that
    offer may still give (None: no budget of its own). coupons: for each coupon campaign
    the receipt carries a usable code of (valid at ts, not used up, not bound to another
    card), the first such code in the receipt's order.
    """

    member_id: str
    tier: str
    tags: frozenset[str] = frozenset()
    birthday: date | None = None
    enrolled_on: date | None = None
    receipt_number: int = 1  # this receipt is the member's n-th confirmed one
    segments: frozenset[str] = frozenset()
    offers: dict[str, int | None] = {}
    coupons: dict[str, str] = {}


class SegmentFacts(msgspec.Struct, frozen=True):
    """What a segment's `when` may know about a member, at the daily job's moment.

    The window is the program's `segments.rfm.window_days` before that moment.
    """

    tier: str
    tags: frozenset[str] = frozenset()
    days_since_last_purchase: int | None = None  # None: no confirmed receipt ever
    receipts_in_window: int = 0
    spend_in_window: int = 0  # net totals, minor units
    enrolled_days: int | None = None  # from the enrolment day (day 0); None: not known
    rfm: tuple[int, int, int] | None = None  # (r, f, m) scores; None: not scored


class CouponCampaign(msgspec.Struct, frozen=True):
    id: str
    uses_per_code: int
    valid_from: date | None = None  # inclusive local dates; None: no bound
    valid_to: date | None = None

    def valid_on(self, day: date) -> str | None:
        """None when a code may be used on this local date, else why not."""
        if self.valid_from is not None and day < self.valid_from:
            return "not_yet_valid"
        if self.valid_to is not None and day > self.valid_to:
            return "expired"
        return None


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
    # With below_min_redemption: the most the receipt lets be paid with points, when that and
    # not the request is what falls short (so the refusal can say which it was).
    redeem_most: int | None = None
    accrued_points: int = 0
    pairs: list[tuple[str, int, int]] = []  # (rule_id, line_no, points), points != 0
    by_rule: list[tuple[str, int]] = []  # fired rules in definition order
    by_line: list[tuple[int, int]] = []  # every line that may earn, 0 included
    fired: list[str] = []
    lots: list[tuple[date, date | None, int]] = []  # (available_from, expires_on, points)
    # Rules the member is in the control group of and that would have fired, with the
    # points they would have given; none of them is in pairs, by_rule or fired.
    held_out: list[tuple[str, int]] = []
    coupons_used: dict[str, str] = {}  # campaign -> the code a fired rule needed
