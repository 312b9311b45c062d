"""Writes of `loyalty import members` and `loyalty import receipts`: members with their
opening balances, and receipts of the history before the program, in batches.

Each batch runs as one write function (storage.db.Database.write_sync) inside the single
write transaction, so what it finds already there (a card, a receipt identity) cannot be
added by the server between the look-up and the insert: a rerun skips it. On PostgreSQL a
card or receipt identity another process adds meanwhile fails the insert on its key, and
the batch runs again from its start, finding it there.

Opening balances keep the ledger's invariants as every other credit does: a lot holding
the points and one posting from the `opening` counter account (so the accounts still sum
to zero), chained by storage.ledger.posting_hash to the posting before it (on PostgreSQL,
to the member's previous posting: a new member's first).

Imported receipts are stored as confirmed receipts (so tiers, receipt numbers and any
count of a member's receipts see them) with no postings and no lots, and a row in
imported_receipts: a return or a cancel of one is refused (refuse_if_imported).
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from typing import NamedTuple

from storage import events, ledger, member_care
from storage.accounts import OPENING
from storage.ledger import CONSENT_CHANNELS, NewPosting, PostingRef, ReceiptKey
from storage.sql import WriteConflict, is_postgresql

# What an imported receipt records as the program that computed it: none did.
IMPORTED_RULES_VERSION = "imported"
# SQLite allows 32,766 host parameters per statement; look-ups go in chunks well below that.
LOOKUP_CHUNK = 500


class ImportedReceipt(Exception):
    """A return or cancel of an imported receipt: it earned and spent nothing here, so there
    is nothing to take back, and the history it counts for must not change."""

    def __init__(self, key: ReceiptKey, action: str):
        super().__init__(f"receipt {'/'.join(key)} was imported from the history before the program: "
                         f"it earned no points here and cannot be {action}")
        self.key, self.action = key, action


@dataclass
class MemberRow:
    line: int
    card: str                   # the card's HMAC
    card_last4: str
    phone_hmac: str | None
    phone_last4: str | None
    birthday: str | None
    tags: str                   # JSON list
    enrolled_at: str            # stored form (storage.ledger.iso)
    opening_points: int
    opening_expires_on: str | None
    crm_id: str | None = None
    consent: frozenset[str] | None = None     # the channels consented to; None: not given


@dataclass
class ReceiptRow:
    line: int
    key: ReceiptKey
    card: str | None            # the card's HMAC
    fingerprint: bytes
    ts: str
    local_date: str
    total: int
    body: bytes                 # JSON, card as its HMAC
    result: bytes
    # The fingerprints of the same body with the card's hashes under earlier keys: stored by a
    # run before a key rotation, they are the same receipt.
    earlier_fingerprints: tuple[bytes, ...] = ()


def _chunks(items: list, size: int = LOOKUP_CHUNK):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def known_cards(conn: sqlite3.Connection, cards: list[str]) -> dict[str, int]:
    """card HMAC -> member id, for those of `cards` that are enrolled. A card is also found
    under its hashes under earlier keys (`older`, server/privacy.py) that a key rotation has
    not wrapped yet, so a rerun during or before `privacy rotate-key` enrolls no card twice."""
    return _by_card(conn, cards, "SELECT card, member_id FROM cards WHERE card IN ({marks})")


def retired_cards(conn: sqlite3.Connection, cards: list[str]) -> dict[str, str]:
    """card HMAC -> why it was taken out of use ('merged', 'replaced'), for those of `cards`
    that were; found under earlier keys' hashes too, as known_cards finds them."""
    return _by_card(conn, cards, "SELECT card, reason FROM retired_cards WHERE card IN ({marks})")


def _by_card(conn: sqlite3.Connection, cards: list[str], select: str) -> dict:
    """card HMAC -> the second column of `select` (card, value) for the rows of `cards`."""
    found = {}
    # A card's hashes stay in one statement, for the reason storage.ledger.card_match gives.
    for chunk in _chunks(cards):
        asked = {digest: card for card in chunk for digest in (card, *getattr(card, "older", ()))}
        marks = ", ".join("?" * len(asked))
        found.update((asked[digest], value) for digest, value in conn.execute(select.format(marks=marks), list(asked)))
    return found


