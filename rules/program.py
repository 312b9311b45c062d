"""A loaded program: settings, compiled rules and the engine holding their conditions."""

from __future__ import annotations

import calendar
import weakref
from datetime import date, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from .conditions import Cmp, Group, Node
from .evaluate import evaluate
from .explain import Explanation, explain
from .matching import Matcher
from .problems import Problem
from .records import CouponCampaign, EventRule, Evaluation, MemberFacts, Partner, SegmentFacts, Store
from .segments import Segment, holdout_member

MAX_LINE_CLASSES = 50_000  # distinct (category, sku, brand, flags) remembered per program
MAX_CANDIDATE_SETS = 4096  # distinct sets of held conditions remembered per program (the matcher's cache size)


# The window of `per: period` for a rule without a period (ledger.rule_usage compares ISO dates).
ALL_TIME = (date.min, date.max)


class LineFilter:
    """Which lines a set of categories/skus/brands/flags selects or excludes."""

    __slots__ = ("categories", "skus", "brands", "flags")

    def __init__(self, categories=(), skus=(), brands=(), flags=()):
        self.categories = frozenset(categories)
        self.skus = frozenset(skus)
        self.brands = frozenset(brands)
        self.flags = frozenset(flags)

    def hits(self, category: str | None, sku: str, brand: str | None, flags: tuple[str, ...]) -> bool:
        return (
            category in self.categories
            or sku in self.skus
            or brand in self.brands
            or any(flag in self.flags for flag in flags)
        )


class Scope:
    """A rule's own line selection (program exclusions are applied before it)."""

    __slots__ = ("categories", "skus", "brands", "exclude")

    def __init__(self, categories=None, skus=None, brands=None, exclude: LineFilter | None = None):
        self.categories = frozenset(categories) if categories is not None else None
        self.skus = frozenset(skus) if skus is not None else None
        self.brands = frozenset(brands) if brands is not None else None
        self.exclude = exclude or LineFilter()

    def selects(self, category: str | None, sku: str, brand: str | None, flags: tuple[str, ...]) -> bool:
        if self.categories is not None and category not in self.categories:
            return False
        if self.skus is not None and sku not in self.skus:
            return False
        if self.brands is not None and brand not in self.brands:
            return False
        return not self.exclude.hits(category, sku, brand, flags)


class CompiledRule:
    """One rule ready to evaluate; reward numbers are integer ratios.

    personal: applies only to members holding an offer of it. holdout: the share of
    members in its control group (Decimal, 0 < h <= 0.5), or None. coupons: the coupon
    campaigns its conditions name (not negated), in the order written.
    """

    __slots__ = (
        "index", "id", "group", "priority", "condition", "period", "scope", "kind",
        "ratio_num", "ratio_den", "points", "every", "multiply", "limit_count", "limit_per",
        "budget", "expires_in_days", "personal", "holdout", "coupons", "file", "line", "summary", "when",
    )  # fmt: skip

    def __init__(self, **values: Any):
        for name in self.__slots__:
            setattr(self, name, values.get(name))


