"""Coupon codes: random, unguessable, stored only as their HMAC (like cards), with their uses.

A code is 12 characters of an alphabet without the look-alikes 0/O and 1/I (60 random bits),
printed as XXXX-XXXX-XXXX; what a register sends is read without case, spaces or dashes.
Even a campaign of a million codes leaves a guess a chance of about 1 in 10^12.

Using a code is one conditional UPDATE (`uses < uses_per_code`) in the receipt's write
transaction, so two receipts racing for the last use cannot both get it: SQLite runs one
write transaction at a time, in this server or in any other process on the database. The
receipt's row keeps the codes it used (storage/receipt_takes.py; on PostgreSQL, and for receipts
confirmed before m038, a coupon_uses row names the receipt), so a cancel or a full return
gives exactly those uses back. A batch of confirms uses its codes with one statement of
each kind (use_codes).
"""
from __future__ import annotations

import secrets
import sqlite3
from datetime import date, datetime
from functools import lru_cache
from typing import Callable, NamedTuple

import msgspec

from storage.ledger import iso
from storage.sql import is_postgresql

ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZ"
CODE_CHARS = 12
GROUP_CHARS = 4
WRITE_BATCH_CODES = 5_000            # `loyalty coupons generate`: one write transaction each
CODE_TEXT_MAX = 64                   # docs/integrators.md: a receipt's coupon strings are 1 to 64 characters


class Campaign(msgspec.Struct, frozen=True):
    """A coupon campaign of the program: `{id, uses_per_code, valid: {from, to}}` (inclusive local dates)."""
    id: str
    uses_per_code: int = 1
    valid_from: date | None = None
    valid_to: date | None = None


class Judged(NamedTuple):
    statuses: list[tuple[str, str]]      # (code as sent, status) in the receipt's order
    usable: dict[str, tuple[str, str]]   # campaign -> (code as sent, its HMAC): the first valid one
    campaigns: list[str | None] = []     # each code's campaign, as statuses; None: not the program's


# A usable code's status until the receipt path knows whether a fired rule needed it:
# it then answers `applied` or `not_needed` (docs/integrators.md).
USABLE = "usable"


def new_code() -> str:
    raw = "".join(secrets.choice(ALPHABET) for _ in range(CODE_CHARS))
    return "-".join(raw[i:i + GROUP_CHARS] for i in range(0, CODE_CHARS, GROUP_CHARS))


def normalize(code: str) -> str:
    """The code as stored: upper case, without spaces and dashes a person may have typed."""
    return code.upper().replace(" ", "").replace("-", "")


def add_codes(conn: sqlite3.Connection, campaign: str, codes: list[str], card_hmac: str | None,
              mac: Callable[[str], str], now: datetime) -> list[str]:
    """Stores the codes; returns those already taken (vanishingly rare: the caller draws new ones)."""
    taken = []
    for code in codes:
        cur = conn.execute("INSERT INTO coupon_codes (code, campaign, card, created_at) VALUES (?, ?, ?, ?) "
                           "ON CONFLICT (code) DO NOTHING", (mac(normalize(code)), campaign, card_hmac, iso(now)))
        if cur.rowcount == 0:
            taken.append(code)
    return taken


def rebind_codes(conn: sqlite3.Connection, old_card: tuple[str, ...], new_card: str) -> None:
    """Codes bound to a card taken out of use go to the card taking its place (a replacement's
    new card, a merge's surviving member's card): they were given to the customer, and the
    old card can never present them again. old_card: every hash of the old card a code may
    be bound under during a key rotation (server/privacy.py Privacy.forms); new_card: a hash
    under the key in force, so that nothing written stays under an earlier key alone."""
    marks = ", ".join("?" * len(old_card))
    conn.execute(f"UPDATE coupon_codes SET card = ? WHERE card IN ({marks})", (new_card, *old_card))


class StoredCode(NamedTuple):
    campaign: str
    card: str | None        # the card's HMAC a code is bound to
    uses: int


def hashes(codes: list[str], mac: Callable[[str], str]) -> list[tuple[str, ...]]:
    """Each code's hash under the key in force, then under earlier ones (`older`,
    server/privacy.py) while `privacy rotate-key` has not wrapped it: the ones it may be stored under."""
    return [(digest, *getattr(digest, "older", ())) for digest in (mac(normalize(code)) for code in codes)]


@lru_cache(maxsize=64)
def stored_rows_sql(count: int) -> str:
    """The rows of `count` code hashes, as (hash, campaign, uses, card): built once per count."""
    return f"SELECT code, campaign, uses, card FROM coupon_codes WHERE code IN ({', '.join('?' * count)})"


def stored(conn: sqlite3.Connection, candidates: list[tuple[str, ...]]) -> dict[str, StoredCode]:
    """The stored rows of the codes, by hash, in one statement."""
    flat = [digest for digests in candidates for digest in digests]
    return {code: StoredCode(campaign, card, uses)
            for code, campaign, uses, card in conn.execute(stored_rows_sql(len(flat)), flat)}


def judge(conn: sqlite3.Connection, codes: list[str], card_hmac: str | None, local_date: date,
          campaigns: dict[str, Campaign], mac: Callable[[str], str]) -> Judged:
    """Each code's status at the receipt's local date, and the first usable code of each campaign."""
    candidates = hashes(codes, mac)
    return judged(codes, candidates, stored(conn, candidates), card_hmac, local_date, campaigns)


