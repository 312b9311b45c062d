"""`when` and `period` blocks compiled to a small condition tree.

The tree is what the rule engine receives (as its JSON) and what the match cache
reasons about. `not` is pushed down to the comparisons (De Morgan), so the engine
only ever sees and/or over plain comparisons on fields that every fact carries.
"""

from __future__ import annotations

import operator
import re
from datetime import date
from decimal import Decimal
from typing import Any, Callable

from .model import type_word as _word
from .problems import Problem, suggest
from .yamlmarks import Document, Path, YamlInt

MAX_DEPTH = 8
MAX_LIST_VALUES = 200
# Limits of the durable-rules C engine, measured: more than 15 and/or groups in one
# rule fail to compile (32 expression slots), and a fact may reach at most 64
# comparisons paths per ruleset before assert fails. Stay well inside both.
MAX_GROUPS_PER_RULE = 15
MAX_PATHS_PER_RULE = 32
MAX_LEAVES_PER_RULE = 256
MAX_TAGS = 200  # one boolean fact field per tag, segment or coupon campaign; the engine caps an object at 255 fields

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
TEXT_FIELDS = ("store", "partner", "register", "channel", "tier")
INT_FIELDS = ("total", "items", "receipt_number")
WHEN_KEYS = TEXT_FIELDS + INT_FIELDS + (
    "weekdays",
    "hours",
    "tags",
    "store_tags",
    "birthday_within_days",
    "enrolled_within_days",
    "segment",
    "coupon",
    "not",
    "any",
)
# What the daily job knows of a member, for a segment's `when` (never a receipt's rule:
# a rule reads them through `segment: <id>`, as the last job run left them).
MEMBER_INT_FIELDS = ("days_since_last_purchase", "receipts_in_window", "spend_in_window", "enrolled_days")
SEGMENT_WHEN_KEYS = ("tier", "tags") + MEMBER_INT_FIELDS + ("not", "any")
MAX_DAYS = 36_500
# A day count compared with more than this would meet UNKNOWN_DAYS, which stands for "never".
INT_BOUNDS = {"days_since_last_purchase": (0, MAX_DAYS), "enrolled_days": (0, MAX_DAYS)}
OPERATORS = ("gt", "gte", "lt", "lte", "ne", "between")
_FLIP = {"eq": "ne", "ne": "eq", "lt": "gte", "gte": "lt", "gt": "lte", "lte": "gt"}
_ENGINE_OP = {"ne": "$neq", "lt": "$lt", "lte": "$lte", "gt": "$gt", "gte": "$gte"}
_HOURS_RE = re.compile(r"(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})")
UNKNOWN_DAYS = 100_000  # fact value for an unknown birthday or enrolment: never "within"
# Condition fields whose values the program defines, with what a warning calls them.
DEFINED_NAMES = {
    "tier": "tier",
    "partner": "partner",
    "store": "store",
    "store_tags": "store tag",
    "segment": "segment",
    "coupon": "coupon campaign",
}


class Cmp:
    __slots__ = ("field", "op", "value")

    def __init__(self, field: str, op: str, value: Any):
        self.field, self.op, self.value = field, op, value

    def __repr__(self) -> str:
        return f"Cmp({self.field!r}, {self.op!r}, {self.value!r})"


class Group:
    """op is 'and' or 'or'."""

    __slots__ = ("op", "items")

    def __init__(self, op: str, items: list[Node]):
        self.op, self.items = op, items

    def __repr__(self) -> str:
        return f"Group({self.op!r}, {self.items!r})"


Node = Cmp | Group


def group(op: str, items: list[Node]) -> Node:
    """A group with nested groups of the same kind flattened and single items unwrapped."""
    flat: list[Node] = []
    for item in items:
        if isinstance(item, Group) and item.op == op:
            flat.extend(item.items)
        else:
            flat.append(item)
    return flat[0] if len(flat) == 1 else Group(op, flat)


