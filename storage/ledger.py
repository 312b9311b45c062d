"""Queries and writes on the ledger. Every function takes a connection: the read functions
run on a reader thread, the write functions inside the writer thread's transaction
(storage.db.Database.write), so a group of them commits or fails together. The same
functions run on PostgreSQL (storage/pg/): where several processes write at once, the
member's row lock (lock_member) orders what the one SQLite writer ordered, and postings
chain per member (storage/pg/ledger.py); the few functions concerned choose by backend.

Times are stored as UTC ISO strings of one fixed width so that text order is time order;
lot dates are the program's local calendar dates (YYYY-MM-DD).
"""
from __future__ import annotations

import functools
import hashlib
import sqlite3
import threading
import zlib
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import NamedTuple

import msgspec
import zstandard

from storage import line_records
from storage.accounts import member_account
from storage.db import Refusal
from storage.sql import LockFirst, arrival, is_postgresql

STATEMENT_ROWS_MAX = 1_000
# pg_advisory_xact_lock's first key for a budgeted rule's lock ('budg' as a number), fixed for good.
BUDGET_LOCK_CLASS = 0x62756467
ISO_CACHE_ENTRIES_MAX = 1_024


class InsufficientPoints(Refusal):
    """Raised inside a write when the member's lots cannot cover a debit: `requested` the
    points asked for, `available` what the lots had beside what others hold (never below 0),
    so the refusal can tell the caller both."""

    def __init__(self, requested: int, available: int):
        super().__init__(f"{requested} points requested, {available} available")
        self.requested, self.available = requested, available


@functools.lru_cache(maxsize=ISO_CACHE_ENTRIES_MAX)
def iso(dt: datetime) -> str:
    # Formatted by hand: strftime costs several times more, and this runs per posting. A
    # receipt formats its own time and the clock's several times; the cache answers repeats.
    # %-formatting: an f-string's format spec per field cost twice as many instructions.
    u = dt if dt.tzinfo is timezone.utc else dt.astimezone(timezone.utc)
    return "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ" % (u.year, u.month, u.day, u.hour, u.minute, u.second,
                                                   u.microsecond)


# A date's text as stored and answered (2026-11-24), by the date: a confirm formats the same
# few dates (its day, its points' availability and expiry) some ten times over, and
# str(date) costs several times a look-up here.
DAY_TEXTS_MAX = 4_096
_day_texts: dict = {}


def day_text(day: date | str) -> str:
    text = _day_texts.get(day)
    if text is None:
        if len(_day_texts) >= DAY_TEXTS_MAX:
            _day_texts.clear()
        text = _day_texts[day] = str(day)
    return text


def from_iso(s: str) -> datetime:
    # fromisoformat reads the stored form (trailing Z included) ~20x faster than strptime.
    return datetime.fromisoformat(s)


ReceiptKey = tuple[str, str, str]


# ---------------------------------------------------------------- members

@dataclass
class MemberRow:
    id: int
    phone: str | None           # the last four digits only; the number is kept as an HMAC
    birthday: str | None
    tags: str
    referred_by: int | None
    enrolled_at: str
    manual_tier: str | None
    manual_tier_until: str | None
    # The CRM's fields, read with the rest so that a receipt's event carries them without a query.
    crm_id: str | None = None
    consent: int = 0            # a bit per channel of CONSENT_CHANNELS, in that order
    # segments_generation (m034) as this same statement saw it: read before the member's
    # spans, so spans read after it are as new as it or newer (PostgreSQL's statements each
    # take their own snapshot), the key a server's kept segments are valid under.
    segments_generation: int | None = None

    @property
    def public_id(self) -> str:
        return member_public_id(self.id)


def member_public_id(member_id: int) -> str:
    return f"m_{member_id}"


CONSENT_CHANNELS = ("sms", "viber", "email", "push")
# The member's consent as one integer, a bit per channel of CONSENT_CHANNELS (sms is 1);
# SQLite gives << and | one precedence, hence the parentheses.
CONSENT_BITS = "(m.consent_sms | (m.consent_viber << 1) | (m.consent_email << 2) | (m.consent_push << 3))"

_MEMBER_COLUMNS = ("m.id, m.phone_last4, m.birthday, m.tags, m.referred_by, m.enrolled_at, m.manual_tier, "
                   f"m.manual_tier_until, m.crm_id, {CONSENT_BITS}, (SELECT value FROM segments_generation)")


def member_by_card(conn: sqlite3.Connection, card: str) -> MemberRow | None:
    """card: the card number's HMAC (server/privacy.py), never the number; during a key
    rotation it also carries the number's hashes under earlier keys (`older`)."""
    match, digests = card_match(card)
    row = conn.execute(f"SELECT {_MEMBER_COLUMNS} FROM cards c JOIN members m ON m.id = c.member_id "
                       f"WHERE {match} LIMIT 1", digests).fetchone()
    return MemberRow(*row) if row else None


def member_id_of_card(conn: sqlite3.Connection, card: str) -> int | None:
    """The id of the member a card (its HMAC, with its older ones) belongs to, None when none does."""
    match, digests = card_match(card)
    row = conn.execute(f"SELECT c.member_id FROM cards c WHERE {match} LIMIT 1", digests).fetchone()
    return row[0] if row else None


def card_match(card: str) -> tuple[str, tuple[str, ...]]:
    """The condition on `c.card` that finds a card under any of its hashes (the key in force
    and, during a rotation, the `older` ones), and its parameters. One statement for all of
    them: on PostgreSQL each statement reads its own snapshot, so a rotation that wraps the
    card between a look-up for the new hash and one for the old would find it under neither.
    A card is stored under one hash at a time, so at most one row matches."""
    digests = (card, *getattr(card, "older", ()))
    if len(digests) == 1:
        return "c.card = ?", digests
    return f"c.card IN ({', '.join('?' * len(digests))})", digests


def lock_member(conn, member_id: int) -> bool:
    """Before a write reads the member's points to change them. SQLite's one writer runs
    writes one after another already; on PostgreSQL the member's row lock makes writes of
    one member, in any process, wait for each other. Whether it locked (and may have
    waited: what was read before it may have changed meanwhile)."""
    if not is_postgresql(conn):
        return False
    conn.execute("SELECT 1 FROM members WHERE id = ? FOR UPDATE", (member_id,))
    _held(conn, [member_id])
    return True


