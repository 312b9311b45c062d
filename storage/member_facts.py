"""What the rules knew about the member behind a confirmed receipt, kept with it.

Written with the receipt (receipt_member_facts, m027) from the same plan its postings come
from, so a backtest, `rules diff` and the explanation of a stored receipt replay it with
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


def insert(conn: sqlite3.Connection, rows: list[tuple[tuple[str, str, str], ReceiptMemberFacts]]) -> None:
    """In the receipts' own write transaction."""
    if rows:
        conn.executemany("INSERT INTO receipt_member_facts (store_id, register_id, receipt_id, facts) "
                         "VALUES (?, ?, ?, ?)", [(*key, encode(record)) for key, record in rows])


# What a read of receipts (aliased r) selects and joins to get each one's record, or NULL.
COLUMN = "f.facts"


def joined(conn: sqlite3.Connection) -> str:
    """The join for COLUMN; a database not upgraded yet (a tool run before the server was
    restarted on a new version) has no records, and every receipt reads NULL. PostgreSQL's
    schema has had the table from its start."""
    if is_postgresql(conn) or \
            conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'receipt_member_facts'").fetchone():
        return ("LEFT JOIN receipt_member_facts f ON f.store_id = r.store_id AND f.register_id = r.register_id "
                "AND f.receipt_id = r.receipt_id")
    return "LEFT JOIN (SELECT NULL AS facts) f ON 0"


def read(conn: sqlite3.Connection, key: tuple[str, str, str]) -> ReceiptMemberFacts | None:
    row = conn.execute("SELECT facts FROM receipt_member_facts WHERE store_id = ? AND register_id = ? "
                       "AND receipt_id = ?", key).fetchone()
    return None if row is None else decode(row[0])


def erase_personal(conn: sqlite3.Connection, member_id: int) -> int:
    """An erased member's birthday and tags leave the records of their receipts too (the
    rest is about the program, not the person); how many records changed."""
    rows = conn.execute(
        "SELECT f.store_id, f.register_id, f.receipt_id, f.facts FROM receipts r JOIN receipt_member_facts f "
        "ON f.store_id = r.store_id AND f.register_id = r.register_id AND f.receipt_id = r.receipt_id "
        "WHERE r.member_id = ?", (member_id,)).fetchall()
    changed = 0
    for store_id, register_id, receipt_id, data in rows:
        record = decode(data)
        if record.birthday is None and not record.tags:
            continue
        conn.execute("UPDATE receipt_member_facts SET facts = ? WHERE store_id = ? AND register_id = ? "
                     "AND receipt_id = ?", (encode(msgspec.structs.replace(record, birthday=None, tags=[])),
                                            store_id, register_id, receipt_id))
        changed += 1
    return changed