def judged(codes: list[str], candidates: list[tuple[str, ...]], rows: dict[str, StoredCode], card_hmac: str | None,
           local_date: date, campaigns: dict[str, Campaign]) -> Judged:
    """judge, from the codes' hashes (hashes()) and the rows stored under them (stored())."""
    statuses, usable, of_code = [], {}, []
    for code, digests in zip(codes, candidates):
        code_hmac = next((d for d in digests if d in rows), digests[0])
        row = rows.get(code_hmac)
        status = _status(row, card_hmac, local_date, campaigns)
        if status == USABLE:
            if row.campaign in usable:
                status = "not_needed"    # the campaign's first valid code is the one used
            else:
                usable[row.campaign] = (code, code_hmac)
        statuses.append((code, status))
        of_code.append(row.campaign if row is not None and row.campaign in campaigns else None)
    return Judged(statuses, usable, of_code)


def _status(row: StoredCode | None, card_hmac: str | None, local_date: date, campaigns: dict[str, Campaign]) -> str:
    if row is None or row.campaign not in campaigns:
        return "unknown"
    c = campaigns[row.campaign]
    if row.card is not None and row.card not in (card_hmac, *getattr(card_hmac, "older", ())):
        return "other_card"
    if c.valid_from is not None and local_date < c.valid_from:
        return "not_yet_valid"
    if c.valid_to is not None and local_date > c.valid_to:
        return "expired"
    if row.uses >= c.uses_per_code:
        return "used"
    return USABLE


class CodeUse(NamedTuple):
    receipt_key: tuple[str, str, str]
    code_hmac: str              # as stored
    uses_per_code: int
    used_at: str                # as stored (ledger.iso)


def use_codes(conn: sqlite3.Connection, uses: list[CodeUse], in_rows: bool) -> bool:
    """Takes one use of each code for its receipt, in the caller's write transaction, with
    one statement of each kind for all of them. False when a code had no use left: then
    nothing was recorded, and the uses taken of the others are the caller's to roll back
    (the receipt path's savepoint does). in_rows: each use is also a coupon_uses row (whose
    key refuses a second use of a code by one receipt: sqlite3.IntegrityError); otherwise
    the receipt's row keeps them (storage/receipt_takes.py)."""
    if not uses:
        return True
    took = conn.executemany("UPDATE coupon_codes SET uses = uses + 1 WHERE code = ? AND uses < ?",
                            [(use.code_hmac, use.uses_per_code) for use in uses]).rowcount
    if took < len(uses):
        return False
    if in_rows:
        conn.executemany("INSERT INTO coupon_uses (store_id, register_id, receipt_id, code, used_at) "
                         "VALUES (?, ?, ?, ?, ?)", [(*use.receipt_key, use.code_hmac, use.used_at) for use in uses])
    return True


def give_back(conn: sqlite3.Connection, receipt_key: tuple[str, str, str], recorded: list[str],
              forms: Callable[[str], tuple[str, ...]]) -> int:
    """Gives back every use the receipt took (a cancel, a return of the whole receipt); how
    many. recorded: the hashes its row kept (storage/receipt_takes.py), as stored when used;
    forms: a hash and the same wrapped under each later key (server/privacy.py
    Privacy.forms), since `privacy rotate-key` may have moved the code's row meanwhile."""
    used = conn.execute("DELETE FROM coupon_uses WHERE store_id = ? AND register_id = ? AND receipt_id = ? "
                        "RETURNING code", receipt_key).fetchall()
    conn.executemany("UPDATE coupon_codes SET uses = uses - 1 WHERE code = ? AND uses > 0", used)
    for code in recorded:       # the code's row is under one of its forms
        candidates = forms(code)
        conn.execute(f"UPDATE coupon_codes SET uses = uses - 1 WHERE code IN ({', '.join('?' * len(candidates))}) "
                     "AND uses > 0", candidates)
    return len(used) + len(recorded)


def rewrap_codes(conn: sqlite3.Connection, pairs: list[tuple[str, str]]) -> int:
    """pairs: (stored code hash, the same wrapped up to the key in force). The code is the
    key coupon_uses refer to, so each moves to a new row its uses follow, in the caller's
    transaction; a code gone since it was read matches nothing. A receipt's row keeps the
    hash it used the code under (storage/receipt_takes.py): give_back finds the code under
    that hash's later forms until `rotate-key` wraps the receipts' records too, after the
    codes. On PostgreSQL the code's row is locked before it is copied, so a use another
    process counts meanwhile is not lost."""
    moved = 0
    for old, new in pairs:
        if is_postgresql(conn):
            conn.execute("SELECT 1 FROM coupon_codes WHERE code = ? FOR UPDATE", (old,))
        moved += conn.execute("INSERT INTO coupon_codes (code, campaign, card, uses, created_at) "
                              "SELECT ?, campaign, card, uses, created_at FROM coupon_codes WHERE code = ?",
                              (new, old)).rowcount
        conn.execute("UPDATE coupon_uses SET code = ? WHERE code = ?", (new, old))
        conn.execute("DELETE FROM coupon_codes WHERE code = ?", (old,))
    return moved