def lock_members(conn, member_ids) -> bool:
    """lock_member for several members, in the order of their ids (as merges and the
    postings take them), so two writers locking some of the same members never deadlock.
    Whether it locked any (and may have waited)."""
    ids = sorted(set(member_ids))
    if not ids or not is_postgresql(conn):
        return False
    marks = ", ".join("?" * len(ids))
    conn.execute(f"SELECT 1 FROM members WHERE id IN ({marks}) ORDER BY id FOR UPDATE", ids)
    _held(conn, ids)
    return True


def lock_members_after(conn, member_ids) -> bool:
    """lock_members for members a write needs once it holds other members' locks (a
    take-back's member, a referee, an erased member) and could not know before. Those above
    every lock it holds are waited for, in order, as lock_members waits. One below is taken
    only if no one holds it: a writer holding it may be waiting, in id order, for a lock
    held here. When one is held, LockFirst: the write runs again from its start with those
    locked first (storage/pg/connection.py). Whether it locked any (and may have waited)."""
    if not is_postgresql(conn):
        return False
    held = conn.members_locked or set()
    ids = sorted(set(member_ids) - held)
    if not ids:
        return False
    top = max(held, default=0)
    below = [m for m in ids if m < top]
    if below:
        marks = ", ".join("?" * len(below))
        got = {r[0] for r in conn.execute(f"SELECT id FROM members WHERE id IN ({marks}) ORDER BY id "
                                          "FOR UPDATE SKIP LOCKED", below)}
        if missing := [m for m in below if m not in got]:
            raise LockFirst(missing)
        _held(conn, below)
    return lock_members(conn, [m for m in ids if m > top]) or bool(below)


def _held(conn, member_ids) -> None:
    """Notes locks taken inside storage.pg.connection's transaction(), for lock_members_after."""
    if conn.members_locked is not None:
        conn.members_locked.update(member_ids)


def lock_receipt(conn, key: ReceiptKey, member_ids: list[int]) -> bool:
    """Before a return or a cancel reads what is left of a confirmed receipt: on PostgreSQL
    its member's lock (with the lock of the member holding its points, when it was merged
    away: storage.member_care.lock_receipt), then the receipt's row, so that the returns and
    the cancel of one receipt, in any process and with or without a card, run one after
    another, each seeing what the one before wrote. Whether it locked (what was read before
    it may have changed meanwhile)."""
    if not is_postgresql(conn):
        return False
    lock_members(conn, member_ids)
    conn.execute("SELECT 1 FROM receipts WHERE store_id = ? AND register_id = ? AND receipt_id = ? FOR UPDATE", key)
    return True


def lock_member_of_card(conn, card: str) -> int | None:
    """lock_member for the member a card (its HMAC, and its older ones) belongs to, if any;
    the id of the member locked (None: none was, and always on SQLite). A card enrolled or
    given to a member by a replacement that commits right after this finds no one here but
    is found by the next statement: the caller then locks the member it read and reads again."""
    if is_postgresql(conn):
        from storage.pg import ledger as pg
        locked = pg.lock_member_by_card(conn, card)
        if locked is not None:
            _held(conn, [locked])
        return locked
    return None


def member_by_id(conn: sqlite3.Connection, member_id: int) -> MemberRow:
    return MemberRow(*conn.execute(f"SELECT {_MEMBER_COLUMNS} FROM members m WHERE m.id = ?",
                                   (member_id,)).fetchone())


def member_cards(conn: sqlite3.Connection, member_id: int) -> list[str]:
    """The last four digits of the member's cards."""
    return [r[0] for r in conn.execute("SELECT card_last4 FROM cards WHERE member_id = ? "
                                       "ORDER BY created_at, card", (member_id,))]


