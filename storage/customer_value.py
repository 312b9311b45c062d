"""What customer value management needs of a receipt's member, read in one statement: the
segments they are in now, their personal offers valid at the receipt's local date, and
the stored rows of the coupon codes the receipt sent.

Each part is a SELECT of typed rows, (kind, text, text, integer, integer, text), joined by
UNION ALL, so one round trip reads all three (a part the receipt does not need is switched
off by its bound flag, which both SQLite and PostgreSQL test once, before any row: the
segments are, for a member whose segments the server keeps in memory). The
conditions are the ones storage/segments.py, storage/offers.py and storage/coupons.py
read each on its own; the text is built once per number of code hashes.
"""
from __future__ import annotations

import sqlite3
from datetime import date
from functools import lru_cache
from typing import NamedTuple

from storage import offers, segments
from storage.coupons import StoredCode
from storage.ledger import day_text

# The first part's NULLs are typed: PostgreSQL takes a UNION's column types from its first
# SELECT, and an untyped NULL there is text, which the offers' integers do not match.
_SEGMENTS = segments.current_spans("'s', segment_id, CAST(NULL AS TEXT), from_run, CAST(NULL AS INTEGER), "
                                   "CAST(NULL AS TEXT)", guard="? = 1 AND ")
_OFFERS = ("SELECT 'o', offer_id, rule_id, points, points_used, to_date FROM offer_members "
           f"WHERE ? = 1 AND {offers.VALID}")
_BASE = f"{_SEGMENTS} UNION ALL {_OFFERS}"


class Rows(NamedTuple):
    listed: set[str]                    # list segments the member is in
    computed: set[str]                  # rfm and when segments, as the newest finished run left them
    offers: list[offers.OfferRow]       # valid on the day, in budget order (offers.valid)
    codes: dict[str, StoredCode]        # by the hash they are stored under


NOTHING = Rows(set(), set(), [], {})


# Texts by number of code hashes: a receipt sends at most 32 codes, each hashed under up to
# 17 keys (privacy.hmac_key_rotations), and the same few counts recur all day.
@lru_cache(maxsize=64)
def _statement(hashes: int) -> str:
    if not hashes:
        return _BASE
    return (f"{_BASE} UNION ALL SELECT 'c', code, campaign, uses, NULL, card FROM coupon_codes "
            f"WHERE code IN ({', '.join('?' * hashes)})")


def read(conn: sqlite3.Connection, member_id: int, with_segments: bool, offers_on: date | None,
         code_hashes: list[str]) -> Rows:
    """offers_on: the local date offers must be valid on, None for none; code_hashes: every
    hash a code sent may be stored under (coupons.hashes). Nothing asked, nothing read."""
    if not (with_segments or offers_on or code_hashes):
        return NOTHING
    day = day_text(offers_on) if offers_on else ""     # a kept text: isoformat() costs some 3 k a call
    # The flags as integers: PostgreSQL compares no boolean with 1.
    segments_wanted, offers_wanted = int(with_segments), int(offers_on is not None)
    listed, computed, valid, codes = set(), set(), [], {}
    for kind, text, other, number, used, last in conn.execute(_statement(len(code_hashes)), (
            segments_wanted, member_id, segments_wanted, member_id, offers_wanted, member_id, day, day,
            *code_hashes)):
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
