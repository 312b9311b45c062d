"""What customer value management needs of a receipt's member, read in one statement: the
segments they are in now, their personal offers valid at the receipt's local date, and
the stored rows of the coupon codes the receipt sent.

Each part is a SELECT of typed rows, (kind, text, text, integer, integer, text), joined by
UNION ALL, so one round trip reads all three. A part the receipt does not need is left
out of the text (the segments, for a member whose segments the server keeps in memory;
the offers, for one it knows holds none that day): even switched off by a bound flag, a
part cost some 2,400 instructions of the 40,000 the statement costs. Nothing needed, no
statement. The conditions are the ones storage/segments.py, storage/offers.py and
storage/coupons.py read each on its own; the text is built once per set of parts and
number of code hashes.
"""
from __future__ import annotations

import sqlite3
from datetime import date
from functools import lru_cache
from typing import NamedTuple

from storage import offers, segments
from storage.coupons import StoredCode

# The first part's NULLs are typed: PostgreSQL takes a UNION's column types from its first
# SELECT, and an untyped NULL there is text, which the offers' integers do not match.
_SEGMENTS = segments.current_spans("'s', segment_id, CAST(NULL AS TEXT), from_run, CAST(NULL AS INTEGER), "
                                   "CAST(NULL AS TEXT)")
_OFFERS = f"SELECT 'o', offer_id, rule_id, points, points_used, to_date FROM offer_members WHERE {offers.VALID}"


class Rows(NamedTuple):
    listed: set[str]                    # list segments the member is in
    computed: set[str]                  # rfm and when segments, as the newest finished run left them
    offers: list[offers.OfferRow]       # valid on the day, in budget order (offers.valid)
    codes: dict[str, StoredCode]        # by the hash they are stored under


NOTHING = Rows(set(), set(), [], {})


# Texts by parts and number of code hashes: a receipt sends at most 32 codes, each hashed
# under up to 17 keys (privacy.hmac_key_rotations), and the same few counts recur all day.
@lru_cache(maxsize=256)
def _statement(with_segments: bool, with_offers: bool, hashes: int) -> str:
    parts = [_SEGMENTS] if with_segments else []
    if with_offers:
        parts.append(_OFFERS)
    if hashes:
        parts.append(f"SELECT 'c', code, campaign, uses, NULL, card FROM coupon_codes "
                     f"WHERE code IN ({', '.join('?' * hashes)})")
    return " UNION ALL ".join(parts)


def read(conn: sqlite3.Connection, member_id: int, with_segments: bool, offers_on: date | None,
         code_hashes: list[str]) -> Rows:
    """offers_on: the local date offers must be valid on, None for none; code_hashes: every
    hash a code sent may be stored under (coupons.hashes). Nothing asked, nothing read."""
    if not (with_segments or offers_on or code_hashes):
        return NOTHING
    params = [member_id, member_id] if with_segments else []
    if offers_on:
        day = offers_on.isoformat()
        params += (member_id, day, day)
    listed, computed, valid, codes = set(), set(), [], {}
    for kind, text, other, number, used, last in conn.execute(
            _statement(with_segments, offers_on is not None, len(code_hashes)), params + code_hashes):
        if kind == "s":
            if number is None:
                listed.add(text)
            else:
                computed.add(text)
        elif kind == "o":
            valid.append(offers.OfferRow(text, other, number, used, last))
        else:
            codes[text] = StoredCode(other, last, number)
    return Rows(listed, computed, offers.in_budget_order(valid) if len(valid) > 1 else valid, codes)
