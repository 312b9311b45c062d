"""The program as written: strict msgspec types for every section of the YAML.

These describe what a loyalty manager may write; rules/loader.py turns them into
the compiled Program. Numbers with a fraction are Decimal (built from the YAML
text), never float.
"""

from __future__ import annotations

import re
from datetime import date
from decimal import Decimal
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct, field

from .yamlmarks import YamlInt

MAX_NAME_CHARS = 100
MAX_LIST_ITEMS = 10_000
MAX_LEVELS = 50
MAX_DAYS = 36_500
MAX_POINTS = 1_000_000_000
MAX_PRIORITY = 1_000_000
MAX_SEGMENTS = 500
MAX_COUPON_CAMPAIGNS = 1_000
MAX_USES_PER_CODE = 1_000_000
RFM_SCORES = (1, 5)  # every RFM score is 1 + floor(5 x b / n): 1 to 5

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")


class Name(str):
    """Free text naming a store, SKU, category, brand, flag or tag."""


class Ident(str):
    """An identifier written on ledger postings and admin pages: short, no spaces."""


def decode_hook(kind: type, value: Any) -> Any:
    """Let names be written unquoted even when they look like numbers (SKU 0042)."""
    if kind in (Name, Ident):
        if isinstance(value, YamlInt):
            value = value.text
        elif isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise TypeError(f"expected a name, got {type_word(value)}")
        if not value or len(value) > MAX_NAME_CHARS or not value.isprintable():
            raise TypeError(f"a name must be 1 to {MAX_NAME_CHARS} printable characters")
        if kind is Ident and not _ID_RE.fullmatch(value):
            raise TypeError(
                f"'{value}' is not a valid id: letters, digits and _ . : - (at most 64, starting with a letter or digit)"
            )
        return kind(value)
    raise NotImplementedError(kind)


def type_word(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, Decimal):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if value is None:
        return "nothing"
    return type(value).__name__


Days = Annotated[int, Meta(ge=0, le=MAX_DAYS)]
PositiveDays = Annotated[int, Meta(ge=1, le=MAX_DAYS)]
Points = Annotated[int, Meta(ge=1, le=MAX_POINTS)]
Names = Annotated[list[Name], Meta(max_length=MAX_LIST_ITEMS)]