def insert_member(conn: sqlite3.Connection, *, card: str, card_last4: str, phone_hmac: str | None,
                  phone_last4: str | None, birthday: str | None, tags: str, referred_by: int | None,
                  store_id: str | None, now: str) -> int:
    """card and phone_hmac are HMACs (server/privacy.py); the numbers themselves are never stored."""
    member_id = conn.execute("INSERT INTO members (phone_hmac, phone_last4, birthday, tags, referred_by, "
                             "enrolled_at, enrolled_store, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                             (phone_hmac, phone_last4, birthday, tags, referred_by, now, store_id, now)).fetchone()[0]
    conn.execute("INSERT INTO cards (card, card_last4, member_id, created_at) VALUES (?, ?, ?, ?)",
                 (card, card_last4, member_id, now))
    return member_id


def update_member(conn: sqlite3.Connection, member_id: int, changes: dict, now: str) -> None:
    allowed = {"phone_hmac", "phone_last4", "birthday", "tags", "manual_tier", "manual_tier_until"}
    assert set(changes) <= allowed, changes
    if not changes:
        return
    sets = ", ".join(f"{k} = ?" for k in changes)
    conn.execute(f"UPDATE members SET {sets}, updated_at = ? WHERE id = ?", (*changes.values(), now, member_id))


def manual_tiers_outside(conn: sqlite3.Connection, levels: list[str], today: str) -> dict[str, int]:
    """Members per manual tier, still valid on `today`, that is not one of `levels`. Reads
    members_manual_tier: only the members with a manual tier, however many members there are."""
    marks = ", ".join("?" * len(levels))
    # SQLite's planner would otherwise scan members; PostgreSQL's picks the partial index itself.
    index = "" if is_postgresql(conn) else " INDEXED BY members_manual_tier"
    return dict(conn.execute(
        f"SELECT manual_tier, COUNT(*) FROM members{index} WHERE manual_tier IS NOT NULL "
        f"AND manual_tier NOT IN ({marks}) AND manual_tier_until >= ? GROUP BY manual_tier", (*levels, today)))


def fire_event_once(conn: sqlite3.Connection, member_id: int, event_id: str, occasion: str, now: str) -> bool:
    """True when this occasion had not fired yet for the member (and records it)."""
    cur = conn.execute("INSERT INTO event_fires (member_id, event_id, occasion, created_at) "
                       "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING", (member_id, event_id, occasion, now))
    return cur.rowcount == 1


# ---------------------------------------------------------------- lots and balances

@dataclass(slots=True)
class Lot:
    id: int
    available_from: str
    expires_on: str | None
    remaining: int

    def state_on(self, day: str) -> str:
        if self.expires_on is not None and self.expires_on <= day:
            return "expired"
        return "available" if self.available_from <= day else "pending"


def lots_of(conn: sqlite3.Connection, member_id: int, as_of: str | None = None) -> list[Lot]:
    """The member's lots with points left, as of a moment (postings after it ignored)."""
    if as_of is None:
        return [Lot(*r) for r in conn.execute("SELECT id, available_from, expires_on, remaining FROM lots "
                                              "WHERE member_id = ? AND remaining != 0 ORDER BY id", (member_id,))]
    # The past is recomputed from the member's postings (lots.remaining is only the present).
    return [Lot(*r) for r in conn.execute(
        "SELECT l.id, l.available_from, l.expires_on, SUM(p.points) FROM postings p "
        f"JOIN lots l ON l.id = p.lot_id WHERE p.member_id = ? AND {_MOVED_AT} <= ? "
        "GROUP BY l.id HAVING SUM(p.points) != 0 ORDER BY l.id", (member_id, as_of))]


# When a posting counts in a balance at a past moment. A receipt's postings are effective at
# its ts, which is right for what it earned (a late receipt's points are dated by the
# purchase, rules.md), but a redemption spends, and a repayment moves, points the member
# had when the receipt arrived (rules.md: "redemption spends what is available at
# arrival"): dated at a late receipt's ts they would spend points credited only between its
# ts and its arrival, and a balance between the two would show a debt the member never had.
# They count from when they were written; the stored effective_at stays as it is.
_MOVED_AT = ("CASE WHEN p.kind IN ('redemption', 'repayment') AND p.created_at > p.effective_at "
             "THEN p.created_at ELSE p.effective_at END")


class LotTotals(NamedTuple):
    """A member's lots summed on a day as balance_of counts them, without a row per lot: a
    regular customer holds a lot per shopping day, and reading each one cost a receipt more
    than the rest of its member's state. Enough for a receipt that neither redeems nor
    repays a debt (`debts` says whether one must be repaid: then the lots are read)."""
    available: int      # available on the day, debts (below zero) counted against it
    pending: int        # not yet available on the day
    debts: int          # how many lots are below zero


# SUM ... FILTER: one pass over the member's live lots (lots_live covers every column read).
_LOT_TOTALS_SQL = (
    "SELECT COALESCE(SUM(remaining) FILTER (WHERE remaining < 0 OR available_from <= ?), 0), "
    "COALESCE(SUM(remaining) FILTER (WHERE remaining > 0 AND available_from > ?), 0), "
    "COUNT(*) FILTER (WHERE remaining < 0) FROM lots WHERE member_id = ? AND remaining != 0 "
    "AND (remaining < 0 OR expires_on IS NULL OR expires_on > ?)")


def lot_totals(conn: sqlite3.Connection, member_id: int, day: str) -> LotTotals:
    """balance_of(lots_of(member), [], day)'s available and pending, and the debts' count."""
    available, pending, debts = conn.execute(_LOT_TOTALS_SQL, (day, day, member_id, day)).fetchone()
    return LotTotals(int(available), int(pending), int(debts))     # PostgreSQL sums bigints as numeric


@dataclass
class Hold:
    key: ReceiptKey
    points: int
    expires_at: str


def open_holds(conn: sqlite3.Connection, member_id: int, moment: str, live_only: bool = True) -> list[Hold]:
    """Holds that reserve points at `moment`: live_only, the ones open now (whenever they
    were stamped: servers sharing a database each stamp with their own clock, and a hold
    another one put a moment ago may carry a time a little after this one's `moment`);
    otherwise the ones that were open at that past moment."""
    if live_only:
        rows = conn.execute("SELECT store_id, register_id, receipt_id, points, expires_at FROM holds "
                            "WHERE member_id = ? AND status = 'open' AND expires_at > ?", (member_id, moment))
    else:
        rows = conn.execute(
            "SELECT store_id, register_id, receipt_id, points, expires_at FROM holds WHERE member_id = ? "
            "AND created_at <= ? AND expires_at > ? AND (closed_at IS NULL OR closed_at > ?)",
            (member_id, moment, moment, moment))
    return [Hold((r[0], r[1], r[2]), r[3], r[4]) for r in rows]


@dataclass
class Balance:
    available: int = 0          # spendable now, holds excluded
    pending: int = 0
    held: int = 0
    expiring: list[tuple[str, int]] = field(default_factory=list)
    owed: int = 0               # points the member owes (returns of points already spent)

    def as_json(self) -> dict:
        return {"available": self.available, "pending": self.pending, "held": self.held}


def balance_of(lots: list[Lot], holds: list[Hold], day: str) -> Balance:
    """The balance on `day` of lots in any order. Each lot's state is read inline, not
    through Lot.state_on: every receipt counts its member's every lot for its answer."""
    available = pending = owed = 0
    by_date: dict[str, int] = {}
    for lot in lots:
        remaining = lot.remaining
        if remaining < 0:
            # A debt (a return of points already spent) is owed until repaid: it neither
            # waits for activation nor expires.
            owed -= remaining
            available += remaining
            continue
        expires = lot.expires_on
        if expires is not None and expires <= day:
            continue
        if lot.available_from <= day:
            available += remaining
        else:
            pending += remaining
        if expires and remaining:
            by_date[expires] = by_date.get(expires, 0) + remaining
    available, held = after_holds(available, holds)
    return Balance(available, pending, held, sorted(by_date.items()), owed)


def after_holds(available: int, holds: list[Hold]) -> tuple[int, int]:
    """(available, held) once the open holds reserve their points out of `available` (the
    points spendable now, a debt counted against them). A hold reserves points that are
    there: when they expire under it, or a return takes them back, it holds what is left,
    and only a debt takes `available` below zero."""
    held = min(sum([h.points for h in holds]), max(available, 0))
    return available - held, held


def lot_dates(available_from: date | str, expires_on: date | str | None) -> tuple[str, str | None]:
    """A lot's dates as they are stored."""
    return day_text(available_from), None if expires_on is None else day_text(expires_on)


def new_lot(conn: sqlite3.Connection, member_id: int, available_from: date | str,
            expires_on: date | str | None, points: int) -> int:
    """A lot already counting the `points` its first posting (next, same transaction) brings."""
    return conn.execute("INSERT INTO lots (member_id, available_from, expires_on, remaining) VALUES (?, ?, ?, ?) "
                        "RETURNING id", (member_id, *lot_dates(available_from, expires_on), points)).fetchone()[0]


@dataclass
class PostingRef:
    """Who and what a posting belongs to; shared by all postings of one request."""
    effective_at: str
    created_at: str
    rules_version: str | None = None
    receipt: ReceiptKey | None = None
    ref: str | None = None
    key_id: str | None = None
    note: str | None = None
    # The last posting written with this ref and conn.total_changes right after it: while
    # nothing else changed on the connection since, it is still the chain's head and need
    # not be read back. A ref lives inside one write function, so never across transactions.
    _head: tuple | None = field(default=None, init=False, repr=False, compare=False)


GENESIS_HASH = bytes(32)
_HASHED = msgspec.json.Encoder()


def posting_hash(prev_hash: bytes, row: tuple) -> bytes:
    """SHA-256 over the previous posting's hash (as hex text) and this posting's fields,
    including the dates of its lot, so editing a posting or a lot's dates breaks the chain
    from there. Stored as the 32 raw bytes; hashed as hex text because the chain was
    defined that way before hashes were stored as bytes (m013), and it must not break."""
    return hashlib.sha256(prev_hash.hex().encode() + _HASHED.encode(row)).digest()


# The order of fields in the hashed row; storage/audit.py recomputes it from the tables.
HASHED_SELECT = ("p.id, p.member_id, p.lot_id, l.available_from, l.expires_on, p.kind, p.points, "
                 "p.counter_account, p.effective_at, p.created_at, p.rule_id, p.rules_version, p.store_id, "
                 "p.register_id, p.receipt_id, p.ref, p.key_id, p.note")


def post(conn: sqlite3.Connection, member_id: int, lot_id: int, kind: str, points: int, counter: str,
         at: PostingRef, rule_id: str | None = None, lot_dates: tuple[str, str | None] | None = None,
         counted: bool = False) -> None:
    """Append one transfer of `points` from `counter` to the member (negative: the other way).
    `lot_dates`, when the caller knows them, saves reading them back; `counted`: the lot was
    just created with these points counted in its remaining (new_lot)."""
    if is_postgresql(conn):     # the member's own chain
        from storage.pg import ledger as pg
        return pg.post(conn, member_id, lot_id, kind, points, counter, at, rule_id, lot_dates, counted)
    store, register, receipt = at.receipt or (None, None, None)
    if at._head is not None and at._head[2] == conn.total_changes:
        last = at._head
    else:
        last = conn.execute("SELECT id, hash FROM postings ORDER BY id DESC LIMIT 1").fetchone()
    posting_id, prev = (last[0] + 1, last[1]) if last else (1, GENESIS_HASH)
    available_from, expires_on = lot_dates or conn.execute(
        "SELECT available_from, expires_on FROM lots WHERE id = ?", (lot_id,)).fetchone()
    row = (posting_id, member_id, lot_id, available_from, expires_on, kind, points, counter, at.effective_at,
           at.created_at, rule_id, at.rules_version, store, register, receipt, at.ref, at.key_id, at.note)
    digest = posting_hash(prev, row)
    conn.execute("INSERT INTO postings (id, member_id, lot_id, kind, points, counter_account, effective_at, "
                 "created_at, rule_id, rules_version, store_id, register_id, receipt_id, ref, key_id, note, hash) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 (posting_id, member_id, lot_id, kind, points, counter, at.effective_at, at.created_at, rule_id,
                  at.rules_version, store, register, receipt, at.ref, at.key_id, at.note, digest))
    if not counted:
        conn.execute("UPDATE lots SET remaining = remaining + ? WHERE id = ?", (points, lot_id))
    if rule_id is not None and kind == "reversal":
        add_rule_totals(conn, {rule_id: points})
    at._head = (posting_id, digest, conn.total_changes)


