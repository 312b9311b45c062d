"""The answers as msgspec types: what /openapi.json says of each response (server/openapi.py,
through msgspec.json.schema_components) and what the server encodes, so the document and
the bytes come from one type.

Field order is the order of the keys in the answers. A field that defaults to UNSET is a
key an answer may leave out (a cancel that had nothing to reverse has no `reversed`): it is
not required in the schema and not encoded while unset; a key an answer always has, even
as null, has no default. Some answers are converted from dicts other parts keep (the tier
view, the last reload, statement rows): their types forbid unknown fields, so a key added
to such a dict and not here fails where it is converted (and in tests/test_openapi.py)
instead of vanishing from the answer. Rule details a program file states freely (`when`,
`reward`, ...) are plain JSON values: the program decides their shape.
"""
from __future__ import annotations

from typing import Any, Literal

from msgspec import UNSET, Struct, UnsetType, field


# ------------------------------------------------------------------ shared parts

class ReceiptKey(Struct):
    store_id: str
    register_id: str
    receipt_id: str


class Balance(Struct):
    available: int
    pending: int
    held: int


class RulePoints(Struct):
    rule: str
    points: int


class LinePoints(Struct):
    line_no: int
    points: int


class LineRedeemed(Struct):
    line_no: int
    points: int
    discount: int


# ------------------------------------------------------------------ receipts

class Accrued(Struct):
    points: int
    available_from: str | None
    expires_on: str | None
    by_rule: list[RulePoints]
    by_line: list[LinePoints]


class Redeemed(Struct):
    points: int
    discount: int
    by_line: list[LineRedeemed]


class Hold(Struct):
    points: int
    expires_at: str


class ReceiptBalance(Struct):
    """A receipt's balance after it: empty (`{}`) for a receipt without a card."""
    available: int | UnsetType = UNSET
    pending: int | UnsetType = UNSET
    held: int | UnsetType = UNSET


class CouponStatus(Struct):
    code: str
    status: Literal["applied", "not_needed", "unknown", "used", "expired", "not_yet_valid", "other_card"]


class CalculateAnswer(Struct):
    receipt: ReceiptKey
    member_id: str | None
    rules_version: str
    accrued: Accrued
    redeemed: Redeemed
    balance: ReceiptBalance
    messages: list[str]
    hold: Hold | None
    coupons: list[CouponStatus] | UnsetType = UNSET     # when the receipt sent codes
    # A receipt already confirmed: its stored answer, as a confirm sent again gets it.
    replayed: bool | UnsetType = UNSET
    cancelled: bool | UnsetType = UNSET


class ConfirmAnswer(Struct):
    """201 as planned; 200 the stored answer with `replayed: true` (and `cancelled: true`
    with the balance now, once the receipt was cancelled)."""
    receipt: ReceiptKey
    member_id: str | None
    rules_version: str
    accrued: Accrued
    redeemed: Redeemed
    balance: ReceiptBalance
    messages: list[str]
    replayed: bool
    cancelled: bool | UnsetType = UNSET
    coupons: list[CouponStatus] | UnsetType = UNSET     # when the receipt sent codes


class ReversedPoints(Struct):
    points: int
    by_rule: list[RulePoints]


class RefundedPoints(Struct):
    points: int


class CancelAnswer(Struct):
    """`status` says what happened; the other keys come with the statuses they belong to."""
    receipt: ReceiptKey
    status: Literal["cancelled", "hold_released", "nothing_to_cancel"]
    already: bool | UnsetType = UNSET
    released_points: int | UnsetType = UNSET
    reversed: ReversedPoints | UnsetType = UNSET
    refunded: RefundedPoints | UnsetType = UNSET
    balance: Balance | UnsetType = UNSET


class ReturnKey(Struct):
    store_id: str
    register_id: str
    return_id: str


class ReturnReversed(Struct):
    points: int
    by_rule: list[RulePoints]
    by_line: list[LinePoints]


class ReturnRefunded(Struct):
    points: int
    discount: int
    by_line: list[LineRedeemed]


class ReturnAnswer(Struct):
    """A member's return also has `balance`, the balance after it."""
    return_: ReturnKey = field(name="return")
    receipt: ReceiptKey
    member_id: str | None
    reversed: ReturnReversed
    refunded: ReturnRefunded
    amount: int
    replayed: bool
    balance: Balance | UnsetType = UNSET


# ------------------------------------------------------------------ members

class DatedPoints(Struct):
    date: str
    points: int


class ManualIgnored(Struct, forbid_unknown_fields=True):
    tier: str
    until: str
    reason: str


