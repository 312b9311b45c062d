"""The accounts points move between. Every posting moves points between a member's
account (`member:<id>`, the posting's member_id) and one of these counter accounts, so
the sum over all accounts is zero by construction and the program's outstanding
liability is the sum of member accounts.

issue:program             points the program issues (its own stores, events)
funding:partner:<id>      points issued at a partner's stores; the partner funds its share
redemption:program        points spent at the program's own stores
redemption:partner:<id>   points spent at a partner's stores; owed to the partner
expiry                    points that expired unused
adjustment                points added or removed by hand
opening                   opening balances brought from a previous program (loyalty import members)
"""
from __future__ import annotations

ISSUE_PROGRAM = "issue:program"
REDEMPTION_PROGRAM = "redemption:program"
EXPIRY = "expiry"
ADJUSTMENT = "adjustment"
OPENING = "opening"
PARTNER_FUNDING_PREFIX = "funding:partner:"
PARTNER_REDEMPTION_PREFIX = "redemption:partner:"


def issue_account(partner: str | None) -> str:
    return PARTNER_FUNDING_PREFIX + partner if partner else ISSUE_PROGRAM


def redemption_account(partner: str | None) -> str:
    return PARTNER_REDEMPTION_PREFIX + partner if partner else REDEMPTION_PROGRAM


def member_account(member_id: int) -> str:
    return f"member:{member_id}"