class Program:
    """An immutable loaded program. evaluate() may be called from any one thread at a time
    per call; the engine serializes its own access."""

    def __init__(self, *, settings: dict[str, Any], rules: list[CompiledRule], conditions: list[Node],
                 member_tag_fields: dict[str, str], store_tag_fields: dict[str, str],
                 events: list[EventRule], files: list[tuple[str, str]], version: str,
                 warnings: list[Problem] | None = None, segment_fields: dict[str, str] | None = None,
                 coupon_fields: dict[str, str] | None = None, segments: list[Segment] | None = None,
                 coupons: list[CouponCampaign] | None = None):  # fmt: skip
        self.version = version
        self.files = files
        self.warnings: list[Problem] = list(warnings or [])  # what `rules check` warns about; it loads
        self.id: str = settings["id"]
        self.name: str = settings["name"]
        self.currency: str = settings["currency"]
        self.timezone_name: str = settings["timezone"]
        self.timezone = ZoneInfo(self.timezone_name)
        self.point_value: int = settings["point_value"]
        self.rounding: str = settings["rounding"]
        self.activation_delay_days: int = settings["activation_delay_days"]
        self.expiry_days: int = settings["expiry_days"]
        self.hold_ttl_minutes: int = settings["hold_ttl_minutes"]
        # A receipt may be returned at another store without a partner or of the same partner.
        self.returns_cross_store: bool = settings["returns_cross_store"]
        self.redemption_min_points: int = settings["min_points"]
        self.redemption_max_share: Decimal = settings["max_share"]
        self.tier_metric: str = settings["tier_metric"]
        self.tier_window_days: int = settings["tier_window_days"]
        self.tiers: list[tuple[str, int]] = settings["tiers"]
        self.stores: dict[str, Store] = settings["stores"]
        self.partners: dict[str, Partner] = settings["partners"]
        self.exclusions: LineFilter = settings["exclusions"]
        self.redemption_exclusions: LineFilter = settings["redemption_exclusions"]
        self.rules = rules
        self.events = events
        self.budgets = {rule.id: rule.budget for rule in rules if rule.budget}
        # Which rules to look at for a receipt: those without a condition always, the others
        # by the conditions that hold (one condition per rule), not a pass over every rule.
        self.unconditional = tuple(rule.index for rule in rules if rule.condition is None)
        self.rule_of_condition = {rule.condition: rule.index for rule in rules if rule.condition is not None}
        # Rules a member's offers, limits, budget or offer caps may stop: the others pass once their conditions hold.
        self.restricted = frozenset(rule.index for rule in rules
                                    if rule.personal or rule.limit_count is not None or rule.budget)
        self._candidates: dict[Any, tuple[tuple[CompiledRule, ...], tuple[CompiledRule, ...]]] = {}
        self.limited_rule_ids = frozenset(rule.id for rule in rules if rule.limit_per is not None)
        self._by_id = {rule.id: rule for rule in rules}
        # The rules whose points expire by their own `expires_in_days`, not the program's.
        self.rule_expiry_days = {rule.id: rule.expires_in_days for rule in rules if rule.expires_in_days is not None}
        self.rule_summaries = [rule.summary for rule in rules]
        self.member_tag_fields = member_tag_fields
        self.store_tag_fields = store_tag_fields
        self.segment_fields = segment_fields or {}  # segment id -> fact field
        self.coupon_fields = coupon_fields or {}  # coupon campaign id -> fact field
        # Segments in definition order; receipts, tier and the RFM scores are counted over
        # the segment_window_days before the daily job's moment.
        self.segments: dict[str, Segment] = {segment.id: segment for segment in segments or []}
        self.segment_window_days: int = settings.get("segment_window_days", 365)
        # A member's stored segments count only as the kind the program defines them: kept
        # as sets so that each receipt takes its own by two intersections.
        self.list_segment_ids = frozenset(s.id for s in self.segments.values() if s.kind == "list")
        self.computed_segment_ids = frozenset(s.id for s in self.segments.values() if s.kind != "list")
        self.coupons: dict[str, CouponCampaign] = {coupon.id: coupon for coupon in coupons or []}
        self.personal_rule_ids = frozenset(rule.id for rule in rules if rule.personal)
        # The rules whose conditions name a coupon campaign: only they may need a code.
        self.coupon_rule_indexes = frozenset(rule.index for rule in rules if rule.coupons)
        self.holdout_rules = {rule.id: rule.holdout for rule in rules if rule.holdout is not None}
        share_num, share_den = self.redemption_max_share.as_integer_ratio()
        self.max_share_ratio = (share_num, share_den)
        self.groups = _groups(rules)
        self.line_classes: dict[Any, tuple[bool, bool, frozenset[int]]] = {}
        self.line_key = _line_key([self.exclusions, self.redemption_exclusions,
                                   *(rule.scope for rule in rules), *(rule.scope.exclude for rule in rules)])
        self.matcher = Matcher(conditions)
        self._finalizer = weakref.finalize(self, self.matcher.close)
        # The coupon rules that need every campaign they name whenever they fire: each is
        # one the condition cannot hold without, so a receipt need not try the condition
        # without each of them to know (rules/evaluate.py _coupons_used).
        self.coupon_rules_needing_all = frozenset(
            rule.index for rule in rules
            if rule.coupons and _all_required(conditions[rule.condition], [self.coupon_fields[c] for c in rule.coupons]))

    def evaluate(self, receipt: Any, member: MemberFacts | None, redeem_requested: int,
                 redeem_available: int, usage: dict[str, int],
                 budget_left: dict[str, int] | None = None) -> Evaluation:  # fmt: skip
        """Compute one receipt (rules.md "Computing one receipt").

        usage: times each limited rule already fired for this member in its current
        window (see limit_windows). budget_left: points each budgeted rule may still
        issue; a rule with nothing left does not apply, one with less is cut to it.
        """
        return evaluate(self, receipt, member, redeem_requested, redeem_available, usage, budget_left)

    def explain(self, receipt: Any, member: MemberFacts | None, redeem_requested: int = 0,
                redeem_available: int | None = None, usage: dict[str, int] | None = None,
                budget_left: dict[str, int] | None = None) -> Explanation:  # fmt: skip
        """Why each rule applied or not on this receipt, with evaluate()'s points (rules/explain.py).

        redeem_available None: as many points as requested. usage/budget_left None:
        limits and budgets are not checked, and each such rule says so.
        """
        return explain(self, receipt, member, redeem_requested, redeem_available, usage, budget_left)

    def computed_segments(self, facts: SegmentFacts) -> frozenset[str]:
        """The `rfm` and `when` segments the member is in (`list` segments are stored)."""
        return frozenset(segment.id for segment in self.segments.values() if segment.holds(facts))

    def held_out_of(self, member_id: str) -> list[str]:
        """The rules with a holdout whose control group the member is in, in definition order."""
        return [rule_id for rule_id, share in self.holdout_rules.items()
                if holdout_member(self.id, rule_id, member_id, share)]

    def candidates(self, held: Any) -> tuple[tuple[CompiledRule, ...], tuple[CompiledRule, ...]]:
        """The rules to look at when the conditions `held` hold (the matcher's answer), in
        definition order: those without a condition and those of the held conditions; with
        those of them that are restricted, the only ones a receipt must check (an
        unconditional personal rule is a candidate of every receipt, the others are not
        checked for it). Remembered per answer: the matcher gives the same few sets to
        receipt after receipt, and sorting them again cost every receipt."""
        found = self._candidates.get(held)
        if found is None:
            indexes = sorted([*self.unconditional, *(self.rule_of_condition[condition] for condition in held)])
            rules = tuple(self.rules[index] for index in indexes)
            found = rules, tuple(rule for rule in rules if rule.index in self.restricted)
            if len(self._candidates) >= MAX_CANDIDATE_SETS:
                self._candidates.clear()
            self._candidates[held] = found
        return found

    def limit_windows(self, local_date: date) -> dict[str, tuple[date, date]]:
        """For each rule with a limit: the inclusive local dates its usage is counted over."""
        windows = {}
        for rule in self.rules:
            if rule.limit_per is not None:
                windows[rule.id] = _window(rule, local_date)
        return windows

    def rule_dates(self, rule_id: str, local_date: date) -> tuple[date, date | None]:
        """(available_from, expires_on) of points a rule gave on a receipt of local_date."""
        available_from = local_date + timedelta(days=self.activation_delay_days)
        rule = self._by_id.get(rule_id)
        if rule is not None and rule.expires_in_days is not None:
            return available_from, local_date + timedelta(days=rule.expires_in_days)
        return available_from, local_date + timedelta(days=self.expiry_days) if self.expiry_days else None

    def tier_for(self, metric_value: int) -> tuple[str, str | None, int | None]:
        """(tier, next tier or None, how much metric is missing to reach it or None)."""
        position = 0  # levels ascend from 0, so a negative metric still has the first
        for index, (_, start) in enumerate(self.tiers):
            if metric_value >= start:
                position = index
        if position + 1 < len(self.tiers):
            following, start = self.tiers[position + 1]
            return self.tiers[position][0], following, start - metric_value
        return self.tiers[position][0], None, None

    def events_on(self, name: str) -> list[EventRule]:
        return [event for event in self.events if event.on == name]

    def line_class(self, line: Any) -> tuple[bool, bool, frozenset[int]]:
        """(may earn, may be paid with points, indexes of the rules whose scope selects it)."""
        key = self.line_key(line)
        found = self.line_classes.get(key)
        if found is None:
            found = self._classify(line.category, line.sku, line.brand, tuple(line.flags))
            if len(self.line_classes) >= MAX_LINE_CLASSES:
                self.line_classes.clear()
            self.line_classes[key] = found
        return found

    def _classify(self, category, sku, brand, flags=()) -> tuple[bool, bool, frozenset[int]]:
        if self.exclusions.hits(category, sku, brand, flags):
            return False, False, frozenset()
        redeemable = not self.redemption_exclusions.hits(category, sku, brand, flags)
        # A frozenset: a receipt intersects it with the few rules whose conditions hold, and a
        # set intersection walks the smaller side (a tuple would be walked whole: 300 rules).
        selected = frozenset(rule.index for rule in self.rules if rule.scope.selects(category, sku, brand, flags))
        return True, redeemable, selected

    def close(self) -> None:
        """Free the engine's rulesets now rather than at garbage collection."""
        self._finalizer()


