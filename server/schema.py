"""Request bodies as strict msgspec types; the handlers decode with these, the OpenAPI document
is generated from them and a refused body's problems are found with them (server/validation.py).
Decoders are built once. A pattern carries a description: it is what a refused value is told
it must be, since a regular expression means nothing to a register's integrator."""
from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Annotated

import msgspec
from msgspec import Meta, Struct

from server import validation
from server.errors import problems_error

LINES_MAX = 2_000
MONEY_MAX = 10**12          # minor units; far above any till, far below int64
POINTS_MAX = 10**12
QTY_DIGITS_MAX = 18

Id = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[^/\s]+$",
                         description="an identifier without slashes or spaces")]
Text = Annotated[str, Meta(max_length=256)]
Money = Annotated[int, Meta(ge=0, le=MONEY_MAX)]
Points = Annotated[int, Meta(ge=-POINTS_MAX, le=POINTS_MAX)]
Card = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[^/\s]+$",
                           description="a card number without slashes or spaces")]
Tag = Annotated[str, Meta(min_length=1, max_length=64)]
CouponText = Annotated[str, Meta(min_length=1, max_length=64)]     # any such text gets a status (docs/integrators.md)
COUPONS_PER_RECEIPT_MAX = 32        # a till scans a handful; a longer list is a mistake, not a basket


class Line(Struct, forbid_unknown_fields=True):
    line_no: Annotated[int, Meta(ge=1, le=1_000_000)]
    sku: Annotated[str, Meta(min_length=1, max_length=64)]
    qty: Decimal
    price: Money
    amount: Money
    category: Annotated[str, Meta(max_length=64)] | None = None
    brand: Annotated[str, Meta(max_length=64)] | None = None
    flags: Annotated[list[Tag], Meta(max_length=32)] | None = []     # null: see nulls_unsent


class Receipt(Struct, forbid_unknown_fields=True):
    receipt_id: Id
    store_id: Id
    register_id: Id
    ts: datetime
    lines: Annotated[list[Line], Meta(min_length=1, max_length=LINES_MAX)]
    total: Money
    card: Card | None = None
    channel: Annotated[str, Meta(min_length=1, max_length=32)] | None = "pos"
    redeem_points: Annotated[int, Meta(ge=0, le=POINTS_MAX)] | None = 0
    # Unset when not sent, so the canonical body (the idempotency fingerprint) of a receipt
    # without coupons is what it was before receipts could carry them.
    coupons: Annotated[list[CouponText], Meta(max_length=COUPONS_PER_RECEIPT_MAX)] | None | msgspec.UnsetType = \
        msgspec.UNSET


class ReceiptRef(Struct, forbid_unknown_fields=True):
    store_id: Id
    register_id: Id
    receipt_id: Id


class ReturnLine(Struct, forbid_unknown_fields=True):
    line_no: Annotated[int, Meta(ge=1, le=1_000_000)]
    qty: Decimal


class ReturnRequest(Struct, forbid_unknown_fields=True):
    return_id: Id
    store_id: Id
    register_id: Id
    receipt: ReceiptRef
    lines: Annotated[list[ReturnLine], Meta(min_length=1, max_length=LINES_MAX)]


BIRTHDAY_EARLIEST = date(1900, 1, 1)


def birthday_problem(birthday: date, today: date) -> str | None:
    """Why a birthday cannot be a member's (before 1900 or not yet come: a typo, or a
    placeholder such as 0001-01-01 that would pay birthday gifts to no one's birthday);
    None when it can be. `today` is the program's local day by the server's clock."""
    if BIRTHDAY_EARLIEST <= birthday <= today:
        return None
    return f"must be a day from {BIRTHDAY_EARLIEST} to today ({today}), got {birthday}"


class Enrollment(Struct, forbid_unknown_fields=True):
    card: Card
    phone: Annotated[str, Meta(min_length=3, max_length=32)] | None = None
    birthday: date | None = None
    tags: Annotated[list[Tag], Meta(max_length=64)] | None = []
    referred_by: Card | None = None
    store_id: Id | None = None


