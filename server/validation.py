"""Every way a request body breaks its msgspec type, in words a register's integrator can act on.

msgspec's typed decode is the fast path and stops at the first problem, worded for Python
programmers (`int`, regular expressions). Only when it fails, `find` walks the same body, decoded
to plain JSON values, against the same types: msgspec.inspect gives their fields, constraints and
descriptions, so the Struct definitions stay the one description of a request. A pattern is
explained by the description attached to it (`Meta(pattern=..., description=...)`), never shown.

`from_error` words one msgspec error the same way: for config files (decoded leniently, one
problem is enough there) and for the rare body the walk cannot read (nested deeper than msgspec
decodes to plain values)."""
from __future__ import annotations

import functools
import operator
import re
from datetime import date, datetime
from decimal import Decimal

import msgspec
import msgspec.inspect as mi

DETAILS_MAX = 50            # details listed in one answer; the message still counts them all
# The walk runs on the event loop: it stops after this many problems (a 1 MiB body of broken
# lines would otherwise hold it for over 100 ms; this way about 10, like decoding a valid one).
COUNTED_MAX = 1_000
KEY_SHOWN_MAX = 40          # characters of an offending object key quoted in a message
# The days a request may name (a receipt's ts, a look-up's moment, a report's period): far
# wider than any sale, and far enough inside Python's years 1 to 9999 that the instant of such
# a local day, and a window or an expiry of up to 36,500 days counted from it, are still dates.
DAY_EARLIEST = date(1900, 1, 1)
DAY_LATEST = date(9000, 12, 31)
DAY_RANGE = f"must be from {DAY_EARLIEST} to {DAY_LATEST}"
UNKNOWN_FIELD = "is not a known field"
REQUIRED = "is required"

# What a value of each kind must be, by msgspec's name for the kind (its error messages use it).
KIND_WORDS = {
    "int": "a whole number", "float": "a number", "decimal": "a number, like 2 or 0.75",
    "str": "a text", "bool": "true or false", "null": "null", "array": "a list",
    "object": "an object", "datetime": "a date and time like 2026-11-24T12:00:00+02:00",
    "date": "a date like 2026-11-24",
}
_KIND_OF = {mi.IntType: "int", mi.FloatType: "float", mi.DecimalType: "decimal", mi.StrType: "str",
            mi.BoolType: "bool", mi.NoneType: "null", mi.ListType: "array", mi.DictType: "object",
            mi.StructType: "object", mi.DateTimeType: "datetime", mi.DateType: "date"}


class Problems:
    """The first DETAILS_MAX problems as (path, words), and how many there are in all, or
    `complete` False when the walk stopped at `counted_max` of them."""

    def __init__(self, counted_max: int | None = None) -> None:
        self.listed: list[tuple[str, str]] = []
        self.count = 0
        self.complete = True
        self.counted_max = counted_max

    def add(self, path: str, words: str) -> None:
        self.count += 1
        if len(self.listed) < DETAILS_MAX:
            self.listed.append((path or "$", words))
        if self.count == self.counted_max:
            self.complete = False
            raise Enough


class Enough(Exception):
    """Ends a walk (or a further check adding to its Problems) that has counted as many problems as it may."""


def find(value, t: type) -> Problems:
    """Every problem of `value` (plain JSON values, numbers with a fraction as Decimal) against
    type `t`, in document order: the first one is the problem msgspec itself stopped at. The
    items of a list past its maximum length are not looked at: the list is refused for its length."""
    found = Problems(COUNTED_MAX)
    try:
        _checker(t)(value, "", found)
    except Enough:
        pass
    return found


@functools.lru_cache(maxsize=64)
def _info(t: type):
    return mi.type_info(t)


@functools.lru_cache(maxsize=64)
def _checker(t: type):
    return _compile(_info(t))


# A checker is check(value, path, out), made once per type from its msgspec.inspect info, so a
# refused body costs a walk, not a reading of the types as well.

def _compile(info, description: str | None = None):
    if isinstance(info, mi.Metadata):
        return _compile(info.type, (info.extra_json_schema or {}).get("description", description))
    make = _MAKERS.get(type(info))
    return _accept if make is None else make(info, description)