class NewPosting(NamedTuple):
    """One posting for append_postings: its lot's dates are given, not read back."""
    member_id: int
    lot_id: int
    lot_dates: tuple[str, str | None]
    kind: str
    points: int
    counter: str
    effective_at: str
    created_at: str
    rule_id: str | None
    rules_version: str | None
    receipt: ReceiptKey | None
    ref: str | None
    counted: bool       # already counted in its lot's remaining (a new lot's first points)
    rules: tuple[tuple[str, int], ...] = ()     # an accrual's points by rule, for posting_rules


def append_postings(conn: sqlite3.Connection, postings: list[NewPosting]) -> None:
    """Appends postings in order, chained from the last one: one INSERT for all of them,
    one for their accruals' split by rule, one UPDATE of lots.remaining for those not
    already counted, and one upsert of rule_totals."""
    if not postings:
        return
    if is_postgresql(conn):     # each member's own chain
        from storage.pg import ledger as pg
        return pg.append_postings(conn, postings)
    last = conn.execute("SELECT id, hash FROM postings ORDER BY id DESC LIMIT 1").fetchone()
    posting_id, prev = last if last else (0, GENESIS_HASH)
    rows, counts, split, by_rule = [], [], [], {}
    for p in postings:
        posting_id += 1
        store, register, receipt = p.receipt or (None, None, None)
        prev = posting_hash(prev, (posting_id, p.member_id, p.lot_id, *p.lot_dates, p.kind, p.points, p.counter,
                                   p.effective_at, p.created_at, p.rule_id, p.rules_version, store, register,
                                   receipt, p.ref, None, None))
        rows.append((posting_id, p.member_id, p.lot_id, p.kind, p.points, p.counter, p.effective_at, p.created_at,
                     p.rule_id, p.rules_version, store, register, receipt, p.ref, prev))
        if not p.counted:
            counts.append((p.points, p.lot_id))
        for rule, points in p.rules:
            split.append((posting_id, rule, points))
            by_rule[rule] = by_rule.get(rule, 0) + points
        if p.rule_id is not None and p.kind == "reversal":
            by_rule[p.rule_id] = by_rule.get(p.rule_id, 0) + p.points
    conn.executemany("INSERT INTO postings (id, member_id, lot_id, kind, points, counter_account, effective_at, "
                     "created_at, rule_id, rules_version, store_id, register_id, receipt_id, ref, hash) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    if split:
        conn.executemany("INSERT INTO posting_rules (posting_id, rule_id, points) VALUES (?, ?, ?)", split)
    if counts:
        conn.executemany("UPDATE lots SET remaining = remaining + ? WHERE id = ?", counts)
    add_rule_totals(conn, by_rule)


def add_rule_totals(conn: sqlite3.Connection, by_rule: dict[str, int]) -> None:
    """What each rule issued (accruals by their split, reversals) added to rule_totals, in
    the postings' transaction. Done here, once per call, by the only two functions that
    write postings (m032): a trigger per row cost the confirm path a statement per split row."""
    if by_rule:
        conn.executemany("INSERT INTO rule_totals (rule_id, points) VALUES (?, ?) "
                         "ON CONFLICT (rule_id) DO UPDATE SET points = points + excluded.points", by_rule.items())


def new_lots(conn: sqlite3.Connection, lots: list[tuple[int, str, str | None, int]]) -> list[int]:
    """(member_id, available_from, expires_on, points) each: lots already counting the points
    their first postings bring, written with one INSERT; returns their ids. The ids follow
    the highest one, as SQLite would give them: only the one writer adds lots."""
    if not lots:
        return []
    if is_postgresql(conn):     # several writers: the ids come from the identity column
        from storage.pg import ledger as pg
        return pg.new_lots(conn, lots)
    first = conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM lots").fetchone()[0]
    conn.executemany("INSERT INTO lots (id, member_id, available_from, expires_on, remaining) VALUES (?, ?, ?, ?, ?)",
                     [(first + i, *lot) for i, lot in enumerate(lots)])
    return list(range(first, first + len(lots)))


def lot_facts(conn: sqlite3.Connection, lot_ids) -> dict[int, tuple[str | None, int]]:
    """(expires_on, points its expiry postings took so far) of each lot."""
    ids = sorted(set(lot_ids))
    if not ids:
        return {}
    marks = ", ".join("?" * len(ids))
    return {r[0]: (r[1], r[2]) for r in conn.execute(
        "SELECT l.id, l.expires_on, -COALESCE((SELECT SUM(points) FROM postings p WHERE p.lot_id = l.id "
        f"AND p.kind = 'expiry'), 0) FROM lots l WHERE l.id IN ({marks})", ids)}


def spend(conn: sqlite3.Connection, member_id: int, points: int, day: str, kind: str, counter: str,
          at: PostingRef, reserved_by_others: int = 0) -> list[tuple[int, int]]:
    """Debit available lots, soonest expiry first; returns (lot_id, points) drawn.

    Re-reads the lots inside the write transaction, so a balance that changed since the
    caller looked can never be overspent."""
    drawn = draw(lots_of(conn, member_id), points, day, reserved_by_others)
    for lot_id, take in drawn:
        post(conn, member_id, lot_id, kind, -take, counter, at)
    return drawn


def draw(lots: list[Lot], points: int, day: str, reserved_by_others: int = 0) -> list[tuple[int, int]]:
    """(lot_id, points) to debit from the available lots, soonest expiry first. Raises
    InsufficientPoints when they do not cover `points` beside what others hold."""
    usable = [lot for lot in lots if lot.remaining < 0 or lot.state_on(day) == "available"]
    spendable = sum(lot.remaining for lot in usable) - reserved_by_others
    if points > spendable:
        raise InsufficientPoints(points, max(spendable, 0))
    usable.sort(key=lambda lot: (lot.expires_on is None, lot.expires_on or "", lot.available_from, lot.id))
    drawn, left = [], points
    for lot in usable:
        if left == 0:
            break
        take = min(lot.remaining, left)
        if take > 0:
            drawn.append((lot.id, take))
            left -= take
    return drawn


def credit(conn: sqlite3.Connection, member_id: int, points: int, available_from: date | str,
           expires_on: date | str | None, kind: str, counter: str, at: PostingRef,
           rule_id: str | None = None) -> int:
    lot_id = new_lot(conn, member_id, available_from, expires_on, points)
    post(conn, member_id, lot_id, kind, points, counter, at, rule_id, lot_dates(available_from, expires_on),
         counted=True)
    repay_debts(conn, member_id, lot_id, at)
    return lot_id


def repay_debts(conn: sqlite3.Connection, member_id: int, lot_id: int, at: PostingRef) -> int:
    """New points first pay back what the member owes (a return of points already spent
    leaves a lot below zero): a transfer from the new lot to the one in debt."""
    # `remaining != 0` lets SQLite use lots_live (it does not infer it from `< 0`).
    debts = conn.execute("SELECT id, remaining FROM lots WHERE member_id = ? AND remaining != 0 AND remaining < 0 "
                         "ORDER BY id", (member_id,)).fetchall()
    if not debts:
        return 0
    left = conn.execute("SELECT remaining FROM lots WHERE id = ?", (lot_id,)).fetchone()[0]
    repaid = 0
    for debt_lot, owed in debts:
        take = min(left, -owed)
        if take <= 0:
            break
        post(conn, member_id, lot_id, "repayment", -take, member_account(member_id), at)
        post(conn, member_id, debt_lot, "repayment", take, member_account(member_id), at)
        left -= take
        repaid += take
    return repaid


# ---------------------------------------------------------------- holds

def put_hold(conn: sqlite3.Connection, key: ReceiptKey, member_id: int, points: int, now: str,
             expires_at: str) -> None:
    conn.execute("INSERT INTO holds (store_id, register_id, receipt_id, member_id, points, created_at, expires_at, "
                 "status) VALUES (?, ?, ?, ?, ?, ?, ?, 'open') ON CONFLICT (store_id, register_id, receipt_id) "
                 "DO UPDATE SET member_id = excluded.member_id, points = excluded.points, "
                 "created_at = excluded.created_at, expires_at = excluded.expires_at, status = 'open', "
                 "closed_at = NULL", (*key, member_id, points, now, expires_at))


def hold_member(conn: sqlite3.Connection, key: ReceiptKey, open_only: bool = False) -> int | None:
    row = conn.execute("SELECT member_id FROM holds WHERE store_id = ? AND register_id = ? AND receipt_id = ?"
                       + (" AND status = 'open'" if open_only else ""), key).fetchone()
    return row[0] if row else None


def close_hold(conn: sqlite3.Connection, key: ReceiptKey, status: str, now: str) -> int:
    """Closes an open hold; returns the points it held (0 when there was none)."""
    row = conn.execute("SELECT points FROM holds WHERE store_id = ? AND register_id = ? AND receipt_id = ? "
                       "AND status = 'open' AND expires_at > ?", (*key, now)).fetchone()
    conn.execute("UPDATE holds SET status = ?, closed_at = ? WHERE store_id = ? AND register_id = ? "
                 "AND receipt_id = ? AND status = 'open'", (status, now, *key))
    return row[0] if row else 0


# ---------------------------------------------------------------- receipts

@dataclass
class StoredReceipt:
    key: ReceiptKey
    body_sha256: str
    member_id: int | None
    status: str
    result: bytes
    local_date: str


def get_receipt(conn: sqlite3.Connection, key: ReceiptKey) -> StoredReceipt | None:
    row = conn.execute("SELECT body_sha256, member_id, status, result, local_date FROM receipts "
                       "WHERE store_id = ? AND register_id = ? AND receipt_id = ?", key).fetchone()
    if row is None:
        return None
    return StoredReceipt(key, digest_hex(row[0]), row[1], row[2], unpack(row[3]), row[4])


def receipt_line_records(conn: sqlite3.Connection, key: ReceiptKey) -> dict[int, line_records.LineRecord]:
    """What the receipt sold, earned and spent per line, by line number (m023)."""
    row = conn.execute("SELECT lines FROM receipts WHERE store_id = ? AND register_id = ? AND receipt_id = ?",
                       key).fetchone()
    return line_records.decode(row[0])


def receipt_row(key: ReceiptKey, *, body_sha256: bytes, member_id: int | None, ts: str, local_date: str,
                total: int, rules_version: str, body: bytes, result: bytes, lines: bytes, member_facts: bytes | None,
                takes: bytes | None, now: str) -> tuple:
    """body and result as JSON; lines: the encoded line records (storage/line_records.py);
    member_facts: the encoded member facts (storage/member_facts.py), None for an anonymous receipt;
    takes: what it took of coupon codes and offer budgets (storage/receipt_takes.py), None for nothing.
    The body is stored packed: it is most of the bytes (2.7 KB of JSON typically, 0.8 KB
    packed) and is read back only by exports; the answer (1.1 KB, read back on every
    retry) is not worth another ~15 us of zlib per receipt."""
    return (*key, body_sha256, member_id, ts, local_date, total, rules_version, pack(body), result, lines,
            member_facts, takes, now)


def insert_receipts(conn: sqlite3.Connection, rows: list[tuple]) -> None:
    """Rows made by receipt_row, with one INSERT."""
    conn.executemany("INSERT INTO receipts (store_id, register_id, receipt_id, body_sha256, member_id, ts, "
                     "local_date, total, rules_version, status, body, result, lines, member_facts, takes, created_at) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'confirmed', ?, ?, ?, ?, ?, ?)", rows)


def close_holds(conn: sqlite3.Connection, holds: list[tuple[str, ReceiptKey]], status: str) -> None:
    """close_hold for many (closed_at, key) whose points nobody needs back, with one UPDATE."""
    conn.executemany("UPDATE holds SET status = ?, closed_at = ? WHERE store_id = ? AND register_id = ? "
                     "AND receipt_id = ? AND status = 'open'", [(status, now, *key) for now, key in holds])


# Stored receipt bodies are JSON (starting with `{`), or a zstd frame of it when that is
# smaller; rows written before used zlib streams, which readers still take. zstd level 1
# packs a 2.6 KB body to ~700 bytes in ~12 us, where zlib at level 1 with a 4 KiB window
# took ~50 us for ~770 bytes, measured side by side on the benchmark's receipts. Answers
# (~1 KB, read back on every retry) are stored as they are: ~9 us to save ~600 bytes.
PACK_LEVEL = 1
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# A compressor keeps its state between calls (making one costs ~28 us) but must not be
# shared between threads: write functions run on the loop or on the writer thread.
_zstd = threading.local()


def pack(data: bytes) -> bytes:
    packer = getattr(_zstd, "compressor", None)
    if packer is None:
        packer = _zstd.compressor = zstandard.ZstdCompressor(level=PACK_LEVEL)
    packed = packer.compress(data)
    return packed if len(packed) < len(data) else data


def is_zlib(data: bytes) -> bool:
    """A zlib header (RFC 1950: method 8, header a multiple of 31), whatever the window
    size; JSON's `{` is never one."""
    return len(data) >= 2 and data[0] & 0x0F == 8 and ((data[0] << 8) | data[1]) % 31 == 0


def unpack(data: bytes) -> bytes:
    if data[:4] == ZSTD_MAGIC:
        unpacker = getattr(_zstd, "decompressor", None)
        if unpacker is None:
            unpacker = _zstd.decompressor = zstandard.ZstdDecompressor()
        return unpacker.decompress(data)
    return zlib.decompress(data) if is_zlib(data) else data


def digest_hex(digest: bytes | str) -> str:
    """Receipt fingerprints are stored as 32 bytes (m013); compared as hex."""
    return digest.hex() if isinstance(digest, bytes) else digest


def mark_cancelled(conn: sqlite3.Connection, key: ReceiptKey) -> None:
    conn.execute("UPDATE receipts SET status = 'cancelled' WHERE store_id = ? AND register_id = ? "
                 "AND receipt_id = ?", key)
    conn.execute("DELETE FROM rule_fires WHERE store_id = ? AND register_id = ? AND receipt_id = ?", key)


def record_fires(conn: sqlite3.Connection, fires: list[tuple]) -> None:
    """Uses of limited rules: (member_id, rule_id, local_date, *receipt key) each."""
    conn.executemany("INSERT INTO rule_fires (member_id, rule_id, local_date, store_id, register_id, receipt_id) "
                     "VALUES (?, ?, ?, ?, ?, ?)", fires)


def rule_usage(conn: sqlite3.Connection, member_id: int, windows: dict[str, tuple[date, date]]) -> dict[str, int]:
    """How often each limited rule fired for the member within its window. One query for
    all rules: a program with 30 limited rules asked 30 times per receipt before."""
    if not windows:
        return {}
    bounds = {rule_id: (str(first), str(last)) for rule_id, (first, last) in windows.items()}
    usage = dict.fromkeys(windows, 0)
    rows = conn.execute("SELECT rule_id, local_date FROM rule_fires WHERE member_id = ? AND local_date >= ?",
                        (member_id, min(first for first, _ in bounds.values())))
    for rule_id, day in rows:
        window = bounds.get(rule_id)
        if window is not None and window[0] <= day <= window[1]:
            usage[rule_id] += 1
    return usage


def rule_totals(conn: sqlite3.Connection, rule_ids: list[str]) -> dict[str, int]:
    """Points each rule has issued net of returns, as kept by add_rule_totals: a rule that
    never posted has no row and has issued 0."""
    marks = ", ".join("?" * len(rule_ids))
    if is_postgresql(conn):
        # A budget is shared by every member: a receipt reads what is left, and issues from
        # it, holding the rule's lock until it commits, so processes never overspend it.
        # SQLite's one writer reads it in the order of the writes already.
        conn.executemany("SELECT pg_advisory_xact_lock(?, hashtext(?))",
                         [(BUDGET_LOCK_CLASS, rule) for rule in sorted(rule_ids)])
    # Summed: PostgreSQL keeps a rule's total in shards (storage/pg/schema.py), SQLite in one row.
    kept = dict(conn.execute(f"SELECT rule_id, SUM(points) FROM rule_totals WHERE rule_id IN ({marks}) "
                             "GROUP BY rule_id", rule_ids))
    return {r: kept.get(r, 0) for r in rule_ids}


# The member's returned lines with their receipts' ts. Starts from the member's returns
# (returns_member; most members have none), not from their receipts: that would read each
# receipt's row, bodies and all, for its key.
_RETURNED_OF_MEMBER = (
    "FROM returns rt "
    "JOIN receipts r ON r.store_id = rt.receipt_store AND r.register_id = rt.receipt_register "
    "AND r.receipt_id = rt.receipt_id "
    "JOIN return_lines rl ON rl.receipt_store = rt.receipt_store AND rl.receipt_register = rt.receipt_register "
    "AND rl.receipt_id = rt.receipt_id AND rl.return_store = rt.store_id AND rl.return_register = rt.register_id "
    "AND rl.return_id = rt.return_id "
    "WHERE rt.member_id = ? AND r.status = 'confirmed'")


def receipt_counts(conn: sqlite3.Connection, member_id: int, since: str, until: str | None = None,
                   until_inclusive: bool = True) -> tuple[int, int, int]:
    """(confirmed receipts ever, confirmed receipts with a ts in the window, their net spend).
    The window is the ts after `since` up to `until` (None: everything recorded, receipts
    stamped a little in the future included); a receipt's own tier leaves `until` (its ts)
    out. "Ever" ignores the window: receipts count in the order they arrived, so one that
    arrives late after others is not a first purchase. Spend is net of every return stored
    so far."""
    until = until or "9999"
    upper = "<=" if until_inclusive else "<"
    # One pass over the member's entries in receipts_member_counts answers both.
    ever, count, spend_ = conn.execute(
        f"SELECT COUNT(*), COALESCE(SUM(CASE WHEN ts > ? AND ts {upper} ? THEN 1 ELSE 0 END), 0), "
        f"COALESCE(SUM(CASE WHEN ts > ? AND ts {upper} ? THEN total END), 0) "
        "FROM receipts WHERE member_id = ? AND status = 'confirmed'",
        (since, until, since, until, member_id)).fetchone()
    returned = conn.execute(
        f"SELECT COALESCE(SUM(rl.amount), 0) {_RETURNED_OF_MEMBER} AND r.ts > ? AND r.ts {upper} ?",
        (member_id, since, until)).fetchone()[0]
    return ever, count, spend_ - returned


def tier_counts(conn: sqlite3.Connection, member_id: int, since: str, until: str,
                since_now: str) -> tuple[int, int, int, int, int]:
    """receipt_counts of a receipt's own tier (after `since`, before its ts `until`) and, in
    the same two statements, the confirmed receipts and net spend after `since_now` with no
    end: what the member's tier at arrival counts, before this receipt is stored. A confirm
    reads both at once, so the tier.changed check after it counts nothing again."""
    ever, count, spend_, count_now, spend_now = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(CASE WHEN ts > ? AND ts < ? THEN 1 ELSE 0 END), 0), "
        "COALESCE(SUM(CASE WHEN ts > ? AND ts < ? THEN total END), 0), "
        "COALESCE(SUM(CASE WHEN ts > ? THEN 1 ELSE 0 END), 0), "
        "COALESCE(SUM(CASE WHEN ts > ? THEN total END), 0) "
        "FROM receipts WHERE member_id = ? AND status = 'confirmed'",
        (since, until, since, until, since_now, since_now, member_id)).fetchone()
    returned, returned_now = conn.execute(
        "SELECT COALESCE(SUM(CASE WHEN r.ts > ? AND r.ts < ? THEN rl.amount END), 0), "
        f"COALESCE(SUM(CASE WHEN r.ts > ? THEN rl.amount END), 0) {_RETURNED_OF_MEMBER} AND r.ts > ?",
        (since, until, since_now, member_id, min(since, since_now))).fetchone()
    return ever, count, spend_ - returned, count_now, spend_now - returned_now