def negate(node: Node) -> Node:
    if isinstance(node, Cmp):
        return Cmp(node.field, _FLIP[node.op], node.value)
    return group("or" if node.op == "and" else "and", [negate(item) for item in node.items])


def to_engine(node: Node) -> dict:
    """The durable-rules JSON for node."""
    if isinstance(node, Cmp):
        if node.op == "eq":
            return {node.field: node.value}
        return {_ENGINE_OP[node.op]: {node.field: node.value}}
    return {"$" + node.op: [to_engine(item) for item in node.items]}


def holds(node: Node, fact: dict) -> bool:
    """Plain-Python meaning of node; the reference the engine is tested against."""
    if isinstance(node, Group):
        results = (holds(item, fact) for item in node.items)
        return all(results) if node.op == "and" else any(results)
    return _COMPARE[node.op](fact[node.field], node.value)


_COMPARE = {"eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "lte": operator.le, "gt": operator.gt,
            "gte": operator.ge}


def compile_test(node: Node) -> Callable[[dict], bool]:
    """holds(node, fact) as one function of fact, for a condition asked of a million facts
    (the daily job's segments): no dispatch on the operator per comparison."""
    if isinstance(node, Cmp):
        field, compare, value = node.field, _COMPARE[node.op], node.value
        return lambda fact: compare(fact[field], value)
    tests = tuple(compile_test(item) for item in node.items)
    if node.op == "and":
        def every(fact: dict) -> bool:
            for test in tests:
                if not test(fact):
                    return False
            return True
        return every

    def some(fact: dict) -> bool:
        for test in tests:
            if test(fact):
                return True
        return False
    return some


def may_hold(node: Node, fact: dict) -> bool | None:
    """holds() when only some fields are known: a field missing from fact may hold either
    way (None), and/or combine by three-valued logic; False means no value of the missing
    fields makes node hold. `not` is already pushed down to the comparisons, so this is exact."""
    if isinstance(node, Cmp):
        return holds(node, fact) if node.field in fact else None
    results = [may_hold(item, fact) for item in node.items]
    decided = node.op == "or"          # True decides an `or`, False an `and`
    if decided in results:
        return decided
    return None if None in results else not decided


def count_groups(node: Node) -> int:
    if isinstance(node, Cmp):
        return 0
    return 1 + sum(count_groups(item) for item in node.items)


def count_leaves(node: Node) -> int:
    if isinstance(node, Cmp):
        return 1
    return sum(count_leaves(item) for item in node.items)


def max_paths(node: Node) -> int:
    """How many alternatives of node can hold at once (the engine fires once per each).

    Equalities on one field exclude each other, so `store: [a, b, c]` counts once.
    """
    if isinstance(node, Cmp):
        return 1
    if node.op == "and":
        product = 1
        for item in node.items:
            product *= max_paths(item)
        return product
    eq_fields = {item.field for item in node.items if isinstance(item, Cmp) and item.op == "eq"}
    others = [item for item in node.items if not (isinstance(item, Cmp) and item.op == "eq")]
    return len(eq_fields) + sum(max_paths(item) for item in others)


def constants(node: Node, into: dict[str, set]) -> None:
    """Every value each field is compared with (what the match cache discretizes by)."""
    if isinstance(node, Cmp):
        into.setdefault(node.field, set()).add(node.value)
    else:
        for item in node.items:
            constants(item, into)


def fields_required_true(node: Node) -> list[str]:
    """Fields compared `== True` (a tag, segment or coupon the fact must have), in order."""
    if isinstance(node, Cmp):
        return [node.field] if node.op == "eq" and node.value is True else []
    return [field for item in node.items for field in fields_required_true(item)]


def date_number(day: date) -> int:
    return day.year * 10000 + day.month * 100 + day.day


def period_node(start: date, end: date) -> Node:
    return Group("and", [Cmp("date", "gte", date_number(start)), Cmp("date", "lte", date_number(end))])