def insert_all(conn: sqlite3.Connection, table: str, columns: tuple[str, ...], rows: list[tuple],
               ignore: bool = False) -> None:
    """`rows` into `table` with one statement; ignore: rows whose key is taken are left out.
    SQLite runs each write function in a savepoint, and every statement inside it costs as
    much again as the pages the savepoint has changed so far (SQLite walks its sub-journal
    to end the statement): row by row, a batch of 1,000 members took ~280 ms, staged in a
    temporary table and copied in one INSERT ... SELECT ~30 ms, and the cost no longer grows
    with the database. PostgreSQL has no such cost: psycopg sends the rows in one pipeline."""
    if not rows:
        return
    names = ", ".join(columns)
    conflict = " ON CONFLICT DO NOTHING" if ignore else ""
    if is_postgresql(conn):
        conn.executemany(f"INSERT INTO {table} ({names}) VALUES ({', '.join('?' * len(columns))}){conflict}", rows)
        return
    conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS import_{table} AS SELECT {names} FROM main.{table} WHERE 0")
    conn.executemany(f"INSERT INTO temp.import_{table} ({names}) VALUES ({', '.join('?' * len(columns))})", rows)
    # WHERE true: SQLite would read ON CONFLICT after a bare FROM as a join's constraint.
    conn.execute(f"INSERT INTO main.{table} ({names}) SELECT {names} FROM temp.import_{table} WHERE true{conflict}")
    conn.execute(f"DELETE FROM temp.import_{table}")


class MembersInserted(NamedTuple):
    skipped: list[int]          # lines whose card is enrolled already, with nothing to change
    crm_id_taken: list[int]     # lines not inserted (or not updated): their crm_id is another member's
    updated: list[int] = []     # lines of enrolled cards that set their member's crm_id or consent
    retired: list[tuple[int, str]] = []     # (line, why) of cards taken out of use: 'merged' or 'replaced'


def insert_members(conn: sqlite3.Connection, rows: list[MemberRow], *, today: str, at: PostingRef,
                   profile_events: list[str], first_tier: str) -> MembersInserted:
    """Inserts the members whose card is not enrolled yet and whose crm_id no member has,
    each with its member.enrolled event (imported, at `first_tier`). Ids are the next free
    ones (_new_member_ids). A row of a card enrolled already changes nothing but its
    member's crm_id and consent when it gives other ones.

    profile_events: the program's profile_completed events. A member whose phone and birthday
    both come in completed the profile in the previous program: the events are recorded as
    fired (without points), or the next change of the profile would pay them."""
    there = known_cards(conn, [r.card for r in rows])
    updated, not_updated = _update_crm(conn, [r for r in rows if r.card in there], there, at.created_at)
    skipped = [r.line for r in rows if r.card in there and r.line not in not_updated and r.line not in updated]
    # A card merged away or replaced is not enrolled again, as the API refuses it: its
    # points and history stay with the member that took them over.
    out_of_use = retired_cards(conn, [r.card for r in rows if r.card not in there])
    retired = [(r.line, out_of_use[r.card]) for r in rows if r.card in out_of_use]
    rows = [r for r in rows if r.card not in out_of_use]
    taken = _crm_ids_taken(conn, [r.crm_id for r in rows if r.card not in there and r.crm_id is not None])
    new = [r for r in rows if r.card not in there and r.crm_id not in taken]
    refused = [r.line for r in rows if r.card not in there and r.crm_id in taken] + not_updated
    if not new:
        return MembersInserted(skipped, refused, updated, retired)
    ids = dict(zip((r.line for r in new), _new_member_ids(conn, len(new))))
    insert_all(conn, "members", ("id", "phone_hmac", "phone_last4", "birthday", "tags", "enrolled_at", "updated_at",
                                 "crm_id", *(f"consent_{c}" for c in CONSENT_CHANNELS), "consent_updated_at"),
               [(ids[r.line], r.phone_hmac, r.phone_last4, r.birthday, r.tags, r.enrolled_at, at.created_at,
                 r.crm_id, *(int(c in (r.consent or ())) for c in CONSENT_CHANNELS),
                 at.created_at if r.consent is not None else None) for r in new])
    insert_all(conn, "cards", ("card", "card_last4", "member_id", "created_at"),
               [(r.card, r.card_last4, ids[r.line], at.created_at) for r in new])
    _open_balances(conn, [r for r in new if r.opening_points], ids, today, at)
    insert_all(conn, "event_fires", ("member_id", "event_id", "occasion", "created_at"),
               [(ids[r.line], event, "profile", at.created_at) for r in new if r.phone_hmac and r.birthday
                for event in profile_events], ignore=True)
    events.members_imported(conn, list(ids.values()), first_tier, at.created_at)
    return MembersInserted(skipped, refused, updated, retired)


