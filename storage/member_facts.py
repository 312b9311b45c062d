"""What the rules knew about the member behind a confirmed receipt, kept with it.

Written in the receipt's own row (receipts.member_facts, m036; receipt_member_facts, from
m027 until then, which PostgreSQL keeps for the receipts of that time) from the same plan
its postings come from, so a backtest, `rules diff` and the explanation of a stored receipt replay it with
the member as the server saw them at arrival, not as a member without segments, offers or
coupons: the tier and the window totals it was computed from, tags, birthday, enrolment,
the receipt's number, the segments, the personal offers with the points they had left and
the points this receipt took of them, each coupon code's campaign and status as judged
(never the code), and the control groups it was kept out of with the points that cost it.

Stored as msgpack (ReceiptMemberFacts), its first field a version: a reader refuses a
version it does not know rather than misreading it. Version 1 is the only one so far.
Receipts confirmed before m027 have no record.
"""
from __future__ import annotations

import sqlite3
from datetime import date

import msgspec

from storage import versioned
from storage.sql import is_postgresql

VERSION = 1
USABLE = "usable"       # a code's status when it could be used (storage/coupons.py USABLE)


class TierFacts(msgspec.Struct, array_like=True, frozen=True):
    """The tier the rules saw, and what a program with other levels needs to compute its own."""
    id: str
    manual: str | None          # the member's manual tier in force at ts, defined by the program or not
    window_days: int            # the window the totals below cover, ending at ts
    spend: int                  # net receipt totals in it, minor units
    receipts: int               # confirmed receipts in it


class OfferFact(msgspec.Struct, array_like=True, frozen=True):
    rule: str
    points_left: int | None     # what the offers of the rule could still give; None: no budget
    charged: int                # what this receipt took of them


class CouponFact(msgspec.Struct, array_like=True, frozen=True):
    campaign: str | None        # None: the code was not a code of the program's campaigns
    status: str                 # as judged at ts: usable, used, expired, not_yet_valid, other_card, unknown,
                                # not_needed (a second code of a campaign that had a usable one)


class HeldOut(msgspec.Struct, array_like=True, frozen=True):
    rule: str
    points: int                 # what the rule would have given had the member not been in its control group


class ReceiptMemberFacts(msgspec.Struct, array_like=True, frozen=True):
    version: int
    member_id: str              # the public id, which control groups are drawn from
    tier: TierFacts
    tags: list[str]
    birthday: date | None
    enrolled_on: date | None
    receipt_number: int
    segments: list[str]
    offers: list[OfferFact]
    coupons: list[CouponFact]
    held_out: list[HeldOut]

    def usable_campaigns(self) -> list[str]:
        return [c.campaign for c in self.coupons if c.status == USABLE and c.campaign is not None]


UnknownVersion = versioned.UnknownVersion
_read = versioned.reader(ReceiptMemberFacts, VERSION, "member facts")


def encode(record: ReceiptMemberFacts) -> bytes:
    return versioned.encode(record)


def decode(data: bytes) -> ReceiptMemberFacts:
    return _read(data)


def source(conn: sqlite3.Connection) -> tuple[str, str]:
    """What a read of receipts (aliased r) selects for each one's record (NULL when it has
    none) and the join that needs. On PostgreSQL the receipts confirmed before p013 have
    theirs in receipt_member_facts. A SQLite database not upgraded yet (a tool run before
    the server was restarted on a new version) has them there too, or none before m027."""
    if is_postgresql(conn):
        return "COALESCE(r.member_facts, f.facts)", _OLD_TABLE
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'receipt_member_facts'").fetchone():
        return "f.facts", _OLD_TABLE
    if any(row[1] == "member_facts" for row in conn.execute("PRAGMA table_info(receipts)")):
        return "r.member_facts", ""
    return "NULL", ""


_OLD_TABLE = ("LEFT JOIN receipt_member_facts f ON f.store_id = r.store_id AND f.register_id = r.register_id "
              "AND f.receipt_id = r.receipt_id")


def read(conn: sqlite3.Connection, key: tuple[str, str, str]) -> ReceiptMemberFacts | None:
    column, join = source(conn)
    row = conn.execute(f"SELECT {column} FROM receipts r {join} WHERE r.store_id = ? AND r.register_id = ? "
                       "AND r.receipt_id = ?", key).fetchone()
    return None if row is None or row[0] is None else decode(row[0])


def erase_personal(conn: sqlite3.Connection, member_id: int) -> int:
    """An erased member's birthday and tags leave the records of their receipts too (the
    rest is about the program, not the person); how many records changed."""
    column, join = source(conn)
    rows = conn.execute(f"SELECT r.store_id, r.register_id, r.receipt_id, {column} FROM receipts r {join} "
                        f"WHERE r.member_id = ? AND {column} IS NOT NULL", (member_id,)).fetchall()
    changed = 0
    for store_id, register_id, receipt_id, data in rows:
        record = decode(data)
        if record.birthday is None and not record.tags:
            continue
        erased = (encode(msgspec.structs.replace(record, birthday=None, tags=[])), store_id, register_id, receipt_id)
        conn.execute("UPDATE receipts SET member_facts = ? WHERE store_id = ? AND register_id = ? "
                     "AND receipt_id = ?", erased)
        if join:    # the copy from before, kept beside on PostgreSQL, goes as well
            conn.execute("UPDATE receipt_member_facts SET facts = ? WHERE store_id = ? AND register_id = ? "
                         "AND receipt_id = ?", erased)
        changed += 1
    return changed