class WhenCompiler:
    """Compiles `when` blocks of one program, reporting problems at their marks.

    A name the program does not define (`defined`: condition field -> the ids it
    defines, None when not known) is a warning, not a problem: such a condition loads
    and simply never holds, which may be meant (a store listed only later) but usually
    is a typo.
    """

    def __init__(self, problems: list[Problem], warnings: list[Problem], defined: dict[str, set[str] | None],
                 keys: tuple[str, ...] = WHEN_KEYS):  # fmt: skip
        self.problems = problems
        self.warnings = warnings
        self.defined = defined
        self.keys = keys  # the conditions this kind of block may use
        self.member_tags: dict[str, str] = {}  # tag -> fact field
        self.store_tags: dict[str, str] = {}
        self.segments: dict[str, str] = {}  # segment id -> fact field
        self.coupons: dict[str, str] = {}  # coupon campaign id -> fact field
        self.doc: Document | None = None

    def compile(self, doc: Document, path: Path, block: dict) -> Node | None:
        self.doc = doc
        before = len(self.problems)
        node = self.block(block, path, 0)
        if node is None or len(self.problems) > before:
            return None
        return node if self.within_engine_limits(node, path) else None

    def within_engine_limits(self, node: Node, path: Path) -> bool:
        groups, paths, leaves = count_groups(node), max_paths(node), count_leaves(node)
        if groups > MAX_GROUPS_PER_RULE or paths > MAX_PATHS_PER_RULE or leaves > MAX_LEAVES_PER_RULE:
            self.fail(
                path,
                f"conditions too complex for the rule engine ({groups} and/or groups, up to {paths} "
                f"alternatives holding at once, {leaves} comparisons; at most {MAX_GROUPS_PER_RULE}, "
                f"{MAX_PATHS_PER_RULE} and {MAX_LEAVES_PER_RULE}): split the rule",
            )
            return False
        return True

    def fail(self, path: Path, message: str, key: bool = False) -> None:
        assert self.doc is not None
        self.problems.append(self.doc.problem(path, message, key))

    def block(self, block: Any, path: Path, depth: int) -> Node | None:
        if not isinstance(block, dict) or not block:
            self.fail(path, "expected a non-empty mapping of conditions")
            return None
        if depth > MAX_DEPTH:
            self.fail(path, f"conditions nested more than {MAX_DEPTH} levels deep")
            return None
        items = [self.entry(key, value, path + (key,), depth) for key, value in block.items()]
        if any(item is None for item in items):
            return None
        return group("and", items)  # type: ignore[arg-type]

    def entry(self, key: str, value: Any, path: Path, depth: int) -> Node | None:
        if key not in self.keys:
            self.fail(path, f"unknown condition '{key}'{suggest(key, self.keys)}{self.hint(key)}", key=True)
            return None
        if key == "not":
            inner = self.block(value, path, depth + 1)
            return negate(inner) if inner is not None else None
        if key == "any":
            return self.alternatives(value, path, depth)
        if key in TEXT_FIELDS:
            return self.text_field(key, value, path)
        if key in INT_FIELDS or key in MEMBER_INT_FIELDS:
            return self.int_field(key, value, path)
        return getattr(self, "field_" + key)(value, path)

    def hint(self, key: str) -> str:
        if key in MEMBER_INT_FIELDS and key not in self.keys:
            return f" ('{key}' is for a segment's when: define a segment with it, then use 'segment: <id>')"
        if key in WHEN_KEYS and key not in self.keys:
            return f" (a segment's when may use: {', '.join(self.keys)})"
        return ""

    def alternatives(self, value: Any, path: Path, depth: int) -> Node | None:
        if not isinstance(value, list) or not value:
            self.fail(path, "'any' takes a non-empty list of condition blocks")
            return None
        items = [self.block(item, path + (index,), depth + 1) for index, item in enumerate(value)]
        if any(item is None for item in items):
            return None
        return group("or", items)  # type: ignore[arg-type]

    # Values -----------------------------------------------------------------

    def scalar_text(self, value: Any, path: Path) -> str | None:
        if isinstance(value, YamlInt):
            return value.text
        if isinstance(value, str) and value:
            return value
        self.fail(path, f"expected a name, got {_word(value)}")
        return None

    def listed(self, value: Any, path: Path) -> list[tuple[Any, Path]] | None:
        if not isinstance(value, list):
            return [(value, path)]
        if not value or len(value) > MAX_LIST_VALUES:
            self.fail(path, f"a list of values needs 1 to {MAX_LIST_VALUES} items")
            return None
        return [(item, path + (index,)) for index, item in enumerate(value)]

    def text_field(self, field: str, value: Any, path: Path) -> Node | None:
        if isinstance(value, dict):
            return self.text_operators(field, value, path)
        items = self.listed(value, path)
        if items is None:
            return None
        texts = [self.known_text(field, item, where) for item, where in items]
        if any(text is None for text in texts):
            return None
        return group("or", [Cmp(field, "eq", text) for text in texts])

    def text_operators(self, field: str, ops: dict, path: Path) -> Node | None:
        nodes: list[Node] = []
        for op, value in ops.items():
            if op != "ne":
                why = "only 'ne' applies to a name" if op in OPERATORS else f"unknown operator '{op}'{suggest(op, OPERATORS)}"
                self.fail(path + (op,), why, key=True)
                return None
            items = self.listed(value, path + (op,))
            if items is None:
                return None
            texts = [self.known_text(field, item, where) for item, where in items]
            if any(text is None for text in texts):
                return None
            nodes.extend(Cmp(field, "ne", text) for text in texts)
        if not nodes:
            self.fail(path, "empty operator mapping")
            return None
        return group("and", nodes)

    def known_text(self, field: str, value: Any, path: Path) -> str | None:
        text = self.scalar_text(value, path)
        if text is not None:
            self.warn_if_undefined(field, text, path)
        return text

    def warn_if_undefined(self, field: str, name: str, path: Path) -> None:
        known = self.defined.get(field)
        if known is not None and name not in known:
            assert self.doc is not None
            message = f"unknown {DEFINED_NAMES[field]} '{name}'{suggest(name, known)}"
            self.warnings.append(self.doc.problem(path, message, warning=True))

    def integer(self, value: Any, path: Path, low: int = -(2**53), high: int = 2**53) -> int | None:
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
            return int(value)
        if isinstance(value, Decimal):
            self.fail(path, f"expected a whole number (money is in minor units), got {value}")
        elif isinstance(value, int) and not isinstance(value, bool):
            self.fail(path, f"{value} is out of range {low}..{high}")
        else:
            self.fail(path, f"expected a whole number, got {_word(value)}")
        return None

    def int_field(self, field: str, value: Any, path: Path) -> Node | None:
        if isinstance(value, dict):
            return self.int_operators(field, value, path)
        items = self.listed(value, path)
        if items is None:
            return None
        numbers = [self.integer(item, where, *INT_BOUNDS.get(field, ())) for item, where in items]
        if any(number is None for number in numbers):
            return None
        return group("or", [Cmp(field, "eq", number) for number in numbers])

    def int_operators(self, field: str, ops: dict, path: Path) -> Node | None:
        nodes: list[Node] = []
        for op, value in ops.items():
            where = path + (op,)
            if op == "between":
                node = self.between(field, value, where)
            elif op in OPERATORS:
                number = self.integer(value, where, *INT_BOUNDS.get(field, ()))
                node = None if number is None else Cmp(field, op, number)
            else:
                self.fail(where, f"unknown operator '{op}'{suggest(op, OPERATORS)}", key=True)
                node = None
            if node is None:
                return None
            nodes.append(node)
        if not nodes:
            self.fail(path, "empty operator mapping")
            return None
        return group("and", nodes)

    def between(self, field: str, value: Any, path: Path) -> Node | None:
        if not isinstance(value, list) or len(value) != 2:
            self.fail(path, "'between' takes two numbers: [low, high]")
            return None
        bounds = INT_BOUNDS.get(field, ())
        low, high = self.integer(value[0], path + (0,), *bounds), self.integer(value[1], path + (1,), *bounds)
        if low is None or high is None:
            return None
        if high < low:
            self.fail(path, f"'between' ends ({high}) before it starts ({low})")
            return None
        return Group("and", [Cmp(field, "gte", low), Cmp(field, "lte", high)])

    # Special fields ---------------------------------------------------------

    def field_weekdays(self, value: Any, path: Path) -> Node | None:
        items = self.listed(value, path)
        if items is None:
            return None
        days = []
        for item, where in items:
            day = item.lower() if isinstance(item, str) else None
            if day not in WEEKDAYS:
                self.fail(where, f"unknown weekday '{item}'{suggest(str(item).lower(), WEEKDAYS)}")
                return None
            days.append(day)
        return group("or", [Cmp("weekday", "eq", day) for day in days])

    def field_hours(self, value: Any, path: Path) -> Node | None:
        items = self.listed(value, path)
        if items is None:
            return None
        nodes = [self.hours(item, where) for item, where in items]
        if any(node is None for node in nodes):
            return None
        return group("or", nodes)  # type: ignore[arg-type]

    def hours(self, value: Any, path: Path) -> Node | None:
        match = _HOURS_RE.fullmatch(value.strip()) if isinstance(value, str) else None
        minutes = _range_minutes(match) if match else None
        if minutes is None:
            self.fail(path, f"bad hours '{value}': expected \"HH:MM-HH:MM\", e.g. \"07:00-10:00\" (end excluded)")
            return None
        start, end = minutes
        if start == end or (start == 0 and end == 24 * 60):
            self.fail(path, f"hours '{value}' cover no time or the whole day")
            return None
        if start < end:
            parts = [Cmp("minute", "gte", start)] if start else []
            parts += [Cmp("minute", "lt", end)] if end < 24 * 60 else []
            return group("and", parts)
        return Group("or", [Cmp("minute", "gte", start), Cmp("minute", "lt", end)])  # past midnight

    def field_tags(self, value: Any, path: Path) -> Node | None:
        return self.tag_set("tags", value, path, self.member_tags, "t")  # members' tags come and go

    def field_store_tags(self, value: Any, path: Path) -> Node | None:
        return self.tag_set("store_tags", value, path, self.store_tags, "s")

    def field_segment(self, value: Any, path: Path) -> Node | None:
        return self.tag_set("segment", value, path, self.segments, "seg")

    def field_coupon(self, value: Any, path: Path) -> Node | None:
        return self.tag_set("coupon", value, path, self.coupons, "cpn")

    def tag_set(self, field: str, value: Any, path: Path, fields: dict[str, str], prefix: str) -> Node | None:
        """Names the member or receipt has or not, one boolean fact field per name."""
        items = self.listed(value, path)
        if items is None:
            return None
        names = [self.known_text(field, item, where) for item, where in items]
        if any(name is None for name in names):
            return None
        for name in names:
            if name not in fields:
                if len(self.member_tags) + len(self.store_tags) + len(self.segments) + len(self.coupons) >= MAX_TAGS:
                    self.fail(path, f"more than {MAX_TAGS} different tags, segments and coupon campaigns in conditions")
                    return None
                fields[name] = f"{prefix}{len(fields)}"  # short engine field names, any tag text
        return group("or", [Cmp(fields[name], "eq", True) for name in names])  # type: ignore[index]

    def field_birthday_within_days(self, value: Any, path: Path) -> Node | None:
        days = self.integer(value, path, 0, 183)
        return None if days is None else Cmp("birthday_days", "lte", days)

    def field_enrolled_within_days(self, value: Any, path: Path) -> Node | None:
        days = self.integer(value, path, 0, 36_500)
        return None if days is None else Cmp("enrolled_days", "lte", days)


def _range_minutes(match: re.Match) -> tuple[int, int] | None:
    h1, m1, h2, m2 = (int(part) for part in match.groups())
    if h1 > 23 or m1 > 59 or m2 > 59 or h2 > 24 or (h2 == 24 and m2 != 0):
        return None
    return h1 * 60 + m1, h2 * 60 + m2


