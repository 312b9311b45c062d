"""What a confirmed receipt took of coupon codes and personal offer budgets, kept in its
own row (receipts.takes, m038), so a cancel or a return of the whole receipt gives exactly
that back.

Until m038 each use and each charge was a row of coupon_uses and offer_charges, keyed by
the receipt's identity: each register numbers its own receipts, so every receipt that used
a code or an offer wrote a B-tree page of its own into its COMMIT (two for a code, with
coupon_uses' index by code), even when ten receipts shared the commit. In the row, which is
written anyway, the same facts cost some 80 bytes. The codes' use counts and the offers'
points used stay on their own rows (coupon_codes.uses, offer_members.points_used): they
are what the next receipt reads, and the conditional UPDATEs on them are what keeps two
receipts from taking the last use or the last points.

On PostgreSQL uses and charges are still written as rows (a previous version running
beside this one during a rolling upgrade gives back from them), and no record; receipts
confirmed before m038 have rows too. A give-back takes from both: each use and each charge
is in one of the two places, never in both (storage/offers.py take_over moves a record's
charges of an offer to rows where a merge needs them there, and takes them out of the
record).

A version before m038 does not read the record: a database served by one again would give
nothing back for the receipts that keep one. On PostgreSQL only receipts `migrate
sqlite-to-postgres` copied keep one.

Stored as msgpack (Takes), its first field a version: a reader refuses a version it does
not know rather than misreading it. Version 1 is the only one so far.
"""
from __future__ import annotations

import sqlite3

import msgspec

from storage import versioned

VERSION = 1


class Takes(msgspec.Struct, array_like=True, frozen=True):
    version: int
    codes: list[str]                    # each code used, by its hash as stored when used
    charges: list[tuple[str, int]]      # (offer id, points) taken of the member's budgets

    def without_offer(self, offer_id: str) -> Takes:
        return Takes(self.version, self.codes, [c for c in self.charges if c[0] != offer_id])


UnknownVersion = versioned.UnknownVersion
_read = versioned.reader(Takes, VERSION, "coupon and offer takes")
NONE = Takes(VERSION, [], [])


def encode(codes: list[str], charges: list[tuple[str, int]]) -> bytes | None:
    """The record, or None (a NULL column) when the receipt took nothing."""
    if not (codes or charges):
        return None
    return versioned.encode(Takes(VERSION, codes, charges))


def decode(data: bytes | None) -> Takes:
    return NONE if data is None else _read(bytes(data))


_KEY = "store_id = ? AND register_id = ? AND receipt_id = ?"


def take_out(conn: sqlite3.Connection, receipt_key: tuple[str, str, str]) -> Takes:
    """The receipt's record, cleared in its row: what is given back once is not given back
    again (a cancel after a return of the whole receipt)."""
    row = conn.execute(f"SELECT takes FROM receipts WHERE {_KEY}", receipt_key).fetchone()
    if row is None or row[0] is None:
        return NONE
    conn.execute(f"UPDATE receipts SET takes = NULL WHERE {_KEY}", receipt_key)
    return decode(row[0])


def of_members(conn: sqlite3.Connection, member_ids: list[int]) -> list[tuple[tuple[str, str, str], Takes]]:
    """(receipt key, record) of the members' receipts that keep one."""
    marks = ", ".join("?" * len(member_ids))
    rows = conn.execute("SELECT store_id, register_id, receipt_id, takes FROM receipts "
                        f"WHERE member_id IN ({marks}) AND takes IS NOT NULL", member_ids).fetchall()
    return [((store, register, receipt), decode(data)) for store, register, receipt, data in rows]


def rewrite(conn: sqlite3.Connection, receipt_key: tuple[str, str, str], record: Takes) -> None:
    conn.execute(f"UPDATE receipts SET takes = ? WHERE {_KEY}",
                 (encode(record.codes, record.charges), *receipt_key))