def _accept(value, path, out) -> None:
    """A kind the request types do not use: left to msgspec's own answer."""


def _int(info, _description):
    bounds = _bounds(info)

    def check(value, path, out):
        if type(value) is not int:
            out.add(path, must_be("int"))
        else:
            _check_bounds(value, bounds, path, out)
    return check


def _float(info, _description):
    bounds = _bounds(info)

    def check(value, path, out):
        if type(value) not in (int, float, Decimal) or not _finite(value):
            out.add(path, must_be("float"))
        else:
            _check_bounds(value, bounds, path, out)
    return check


def _bounds(info) -> list[tuple]:
    pairs = ((info.ge, operator.lt, "at least"), (info.gt, operator.le, "more than"),
             (info.le, operator.gt, "at most"), (info.lt, operator.ge, "less than"))
    return [(limit, fails, f"must be {words} {limit}") for limit, fails, words in pairs if limit is not None]


def _check_bounds(value, bounds, path, out) -> None:
    for limit, fails, words in bounds:
        if fails(value, limit):
            out.add(path, words)
            return


def _str(info, description):
    length = _length_test(info)
    length_words = "must be " + count_words(info.min_length, info.max_length, "character")
    pattern = None if info.pattern is None else re.compile(info.pattern)
    pattern_words = f"must be {description}" if description else "is not in the form this field takes"

    def check(value, path, out):
        if type(value) is not str:
            out.add(path, must_be("str"))
        elif length is not None and not length(len(value)):
            out.add(path, length_words)
        elif pattern is not None and not pattern.search(value):
            out.add(path, pattern_words)
    return check


def _decimal(_info, _description):
    def check(value, path, out):
        if type(value) not in (int, Decimal) and not (type(value) is str and _converts(value, Decimal)):
            out.add(path, must_be("decimal"))
    return check


def _kind_only(test, kind: str):
    def make(_info, _description):
        def check(value, path, out):
            if not test(value):
                out.add(path, must_be(kind))
        return check
    return make


def _datetime(info, _description):
    offset_words = ("must have a UTC offset, like 2026-11-24T12:00:00+02:00" if info.tz
                    else "must have no UTC offset, like 2026-11-24T12:00:00")

    def check(value, path, out):
        parsed = _converted(value, datetime) if type(value) is str else None
        if parsed is None:
            out.add(path, must_be("datetime"))
        elif info.tz is not None and (parsed.tzinfo is not None) != info.tz:
            out.add(path, offset_words)
    return check


def _choice(values: list):
    words = one_of(values)

    def check(value, path, out):
        if not any(type(value) is type(v) and value == v for v in values):
            out.add(path, words)
    return check


def _union(info, description):
    nullable = any(isinstance(t, mi.NoneType) for t in info.types)
    types = [t for t in info.types if not isinstance(t, mi.NoneType)]
    if len(types) == 1:         # an optional field: its problems are those of its one type
        inner = _compile(types[0], description)

        def optional(value, path, out):
            if value is not None or not nullable:
                inner(value, path, out)
        return optional
    members = [_compile(t, description) for t in types]
    kinds = [KIND_WORDS[k] for k in dict.fromkeys(_kind(t) for t in info.types) if k in KIND_WORDS]
    words = "must be " + " or ".join(kinds) if kinds else "is not a value this field takes"

    def check(value, path, out):
        if value is None and nullable:
            return
        for member in members:
            trial = Problems()
            member(value, path, trial)
            if not trial.count:
                return
        out.add(path, words)
    return check


def _list(info, _description):
    item = _compile(info.item_type)
    length = _length_test(info)
    length_words = "must have " + count_words(info.min_length, info.max_length, "item")
    walked_max = info.max_length

    def check(value, path, out):
        if type(value) is not list:
            out.add(path, must_be("array"))
            return
        if length is not None and not length(len(value)):
            out.add(path, length_words)
        for i, element in enumerate(value if walked_max is None or len(value) <= walked_max else value[:walked_max]):
            item(element, f"{path}[{i}]", out)
    return check