def _new_member_ids(conn: sqlite3.Connection, count: int) -> list[int]:
    """Ids for `count` new members. SQLite's follow the highest one: the one writer adds
    members while the transaction lasts. PostgreSQL's come from the identity column's
    sequence, which the server's enrollments in other processes draw from too."""
    if is_postgresql(conn):
        return [r[0] for r in conn.execute("SELECT nextval(pg_get_serial_sequence('members', 'id')) "
                                           "FROM generate_series(1, ?)", (count,))]
    first = conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM members").fetchone()[0]
    return list(range(first, first + count))


def _update_crm(conn: sqlite3.Connection, rows: list[MemberRow], there: dict[str, int],
                now: str) -> tuple[list[int], list[int]]:
    """The crm_id and consent rows of enrolled cards give, set as PATCH /v1/members sets
    them (a member.updated when they change); the lines that changed their member and the
    lines refused (crm_id taken). The members are locked first (in id order), then read."""
    updated, refused = [], []
    changing = [r.card for r in rows if r.crm_id is not None or r.consent is not None]
    if ledger.lock_members(conn, [there[card] for card in changing]) and \
            known_cards(conn, changing) != {card: there[card] for card in changing}:
        # Looked up before the locks (PostgreSQL): a card merged, replaced or erased away
        # meanwhile would have the CRM's fields written onto a member no card reaches. The
        # batch runs again and reads the cards as they now are.
        raise WriteConflict("a card of the batch changed members while it was imported")
    for r in rows:
        if r.crm_id is None and r.consent is None:
            continue
        consent = {} if r.consent is None else {c: c in r.consent for c in CONSENT_CHANNELS}
        crm_id, bits = member_care.crm_of(conn, there[r.card])
        given = sum(1 << i for i, c in enumerate(CONSENT_CHANNELS) if consent.get(c)) if consent else bits
        if (r.crm_id or crm_id, given) == (crm_id, bits):
            continue        # a rerun of the same file changes nothing, not even when consent was given
        try:
            member_care.set_crm(conn, there[r.card], r.crm_id, consent, now, imported=True)
        except member_care.CareRefused:
            refused.append(r.line)
        else:
            updated.append(r.line)
    return updated, refused


def _crm_ids_taken(conn: sqlite3.Connection, crm_ids: list[str]) -> set[str]:
    taken: set[str] = set()
    for chunk in _chunks(crm_ids):
        marks = ", ".join("?" * len(chunk))
        taken.update(r[0] for r in conn.execute(f"SELECT crm_id FROM members WHERE crm_id IN ({marks})", chunk))
    return taken


POSTING_COLUMNS = ("id", "member_id", "lot_id", "kind", "points", "counter_account", "effective_at", "created_at",
                   "rule_id", "rules_version", "store_id", "register_id", "receipt_id", "ref", "key_id", "note",
                   "hash")


def _open_balances(conn: sqlite3.Connection, rows: list[MemberRow], ids: dict[int, int], today: str,
                   at: PostingRef) -> None:
    """One lot per opening balance, available at once, holding the points of its one posting
    from `opening` (as storage.ledger.credit writes a lot, without its per-row statements)."""
    if not rows:
        return
    if is_postgresql(conn):
        return _open_balances_pg(conn, rows, ids, today, at)
    first_lot = conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM lots").fetchone()[0]
    lots = [(first_lot + i, ids[r.line], today, r.opening_expires_on, r.opening_points)
            for i, r in enumerate(rows)]
    insert_all(conn, "lots", ("id", "member_id", "available_from", "expires_on", "remaining"), lots)
    insert_all(conn, "postings", POSTING_COLUMNS, _chained(conn, lots, at))


def _open_balances_pg(conn, rows: list[MemberRow], ids: dict[int, int], today: str, at: PostingRef) -> None:
    """PostgreSQL's: lots numbered by their identity column, each posting the first of its
    member's chain (storage/pg/ledger.py), the note and key kept as SQLite's hash them."""
    from storage.pg import ledger as pg
    lot_ids = ledger.new_lots(conn, [(ids[r.line], today, r.opening_expires_on, r.opening_points) for r in rows])
    pg.append_postings(conn, [NewPosting(ids[r.line], lot_id, (today, r.opening_expires_on), "adjustment",
                                         r.opening_points, OPENING, at.effective_at, at.created_at, None,
                                         at.rules_version, None, at.ref, counted=True)
                              for r, lot_id in zip(rows, lot_ids)], key_id=at.key_id, note=at.note)