def receipts_confirmed_before(conn: sqlite3.Connection, member_id: int, key: ReceiptKey) -> int | None:
    """How many of the member's confirmed receipts arrived before the stored receipt `key`
    (None when it is not stored): its receipt_number less one."""
    order = arrival(conn)
    row = conn.execute(f"SELECT {order} FROM receipts WHERE store_id = ? AND register_id = ? AND receipt_id = ?",
                       key).fetchone()
    if row is None:
        return None
    return conn.execute(f"SELECT COUNT(*) FROM receipts WHERE member_id = ? AND status = 'confirmed' AND {order} < ?",
                        (member_id, row[0])).fetchone()[0]


# A posting by rule: an accrual as its posting_rules split (one row per rule and lot, for
# receipts of every age since m030), any other posting as it is.
BY_RULE_FROM = ("postings p LEFT JOIN posting_rules pr ON p.kind = 'accrual' AND pr.posting_id = p.id")
BY_RULE_ID = "COALESCE(pr.rule_id, p.rule_id)"
BY_RULE_POINTS = "COALESCE(pr.points, p.points)"


def receipt_postings(conn: sqlite3.Connection, key: ReceiptKey, member_id: int | None) -> list[tuple]:
    """(kind, lot_id, rule_id, counter_account, points) summed per kind, lot, rule and
    counter account, in first-posting order; accruals by rule. member_id: the receipt's
    (its receipts row's). Every posting that carries a receipt's key is its member's, and
    SQLite, which has no index by receipt since m037, finds them among the member's
    postings (postings_member). An anonymous receipt (None) posted nothing."""
    if member_id is None:
        return []
    return [r[:5] for r in conn.execute(
        f"SELECT p.kind, p.lot_id, {BY_RULE_ID} AS rule, p.counter_account, SUM({BY_RULE_POINTS}), "
        f"MIN(p.id) AS first FROM {BY_RULE_FROM} "
        "WHERE p.member_id = ? AND p.store_id = ? AND p.register_id = ? AND p.receipt_id = ? "
        "GROUP BY p.kind, p.lot_id, rule, p.counter_account ORDER BY first, rule", (member_id, *key))]