def _dict(info, _description):
    key_check, value_check = _compile(info.key_type), _compile(info.value_type)
    length = _length_test(info)
    length_words = "must have " + count_words(info.min_length, info.max_length, "entry", "entries")

    def check(value, path, out):
        if type(value) is not dict:
            out.add(path, must_be("object"))
            return
        if length is not None and not length(len(value)):
            out.add(path, length_words)
        for key, element in value.items():
            trial = Problems()
            key_check(key, path, trial)
            for _, words in trial.listed:
                out.add(path, f"key {quoted(key)}: {words}")
            value_check(element, join(path, key), out)
    return check


def _struct(info, _description):
    fields = {f.encode_name: _compile(f.type) for f in info.fields}
    required = [f.encode_name for f in info.fields if f.required]
    cls, forbid = info.cls, info.forbid_unknown_fields

    def check(value, path, out):
        if type(value) is not dict:
            out.add(path, must_be("object"))
            return
        if _converts(value, cls):      # msgspec's own pass in C: most lines of a refused receipt are fine
            return
        for name, element in value.items():
            field = fields.get(name)
            if field is not None:
                field(element, join(path, name), out)
            elif forbid:
                out.add(join(path, name), UNKNOWN_FIELD)
        for name in required:
            if name not in value:
                out.add(join(path, name), REQUIRED)
    return check


_MAKERS = {
    mi.IntType: _int, mi.FloatType: _float, mi.StrType: _str, mi.DecimalType: _decimal,
    mi.BoolType: _kind_only(lambda v: type(v) is bool, "bool"), mi.NoneType: _kind_only(lambda v: v is None, "null"),
    mi.DateType: _kind_only(lambda v: type(v) is str and _converts(v, date), "date"),
    mi.DateTimeType: _datetime, mi.LiteralType: lambda info, _d: _choice(list(info.values)),
    mi.EnumType: lambda info, _d: _choice([m.value for m in info.cls]), mi.UnionType: _union,
    mi.ListType: _list, mi.DictType: _dict, mi.StructType: _struct,
}


def _kind(info) -> str | None:
    return _KIND_OF.get(type(info.type if isinstance(info, mi.Metadata) else info))


def _length_test(info):
    low, high = info.min_length, info.max_length
    if low is None and high is None:
        return None
    return lambda n: (low is None or n >= low) and (high is None or n <= high)


def _converted(value, t: type):
    try:
        return msgspec.convert(value, t)
    except msgspec.ValidationError:
        return None


def _converts(value, t: type) -> bool:
    return _converted(value, t) is not None


def _finite(value) -> bool:
    return not isinstance(value, (float, Decimal)) or value.is_finite()


# ------------------------------------------------------------------ words


def must_be(kind: str) -> str:
    return "must be " + KIND_WORDS.get(kind, "another kind of value")


def count_words(low: int | None, high: int | None, unit: str, units: str | None = None) -> str:
    def n(k: int) -> str:
        return f"{k} {unit if k == 1 else units or unit + 's'}"
    if low is not None and high is not None:
        return n(low) if low == high else f"{low} to {n(high)}"
    return f"at most {n(high)}" if high is not None else f"at least {n(low)}"


def one_of(values) -> str:
    return "must be one of: " + ", ".join(str(v) for v in values)


def quoted(key: str) -> str:
    shown = key if len(key) <= KEY_SHOWN_MAX else key[:KEY_SHOWN_MAX] + "…"
    return msgspec.json.encode(shown).decode()


