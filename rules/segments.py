"""Segments and control groups: who a member is, as pure functions of stored facts.

The daily job asks each computed segment whether it holds for a member (Segment.holds);
the receipt path only reads the membership the job left. The control group of a rule is
a hash of the member's id, so it is the same on every server, version and restart.
"""

from __future__ import annotations

import hashlib
from decimal import Decimal
from fractions import Fraction
from typing import Any

from .conditions import UNKNOWN_DAYS, Node, compile_test
from .records import SegmentFacts

_HASH_SPACE = 2**32  # the first 8 hex digits of the digest


def holdout_member(program_id: str, rule_id: str, member_id: str, holdout: Decimal | Fraction | int) -> bool:
    """Whether the member is in the rule's control group:
    int(first 8 hex digits of sha256("<program id>:<rule id>:<member_id>"), 16) / 2^32 < holdout,
    compared exactly (no float)."""
    if not holdout:
        return False
    digest = hashlib.sha256(f"{program_id}:{rule_id}:{member_id}".encode()).hexdigest()
    share = Fraction(holdout)
    return int(digest[:8], 16) * share.denominator < share.numerator * _HASH_SPACE


class Segment:
    """One `segments.define` entry. kind: `rfm`, `when` or `list` (members kept by the API)."""

    __slots__ = ("id", "kind", "rfm", "condition", "tag_fields", "file", "line", "_test")

    def __init__(self, id: str, kind: str, rfm: dict[str, tuple[int, int]] | None = None,
                 condition: Node | None = None, tag_fields: dict[str, str] | None = None,
                 file: str = "", line: int = 0):  # fmt: skip
        self.id, self.kind, self.file, self.line = id, kind, file, line
        self.rfm = rfm or {}  # score letter -> (low, high), both included
        self.condition = condition
        self.tag_fields = tag_fields or {}  # tag -> the condition's fact field
        self._test = compile_test(condition) if condition is not None else None

    def __repr__(self) -> str:
        return f"Segment({self.id!r}, {self.kind!r})"

    def holds(self, facts: SegmentFacts) -> bool:
        """Whether the member belongs (a `list` segment: never computed, always False)."""
        if self.kind == "rfm":
            return facts.rfm is not None and self.holds_rfm(facts.rfm)
        if self.kind == "when" and self._test is not None:
            return self.holds_fact(member_fact(facts.tier, facts.days_since_last_purchase, facts.receipts_in_window,
                                               facts.spend_in_window, facts.enrolled_days), facts.tags)
        return False

    def holds_rfm(self, scores: tuple[int, int, int]) -> bool:
        """An `rfm` segment: every range given holds for its score."""
        for letter, score in zip("rfm", scores):
            bounds = self.rfm.get(letter)
            if bounds is not None and not bounds[0] <= score <= bounds[1]:
                return False
        return True

    def holds_fact(self, base: dict[str, Any], tags: frozenset[str]) -> bool:
        """A `when` segment on member_fact(...), which the daily job makes once a member
        for all segments; each segment adds the tags it reads."""
        if self._test is None:
            return False
        fact = base
        if self.tag_fields:
            fact = {**base, **{field: tag in tags for tag, field in self.tag_fields.items()}}
        return self._test(fact)


def member_fact(tier: str, days_since_last_purchase: int | None, receipts_in_window: int, spend_in_window: int,
                enrolled_days: int | None) -> dict[str, Any]:
    """The fields a `when` segment may read but tags (SegmentFacts' meanings); an unknown day
    count is longer ago than any written."""
    return {
        "tier": tier,
        "days_since_last_purchase": _days(days_since_last_purchase),
        "receipts_in_window": receipts_in_window,
        "spend_in_window": spend_in_window,
        "enrolled_days": _days(enrolled_days),
    }


def _days(days: int | None) -> int:
    return UNKNOWN_DAYS if days is None else days