class Spec(Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class ProgramInfo(Spec, kw_only=True):
    id: Ident
    name: str = ""
    currency: str
    timezone: str


class PointsSpec(Spec, kw_only=True):
    value: Annotated[int, Meta(ge=1, le=1_000_000)]  # minor units one point pays
    rounding: Literal["floor", "half_up", "ceil"] = "floor"
    activation_delay_days: Days = 0
    expiry_days: Days = 0  # 0: points never expire


class LineFilter(Spec, kw_only=True):
    categories: Names = []
    skus: Names = []
    brands: Names = []
    flags: Names = []


class RedemptionSpec(Spec, kw_only=True):
    max_share: Decimal = Decimal(1)
    min_points: Annotated[int, Meta(ge=0, le=MAX_POINTS)] = 0
    exclude: LineFilter = msgspec.field(default_factory=LineFilter)


class HoldsSpec(Spec, kw_only=True):
    ttl_minutes: Annotated[int, Meta(ge=1, le=24 * 60)] = 15


class ReturnsSpec(Spec, kw_only=True):
    # An addition to rules.md: a receipt may be returned at another store of the chain
    # (never of another partner); off, only at a store the register's key may use.
    cross_store: bool = False


class LevelSpec(Spec, kw_only=True):
    id: Ident
    from_: Annotated[int, Meta(ge=0)] = field(name="from")


class TiersSpec(Spec, kw_only=True):
    metric: Literal["spend", "receipts"] = "spend"
    window_days: PositiveDays = 365
    levels: Annotated[list[LevelSpec], Meta(min_length=1, max_length=MAX_LEVELS)]


class StoreSpec(Spec, kw_only=True):
    id: Name
    tags: Names = []
    partner: Ident | None = None


class PartnerSpec(Spec, kw_only=True):
    id: Ident
    name: str = ""
    funding_share: Decimal = Decimal(1)


class EventReward(Spec, kw_only=True):
    points: Points


class EventSpec(Spec, kw_only=True):
    id: Ident
    on: Literal["enrolled", "profile_completed", "birthday", "referred_first_purchase"]
    reward: EventReward
    expires_in_days: PositiveDays | None = None


class PeriodSpec(Spec, kw_only=True):
    from_: date = field(name="from")
    to: date


class ScopeSpec(Spec, kw_only=True):
    categories: Names | None = None
    skus: Names | None = None
    brands: Names | None = None
    exclude_categories: Names = []
    exclude_skus: Names = []
    exclude_brands: Names = []
    exclude_flags: Names = []


class PerAmountSpec(Spec, kw_only=True):
    every: Annotated[int, Meta(ge=1, le=MAX_POINTS)]  # minor units
    points: Points


class RewardSpec(Spec, kw_only=True):
    percent: Decimal | None = None
    points: Points | None = None
    per_unit: Decimal | None = None
    per_amount: PerAmountSpec | None = None
    multiply: Ident | None = None
    by: Decimal | None = None


REWARD_KINDS = ("percent", "points", "per_unit", "per_amount", "multiply")


class PerMemberSpec(Spec, kw_only=True):
    count: Annotated[int, Meta(ge=1, le=1_000_000)]
    per: Literal["day", "week", "month", "period"]


class LimitSpec(Spec, kw_only=True):
    per_member: PerMemberSpec


class BudgetSpec(Spec, kw_only=True):
    points: Points


RfmScore = Annotated[int, Meta(ge=RFM_SCORES[0], le=RFM_SCORES[1])]
RfmRange = Annotated[list[RfmScore], Meta(min_length=2, max_length=2)]  # [low, high], both included


class RfmRangesSpec(Spec, kw_only=True):
    r: RfmRange | None = None
    f: RfmRange | None = None
    m: RfmRange | None = None


class RfmSettingsSpec(Spec, kw_only=True):
    window_days: PositiveDays = 365


class SegmentSpec(Spec, kw_only=True):
    id: Ident
    rfm: RfmRangesSpec | None = None
    when: dict[str, Any] | None = None
    list_: bool = field(name="list", default=False)


class SegmentsSpec(Spec, kw_only=True):
    rfm: RfmSettingsSpec = field(default_factory=RfmSettingsSpec)
    # Each entry is decoded on its own (rules/loader.py), so one bad segment leaves the
    # others checked.
    define: Annotated[list[Any], Meta(max_length=MAX_SEGMENTS)] = []


class CouponSpec(Spec, kw_only=True):
    id: Ident
    uses_per_code: Annotated[int, Meta(ge=1, le=MAX_USES_PER_CODE)] = 1
    valid: PeriodSpec | None = None  # inclusive local dates; none: any day


class RuleSpec(Spec, kw_only=True):
    id: Ident
    group: Ident | None = None
    priority: Annotated[int, Meta(ge=-MAX_PRIORITY, le=MAX_PRIORITY)] = 0
    when: dict[str, Any] | None = None
    period: PeriodSpec | None = None
    scope: ScopeSpec | None = None
    reward: RewardSpec
    limit: LimitSpec | None = None
    budget: BudgetSpec | None = None
    expires_in_days: PositiveDays | None = None
    personal: bool = False  # only for members holding an offer of it
    holdout: Decimal | None = None  # share of members in the control group, 0 < h <= 0.5


# Top-level keys that hold settings (each in one file only) and lists (concatenated).
SETTINGS: dict[str, Any] = {
    "program": ProgramInfo,
    "points": PointsSpec,
    "exclusions": LineFilter,
    "redemption": RedemptionSpec,
    "holds": HoldsSpec,
    "returns": ReturnsSpec,
    "tiers": TiersSpec,
    "stores": Annotated[list[StoreSpec], Meta(max_length=100_000)],
    "partners": Annotated[list[PartnerSpec], Meta(max_length=10_000)],
    "segments": SegmentsSpec,
}
# A coupon campaign is a list item, so each campaign's file can define its own.
LISTS: dict[str, Any] = {"rules": RuleSpec, "events": EventSpec, "coupons": CouponSpec}
REQUIRED_SETTINGS = ("program", "points")