def join(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


# ------------------------------------------------------------------ one msgspec error

_AT = re.compile(r"^(.*?)(?: - at (`key` in )?`\$(.*)`)?$", re.S)
_GOT = re.compile(r"^Expected `([^`]+)`, got `[^`]+`$")
_BOUND = re.compile(r"^Expected `[^`]+` (>=|>|<=|<) ([^\s,]+)")
_LEN = re.compile(r"^Expected `(str|array|object)` of length (>=|<=) (\d+)$")
_BOUND_WORDS = {">=": "at least", ">": "more than", "<=": "at most", "<": "less than"}
_LEN_UNITS = {"str": ("be", "character", None), "array": ("have", "item", None), "object": ("have", "entry", "entries")}
_INVALID = {"Invalid RFC3339 encoded datetime": "datetime", "Invalid RFC3339 encoded date": "date",
            "Invalid decimal string": "decimal"}


def from_error(e: msgspec.ValidationError, root: type | None = None) -> Problems:
    """msgspec's one error as one problem in the walk's words; `root`, the type that was decoded,
    lets a pattern be explained by its description and a length be worded with both bounds."""
    m = _AT.match(str(e))
    # msgspec writes a mapping's value as `[...]`, without its key: the mapping is named instead.
    reason, is_key, where = m.group(1), bool(m.group(2)), (m.group(3) or "").lstrip(".")
    path = where.split("[...]")[0]
    found = Problems()
    if missing := re.match(r"Object missing required field `([^`]+)`", reason):
        found.add(join(path, missing.group(1)), REQUIRED)
    elif unknown := re.match(r"Object contains unknown field `([^`]+)`", reason):
        found.add(join(path, unknown.group(1)), UNKNOWN_FIELD)
    else:
        words = _reason_words(reason, root, where, is_key)
        if is_key:
            words = f"has a key that is not allowed; keys {words}"
        elif path != where:
            words = f"has a value that is not allowed; each value {words}"
        found.add(path, words)
    return found


def _reason_words(reason: str, root: type | None, path: str, is_key: bool) -> str:
    if got := _GOT.match(reason):        # an optional field is left out rather than sent as null
        kinds = [KIND_WORDS[k] for k in got.group(1).split(" | ") if k in KIND_WORDS and k != "null"]
        return "must be " + " or ".join(kinds) if kinds else "is not a value this field takes"
    if n := _LEN.match(reason):
        verb, unit, units = _LEN_UNITS[n.group(1)]
        bound = int(n.group(3))
        low, high = (bound, None) if n.group(2) == ">=" else (None, bound)
        info = _unwrap(_type_at(root, path, is_key)) if root is not None else None
        if hasattr(info, "min_length"):     # both bounds, as the walk words them
            low, high = info.min_length, info.max_length
        return f"must {verb} " + count_words(low, high, unit, units)
    if b := _BOUND.match(reason):
        return f"must be {_BOUND_WORDS[b.group(1)]} {b.group(2)}"
    if reason.startswith("Expected `str` matching regex"):
        description = _description_at(root, path, is_key) if root is not None else None
        return f"must be {description}" if description else "is not in the form this field takes"
    if reason.startswith("Invalid enum value"):
        values = _values_at(root, path) if root is not None and not is_key else None
        return one_of(values) if values else "is not one of the values this field takes"
    if reason.startswith("Expected `datetime` with"):
        return "must have a UTC offset, like 2026-11-24T12:00:00+02:00"
    if reason in _INVALID:
        return must_be(_INVALID[reason])
    return "is not a value this field takes"


_STEP = re.compile(r"\[[^\]]*\]|[^.\[]+")


def _type_at(root: type, path: str, is_key: bool):
    """The type at `path` of `root` (an object's keys when `is_key`), Metadata kept; None when
    the path leads nowhere."""
    info = _info(root)
    for step in _STEP.findall(path):
        info = _unwrap(info)
        if isinstance(info, mi.StructType) and not step.startswith("["):
            info = next((f.type for f in info.fields if f.encode_name == step), None)
        elif isinstance(info, mi.ListType) and step.startswith("["):
            info = info.item_type
        elif isinstance(info, mi.DictType) and step.startswith("["):
            info = info.value_type
        else:
            return None
    if is_key:
        info = _unwrap(info)
        info = info.key_type if isinstance(info, mi.DictType) else None
    while isinstance(info, mi.UnionType):
        info = next((t for t in info.types if not isinstance(t, mi.NoneType)), None)
    return info


def _description_at(root: type, path: str, is_key: bool) -> str | None:
    info = _type_at(root, path, is_key)
    return (info.extra_json_schema or {}).get("description") if isinstance(info, mi.Metadata) else None


def _values_at(root: type, path: str) -> list | None:
    info = _unwrap(_type_at(root, path, False))
    if isinstance(info, mi.LiteralType):
        return list(info.values)
    return [m.value for m in info.cls] if isinstance(info, mi.EnumType) else None


def _unwrap(info):
    while True:
        if isinstance(info, mi.Metadata):
            info = info.type
        elif isinstance(info, mi.UnionType):
            info = next((t for t in info.types if not isinstance(t, mi.NoneType)), None)
        else:
            return info