# ---------------------------------------------------------------- returns

@dataclass
class ReturnedLine:
    qty: str
    amount: int
    points_reversed: int
    points_refunded: int
    discount_refunded: int
    by_rule: bytes


def returned_lines(conn: sqlite3.Connection, key: ReceiptKey) -> dict[int, list[ReturnedLine]]:
    out: dict[int, list[ReturnedLine]] = {}
    # Returns of one receipt are written one after another under its member's lock, so on
    # PostgreSQL, whose return_lines has no row number, their time orders them.
    order = "created_at, return_store, return_register, return_id" if is_postgresql(conn) else "rowid"
    for row in conn.execute("SELECT line_no, qty, amount, points_reversed, points_refunded, discount_refunded, "
                            "by_rule FROM return_lines WHERE receipt_store = ? AND receipt_register = ? "
                            f"AND receipt_id = ? ORDER BY {order}", key):
        out.setdefault(row[0], []).append(ReturnedLine(*row[1:]))
    return out


def get_return(conn: sqlite3.Connection, key: ReceiptKey) -> tuple[str, bytes] | None:
    return conn.execute("SELECT body_sha256, result FROM returns WHERE store_id = ? AND register_id = ? "
                        "AND return_id = ?", key).fetchone()


def insert_return(conn: sqlite3.Connection, key: ReceiptKey, receipt: ReceiptKey, *, body_sha256: str,
                  member_id: int | None, result: bytes, now: str) -> None:
    conn.execute("INSERT INTO returns (store_id, register_id, return_id, body_sha256, receipt_store, "
                 "receipt_register, receipt_id, member_id, result, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 (*key, body_sha256, *receipt, member_id, result, now))


def insert_return_line(conn: sqlite3.Connection, receipt: ReceiptKey, line_no: int, ret: ReceiptKey,
                       line: ReturnedLine, now: str) -> None:
    conn.execute("INSERT INTO return_lines (receipt_store, receipt_register, receipt_id, line_no, return_store, "
                 "return_register, return_id, qty, amount, points_reversed, points_refunded, discount_refunded, "
                 "by_rule, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 (*receipt, line_no, *ret, line.qty, line.amount, line.points_reversed, line.points_refunded,
                  line.discount_refunded, line.by_rule, now))