class TierView(Struct, forbid_unknown_fields=True):
    """`until` with a manual tier in force; `manual_ignored` when the manual tier is one the
    program no longer defines."""
    id: str | None
    next: str | None
    to_next: int | None
    metric: str
    value: int
    manual: bool
    until: str | UnsetType = UNSET
    manual_ignored: ManualIgnored | UnsetType = UNSET


class Profile(Struct):
    phone_last4: str | None
    birthday: str | None
    tags: list[str]


class Rfm(Struct):
    r: int
    f: int
    m: int


class MemberOffer(Struct, forbid_unknown_fields=True):
    rule: str
    from_: str = field(name="from")
    to: str = ""
    points_left: int | None = None


class MemberAnswer(Struct):
    card: str | None
    card_last4: str | None
    cards_last4: list[str]
    member_id: str
    tier: TierView
    balance: Balance
    expiring: list[DatedPoints]
    profile: Profile
    enrolled_at: str
    as_of: str
    # The CRM's fields (server/member_care.py with_crm): on every member answer the routes send.
    crm_id: str | None | UnsetType = UNSET
    consent: dict[str, bool] | UnsetType = UNSET
    consent_updated_at: str | None | UnsetType = UNSET
    # Customer value management (GET /v1/members/{card}): segments, RFM scores, offers, control groups.
    segments: list[str] | UnsetType = UNSET
    rfm: Rfm | None | UnsetType = UNSET
    offers: list[MemberOffer] | UnsetType = UNSET
    held_out_of: list[str] | UnsetType = UNSET


class StatementPosting(Struct, forbid_unknown_fields=True):
    id: int
    kind: str
    points: int
    at: str
    recorded_at: str
    rule: str | None
    rules_version: str | None
    receipt: ReceiptKey | None
    ref: str | None
    key_id: str | None
    note: str | None
    lot: int | None
    running_balance: int
    counter_account: str | None
    key_name: str | None = None     # the key's holder, named by the route from key_id


class StatementAnswer(Struct):
    card_last4: str
    member_id: str
    postings: list[StatementPosting]


class AdjustmentAnswer(Struct):
    adjustment_id: str
    member_id: str
    points: int
    reason: str
    key_id: str
    replayed: bool
    balance: Balance
    # The key's holder, named by the route from key_id when answering: unset in the stored answer.
    key_name: str | None | UnsetType = UNSET


# ------------------------------------------------------------------ member care

class FoundMember(Struct, forbid_unknown_fields=True):
    member_id: str
    cards_last4: list[str]
    phone_last4: str | None
    enrolled_at: str
    balance: Balance
    tier: str | None
    merged_into: str | None
    crm_id: str | None
    consent: dict[str, bool]
    consent_updated_at: str | None


class MemberSearchAnswer(Struct):
    """At most `limit` members with the phone."""
    members: list[FoundMember]
    limit: int


class CardReplacementAnswer(Struct, forbid_unknown_fields=True):
    """A replay answers the card the replacement took out of use, as the first answer did."""
    member_id: str
    card_last4: str
    replaced_card_last4: str | None
    cards_last4: list[str]
    replayed: bool


class MergeAnswer(Struct, forbid_unknown_fields=True):
    merge_id: str
    from_member_id: str
    into_member_id: str
    lots_moved: int
    points_moved: int
    cards_retired_last4: list[str]
    key_id: str
    replayed: bool


class ErasureAnswer(Struct, forbid_unknown_fields=True):
    member_id: str
    erased_at: str
    cards_removed: int
    receipts_scrubbed: int
    members_erased: list[str]
    replayed: bool


# ------------------------------------------------------------------ events

class Event(Struct, forbid_unknown_fields=True):
    """`data` is the event type's own (docs/integrators.md lists them). crm_id and consent:
    the member's as of the event; consent null for an event written before it was kept."""
    id: int
    type: str
    occurred_at: str
    member_id: str | None
    card_last4: str | None
    crm_id: str | None
    consent: dict[str, bool] | None
    data: dict[str, Any]


class EventsAnswer(Struct):
    events: list[Event]
    next_after: int


# ------------------------------------------------------------------ customer value management

class SegmentSizeAnswer(Struct):
    segment: str
    members: int


class OfferAnswer(Struct):
    offer_id: str
    rule: str
    members: int
    # What looks odd but is taken (server/cvm.py offer_warnings): late receipts are judged at their ts.
    warnings: list[str] = []


class CouponCodesAnswer(Struct):
    campaign: str
    codes: list[str]
    warnings: list[str] = []    # as OfferAnswer's: a campaign that has ended


class CampaignGroup(Struct, forbid_unknown_fields=True):
    members: int
    buyers: int
    receipts: int
    spend: int
    scope_spend: int
    points: int