def _chained(conn: sqlite3.Connection, lots: list[tuple], at: PostingRef) -> list[tuple]:
    """The lots' postings, each hashed over the one before (storage.ledger.posting_hash)
    from the chain's head, with the fields in the order storage.ledger.post hashes them
    (storage.ledger.HASHED_SELECT, which audit verify recomputes)."""
    head = conn.execute("SELECT id, hash FROM postings ORDER BY id DESC LIMIT 1").fetchone()
    posting_id, prev = head if head else (0, ledger.GENESIS_HASH)
    out = []
    for lot_id, member_id, available_from, expires_on, points in lots:
        posting_id += 1
        hashed = (posting_id, member_id, lot_id, available_from, expires_on, "adjustment", points, OPENING,
                  at.effective_at, at.created_at, None, at.rules_version, None, None, None, at.ref, at.key_id,
                  at.note)
        prev = ledger.posting_hash(prev, hashed)
        out.append((posting_id, member_id, lot_id, "adjustment", points, OPENING, at.effective_at, at.created_at,
                    None, at.rules_version, None, None, None, at.ref, at.key_id, at.note, prev))
    return out


def stored_receipts(conn: sqlite3.Connection, keys: list[ReceiptKey]) -> dict[ReceiptKey, bytes]:
    """key -> stored fingerprint, for those of `keys` already stored (imported or not)."""
    found: dict[ReceiptKey, bytes] = {}
    for key in keys:
        row = conn.execute("SELECT body_sha256 FROM receipts WHERE store_id = ? AND register_id = ? "
                           "AND receipt_id = ?", key).fetchone()
        if row is not None:
            found[key] = row[0]
    return found


@dataclass
class ReceiptsOutcome:
    added: list[int] = field(default_factory=list)          # lines
    already: list[int] = field(default_factory=list)        # stored before with the same fingerprint
    conflicting: list[int] = field(default_factory=list)    # identity taken by another receipt
    unknown_card: list[int] = field(default_factory=list)


def add_receipts(conn: sqlite3.Connection, rows: list[ReceiptRow], *, now: str, source: str) -> ReceiptsOutcome:
    """Stores the receipts not stored yet whose card (if any) is enrolled or was taken out of
    use by a replacement or a merge: history bought with such a card is its member's, as the
    receipts it confirmed before. Their members are locked first (in id order): a receipt
    counts for the member's tier and receipt numbers."""
    out = ReceiptsOutcome()
    cards = list({r.card for r in rows if r.card})
    members = known_cards(conn, cards)
    for card in cards:
        retired = None if card in members else member_care.retired_card(conn, card)
        if retired is not None:
            members[card] = retired.member_id
    ledger.lock_members(conn, list(members.values()))
    stored = stored_receipts(conn, [r.key for r in rows])
    new = []
    for r in rows:
        if r.key in stored:
            same = stored[r.key] == r.fingerprint or stored[r.key] in r.earlier_fingerprints
            (out.already if same else out.conflicting).append(r.line)
        elif r.card is not None and r.card not in members:
            out.unknown_card.append(r.line)
        else:
            new.append(r)
            out.added.append(r.line)
    insert_receipts(conn, new, members, now=now, source=source)
    return out


def insert_receipts(conn: sqlite3.Connection, rows: list[ReceiptRow], members: dict[str, int], *, now: str,
                    source: str) -> None:
    """Stores receipts as confirmed, marked imported; `members`: card HMAC -> member id."""
    insert_all(conn, "receipts", ("store_id", "register_id", "receipt_id", "body_sha256", "member_id", "ts",
                                  "local_date", "total", "rules_version", "status", "body", "result", "detail",
                                  "created_at"),
               [(*r.key, r.fingerprint, members[r.card] if r.card else None, r.ts, r.local_date, r.total,
                 IMPORTED_RULES_VERSION, "confirmed", ledger.pack(r.body), r.result, None, now) for r in rows])
    insert_all(conn, "imported_receipts", ("store_id", "register_id", "receipt_id", "imported_at", "source", "line"),
               [(*r.key, now, source, r.line) for r in rows])


def is_imported(conn: sqlite3.Connection, key: ReceiptKey) -> bool:
    return conn.execute("SELECT 1 FROM imported_receipts WHERE store_id = ? AND register_id = ? "
                        "AND receipt_id = ?", key).fetchone() is not None


def refuse_if_imported(conn: sqlite3.Connection, key: ReceiptKey, action: str) -> None:
    """For the return and cancel paths, inside their write transaction: raises
    ImportedReceipt (a 422 `receipt_imported`, server/errors.py) for an imported receipt.
    `action`: "returned" or "cancelled", as the refusal says it."""
    if is_imported(conn, key):
        raise ImportedReceipt(key, action)