# ---------------------------------------------------------------- adjustments

def get_adjustment(conn: sqlite3.Connection, adjustment_id: str) -> tuple[str, bytes] | None:
    return conn.execute("SELECT body_sha256, result FROM adjustments WHERE adjustment_id = ?",
                        (adjustment_id,)).fetchone()


def insert_adjustment(conn: sqlite3.Connection, adjustment_id: str, *, body_sha256: str, member_id: int,
                      points: int, reason: str, key_id: str, result: bytes, now: str) -> None:
    conn.execute("INSERT INTO adjustments (adjustment_id, body_sha256, member_id, points, reason, key_id, result, "
                 "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (adjustment_id, body_sha256, member_id, points, reason, key_id, result, now))


# ---------------------------------------------------------------- statement

def statement(conn: sqlite3.Connection, member_id: int, since: str | None, until: str | None,
              limit: int) -> list[dict]:
    """Postings newest first, each with the running balance after it."""
    limit = max(1, min(limit, STATEMENT_ROWS_MAX))
    rows = conn.execute(
        "SELECT * FROM (SELECT id, kind, points, effective_at, created_at, rule_id, rules_version, store_id, "
        "register_id, receipt_id, ref, key_id, note, lot_id, SUM(points) OVER (ORDER BY id) AS running, "
        "counter_account "
        "FROM postings WHERE member_id = ?) AS p WHERE effective_at >= ? AND effective_at < ? "
        "ORDER BY id DESC LIMIT ?", (member_id, since or "", until or "9999", limit))
    out = []
    for r in rows:
        item = {"id": r[0], "kind": r[1], "points": r[2], "at": r[3], "recorded_at": r[4], "rule": r[5],
                "rules_version": r[6], "receipt": None, "ref": r[10], "key_id": r[11], "note": r[12],
                "lot": r[13], "running_balance": r[14], "counter_account": r[15]}
        if r[9] is not None:
            item["receipt"] = {"store_id": r[7], "register_id": r[8], "receipt_id": r[9]}
        out.append(item)
    return _by_rule(conn, out)


def _by_rule(conn: sqlite3.Connection, items: list[dict]) -> list[dict]:
    """Each entry names its rule: an accrual is one posting per lot, its split by rule in
    posting_rules, so an accrual several rules earned on is listed once per rule (the same
    posting id, the rules in reverse name order as the list runs newest first, each with
    the running balance after it)."""
    ids = [item["id"] for item in items if item["kind"] == "accrual" and item["rule"] is None]
    if not ids:
        return items
    split: dict[int, list[tuple[str, int]]] = {}
    for posting_id, rule, points in conn.execute(
            f"SELECT posting_id, rule_id, points FROM posting_rules WHERE posting_id IN ({', '.join('?' * len(ids))}) "
            "ORDER BY posting_id, rule_id DESC", ids):
        split.setdefault(posting_id, []).append((rule, points))
    out: list[dict] = []
    for item in items:
        parts = split.get(item["id"]) if item["kind"] == "accrual" else None
        if not parts:
            out.append(item)
            continue
        running = item["running_balance"]
        for rule, points in parts:
            out.append(item | {"rule": rule, "points": points, "running_balance": running})
            running -= points
    return out