class SpendUplift(Struct, forbid_unknown_fields=True):
    """Spend per member, in minor units; `low` and `high` bound its 95% interval when it can be estimated."""
    spend_per_member: int
    low: int | None
    high: int | None


class CampaignReport(Struct, forbid_unknown_fields=True):
    rule: str
    from_: str = field(name="from")
    to: str
    treated: CampaignGroup
    control: CampaignGroup
    uplift: SpendUplift | None      # null when a group has no members to compare
    incremental_spend: int | None
    points_cost: int
    # The program version whose definition of the rule the report used (null: none is stored),
    # whether the live program still defines the rule so, and, when it does not, a note saying so.
    rules_version: str | None
    live: bool
    warnings: list[str]


# ------------------------------------------------------------------ the program

class Recorded(Struct, forbid_unknown_fields=True):
    load_id: int
    source: str
    by: str | None
    by_name: str | None
    reason: str | None
    previous_version: str | None


class LastReload(Struct, forbid_unknown_fields=True):
    """A refused load has `errors` and `kept_version`; a load that served, `version` and `changed`."""
    at: str
    ok: bool
    trigger: str
    errors: list[str]
    warnings: list[str]
    version: str | UnsetType = UNSET
    changed: bool | UnsetType = UNSET
    kept_version: str | None | UnsetType = UNSET
    served_from: str | UnsetType = UNSET
    lost_tiers: dict[str, int] | UnsetType = UNSET
    recorded: Recorded | UnsetType = UNSET


class ProgramInfo(Struct):
    id: str
    name: str
    currency: str
    timezone: str


class ProgramFile(Struct):
    path: str
    sha256: str


class RuleSummary(Struct, forbid_unknown_fields=True):
    """Where a rule is and what it says; the keys after `reward_kind` are the rule's own, as written."""
    id: str
    group: str | None
    priority: int
    file: str
    line: int
    reward_kind: str
    reward: Any | UnsetType = UNSET
    when: Any | UnsetType = UNSET
    period: Any | UnsetType = UNSET
    scope: Any | UnsetType = UNSET
    limit: Any | UnsetType = UNSET
    budget: Any | UnsetType = UNSET
    expires_in_days: int | UnsetType = UNSET
    personal: Any | UnsetType = UNSET
    holdout: Any | UnsetType = UNSET


class EventInfo(Struct):
    id: str
    on: str
    points: int
    expires_in_days: int | None


class RulesAnswer(Struct):
    version: str
    program: ProgramInfo
    directory: str
    files: list[ProgramFile]
    rules: list[RuleSummary]
    events: list[EventInfo]
    last_reload: LastReload | None


class ReloadAnswer(Struct):
    version: str
    last_reload: LastReload


class CheckAnswer(Struct):
    ok: bool
    problems: list[str]
    warnings: list[str]


class PutLiveAnswer(Struct, forbid_unknown_fields=True):
    """`folder_error` when the program serves but its folder could not be written."""
    version: str
    changed: bool
    load_id: int
    last_reload: LastReload
    folder_error: str | UnsetType = UNSET


class VersionLoad(Struct, forbid_unknown_fields=True):
    id: int
    version: str
    program: str
    loaded_at: str
    source: str
    deployed_by: str | None
    deployed_by_name: str | None
    reason: str | None


class VersionsAnswer(Struct):
    serving: str
    versions: list[VersionLoad]


class VersionAnswer(Struct, forbid_unknown_fields=True):
    version: str
    program: str
    recorded_at: str
    files: dict[str, str]


# ------------------------------------------------------------------ operations

class HealthAnswer(Struct):
    status: Literal["alive"]


class ReadyAnswer(Struct):
    status: Literal["ready"]
    rules_version: str
    write_queue: int


class OpenApiInfo(Struct):
    title: str
    version: str


class OpenApiComponents(Struct):
    schemas: dict[str, dict[str, Any]]
    securitySchemes: dict[str, dict[str, Any]]


class OpenApiDocument(Struct):
    """This API as OpenAPI 3.1 (its own schema is OpenAPI's, not repeated here)."""
    openapi: str
    jsonSchemaDialect: str
    info: OpenApiInfo
    paths: dict[str, dict[str, dict[str, Any]]]
    components: OpenApiComponents


# ------------------------------------------------------------------ errors

class ErrorDetail(Struct):
    path: str
    message: str


class ErrorBody(Struct):
    code: str
    message: str
    details: list[ErrorDetail]


class Error(Struct):
    """The one error shape (server/errors.py builds it)."""
    error: ErrorBody