def _line_key(filters: list) -> Any:
    """What identifies a line's class: only the fields some filter of the program reads,
    so a program that selects by category alone keeps one class per category rather
    than one per SKU, and a line's key is its category string, not a new tuple."""
    skus = any(f.skus for f in filters)
    brands = any(f.brands for f in filters)
    flags = any(getattr(f, "flags", None) for f in filters)
    if skus or brands:
        return lambda line: (line.category, line.sku, line.brand, tuple(line.flags))
    if flags:
        return lambda line: (line.category, tuple(line.flags)) if line.flags else line.category
    return lambda line: line.category


def _groups(rules: list[CompiledRule]) -> dict[str, list[CompiledRule]]:
    groups: dict[str, list[CompiledRule]] = {}
    for rule in rules:
        if rule.group is not None:
            groups.setdefault(rule.group, []).append(rule)
    return groups


def _window(rule: CompiledRule, day: date) -> tuple[date, date]:
    if rule.limit_per == "day":
        return day, day
    if rule.limit_per == "week":
        monday = day - timedelta(days=day.weekday())
        return monday, monday + timedelta(days=6)
    if rule.limit_per == "month":
        last = calendar.monthrange(day.year, day.month)[1]
        return day.replace(day=1), day.replace(day=last)
    # per: period. A rule without a period is in force for good, so every use it ever had counts.
    return rule.period or ALL_TIME


def _all_required(node: Node, fields: list[str]) -> bool:
    """Whether the condition is false whenever any of these fields is not True: each is
    compared `== True` by the condition itself or by one of the items of its top `and`."""
    items = node.items if isinstance(node, Group) and node.op == "and" else [node]
    required = {item.field for item in items if isinstance(item, Cmp) and item.op == "eq" and item.value is True}
    return required.issuperset(fields)