class Consent(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Whether the member allows messages on each channel; a channel not given keeps its value."""
    sms: bool | None = None
    viber: bool | None = None
    email: bool | None = None
    push: bool | None = None


CrmId = Annotated[str, Meta(max_length=64, pattern=r"^[^\s]*$",
                            description="up to 64 characters without spaces; empty clears it")]


class MemberPatch(Struct, forbid_unknown_fields=True, omit_defaults=True):
    phone: Annotated[str, Meta(min_length=3, max_length=32)] | None = None
    birthday: date | None = None
    tags: Annotated[list[Tag], Meta(max_length=64)] | None = None
    consent: Consent | None = None
    crm_id: CrmId | None = None


MemberId = Annotated[str, Meta(pattern=r"^m_[1-9][0-9]{0,17}$", description="a member id like m_12")]
Last4 = Annotated[str, Meta(min_length=1, max_length=4)]


class PhoneSearch(Struct, forbid_unknown_fields=True):
    phone: Annotated[str, Meta(min_length=3, max_length=32)]


class CardReplacement(Struct, forbid_unknown_fields=True):
    new_card: Card
    # Which card it replaces, by its last four digits; needed only when the member has several.
    old_card_last4: Last4 | None = None
    reason: Annotated[str, Meta(min_length=1, max_length=500)] | None = None


class MemberMerge(Struct, forbid_unknown_fields=True):
    merge_id: Id
    from_member_id: MemberId
    into_member_id: MemberId
    reason: Annotated[str, Meta(min_length=1, max_length=500)]


class Erasure(Struct, forbid_unknown_fields=True):
    reason: Annotated[str, Meta(min_length=1, max_length=500)]


class Adjustment(Struct, forbid_unknown_fields=True):
    card: Card
    points: Points
    reason: Annotated[str, Meta(min_length=1, max_length=500)]
    adjustment_id: Id


class TierAssignment(Struct, forbid_unknown_fields=True):
    tier: Annotated[str, Meta(min_length=1, max_length=64)]
    until: date


# Relative paths of plain names: no `..`, no hidden files, no NUL, short enough for any file system.
_NAME = r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}"
RulesFileName = Annotated[str, Meta(
    max_length=400, pattern=rf"^(?:{_NAME}/){{0,7}}{_NAME}\.ya?ml$",
    description="a relative path to a .yaml or .yml file: at most 8 names joined by /, each of letters, "
                "digits, _, - and . and not starting with a dot")]


RulesFiles = Annotated[dict[RulesFileName, Annotated[str, Meta(max_length=1024 * 1024)]],
                       Meta(min_length=1, max_length=200)]
# Why a program goes live, kept with it in the database: one line to a short paragraph.
Reason = Annotated[str, Meta(min_length=1, max_length=500)]
RulesVersion = Annotated[str, Meta(pattern=r"^sha256:[0-9a-f]{64}$",
                                   description="a program version: sha256: and 64 lowercase hex digits")]


class RulesCheck(Struct, forbid_unknown_fields=True):
    files: RulesFiles


class RulesDeploy(Struct, forbid_unknown_fields=True):
    files: RulesFiles
    reason: Reason


class RulesRollback(Struct, forbid_unknown_fields=True):
    version: RulesVersion
    reason: Reason


DECODERS = {t: msgspec.json.Decoder(t) for t in
            (Receipt, ReturnRequest, Enrollment, MemberPatch, Adjustment, TierAssignment, RulesCheck,
             RulesDeploy, RulesRollback, PhoneSearch, CardReplacement, MemberMerge, Erasure)}
def _encode_other(obj):
    # Program summaries carry str subclasses (ids, names) and exact numbers.
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, (Decimal, date)):
        return str(obj)
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


ENCODER = msgspec.json.Encoder(enc_hook=_encode_other)


# The second pass keeps every number exact: a fraction is a Decimal, as qty decodes.
_PLAIN = msgspec.json.Decoder(float_hook=Decimal)


def decode(body: bytes, t: type):
    """The body as a `t`; a body that breaks the schema raises one 422 listing every problem."""
    try:
        try:
            value = DECODERS[t].decode(body)
        except msgspec.ValidationError as e:
            raise problems_error(every_problem(body, t, e)) from None
    except UnicodeDecodeError as e:     # raised by msgspec for invalid UTF-8 inside strings
        raise msgspec.DecodeError(f"not valid UTF-8 at byte {e.start}") from None
    # A backslash first: one memchr, where looking for the whole escape in every body cost a
    # receipt some 8 k instructions; most bodies have no escape at all.
    if b"\\" in body and NUL_ESCAPE in body:
        refuse_nul(body)
    nulls_unsent(value)
    return value


def nulls_unsent(value) -> None:
    """An optional field sent as null is not given: a receipt with nulls is the same receipt,
    with the same fingerprint, as one without those fields. Checked field by field after the
    decode (a plain loop over the lines: looking for `null` in the body's bytes, or a
    __post_init__ per line, cost a receipt some 10 to 20 k instructions more)."""
    if isinstance(value, Receipt):
        if value.channel is None:
            value.channel = "pos"
        if value.redeem_points is None:
            value.redeem_points = 0
        if value.coupons is None:
            value.coupons = msgspec.UNSET
        for line in value.lines:
            if line.flags is None:
                line.flags = []
    elif isinstance(value, Enrollment) and value.tags is None:
        value.tags = []


# JSON can only carry NUL escaped. PostgreSQL's text cannot hold it at all (an insert fails),
# and in SQLite it would make an id or a card that no register can type: refused on both.
NUL_ESCAPE = b"\\u0000"
NUL_WORDS = "must not contain the NUL character (\\u0000)"


def refuse_nul(body: bytes) -> None:
    """A 422 naming each text of the body with NUL in it; nothing when there is none (the
    escape was a backslash's, as in "\\\\u0000")."""
    found = validation.Problems(validation.COUNTED_MAX)
    try:
        _find_nul(_PLAIN.decode(body), "", found)
    except validation.Enough:
        pass
    if found.count:
        raise problems_error(found)


def _find_nul(value, path: str, found: validation.Problems) -> None:
    if isinstance(value, str):
        if "\0" in value:
            found.add(path, NUL_WORDS)
    elif isinstance(value, dict):
        for key, item in value.items():
            _find_nul(key, path, found)
            _find_nul(item, validation.join(path, key), found)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _find_nul(item, f"{path}[{i}]", found)


def every_problem(body: bytes, t: type, first: msgspec.ValidationError) -> validation.Problems:
    """Only for a refused body (`first`: what the typed decode of `body` as `t` raised), so the
    receipt path keeps msgspec's one typed pass. A body that stops being JSON after its first
    problem raises DecodeError here: 400, as for any body that is not JSON."""
    try:
        plain = _PLAIN.decode(body)
    except RecursionError:      # nested deeper than msgspec decodes to plain values: its one problem
        return validation.from_error(first, t)
    found = validation.find(plain, t)
    if not found.count:
        return validation.from_error(first, t)
    also = LINE_CHECKS.get(t)
    if also is not None and isinstance(plain, dict) and found.complete:
        try:
            also(plain, found)
        except validation.Enough:
            pass
    return found


def line_value_problems(plain: dict, found: validation.Problems) -> None:
    """What server/ops/receipts.py checks on a decoded body's lines (positive quantities,
    unique line numbers, the total), read from a refused body's plain values: its one 422
    names these problems beside the type problems. Values of a wrong type were named already."""
    lines = plain.get("lines")
    if not isinstance(lines, list) or not 1 <= len(lines) <= LINES_MAX:
        return
    seen = set()
    for i, line in enumerate(lines):
        if not isinstance(line, dict):
            continue
        no, qty = line.get("line_no"), line.get("qty")
        if type(no) is int:     # any other type (a list, an object) was named already
            if no in seen:
                found.add(f"lines[{i}].line_no", f"repeats line_no {no}")
            seen.add(no)
        if type(qty) in (int, Decimal) and not qty > 0:
            found.add(f"lines[{i}].qty", "must be > 0")
    amounts = [line.get("amount") if isinstance(line, dict) else None for line in lines]
    total = plain.get("total")
    if type(total) is int and all(type(a) is int for a in amounts) and sum(amounts) != total:
        found.add("total", f"must equal the sum of line amounts ({sum(amounts)})")


def canonical(obj) -> bytes:
    """The same request, whatever its key order or spacing: the idempotency fingerprint."""
    return ENCODER.encode(obj)


# ------------------------------------------------------------------ segments, offers, coupons

CARDS_PER_REQUEST_MAX = 10_000      # larger lists: `loyalty import offers --csv`, or several requests
COUPONS_PER_REQUEST_MAX = 10_000    # larger runs: `loyalty coupons generate`
Cards = Annotated[list[Card], Meta(min_length=1, max_length=CARDS_PER_REQUEST_MAX)]


class SegmentCards(Struct, forbid_unknown_fields=True):
    cards: Cards


class OfferAssignment(Struct, forbid_unknown_fields=True):
    offer_id: Id
    rule: Id
    from_: date = msgspec.field(name="from")
    to: date
    cards: Cards | None = None
    segment: Id | None = None
    points: Annotated[int, Meta(ge=1, le=POINTS_MAX)] | None = None


class CouponRequest(Struct, forbid_unknown_fields=True):
    count: Annotated[int, Meta(ge=1, le=COUPONS_PER_REQUEST_MAX)]
    card: Card | None = None


DECODERS.update({t: msgspec.json.Decoder(t) for t in (SegmentCards, OfferAssignment, CouponRequest)})
LINE_CHECKS = {Receipt: line_value_problems, ReturnRequest: line_value_problems}
