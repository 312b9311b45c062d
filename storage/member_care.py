"""Member care in SQL: CRM fields, cards taken out of use, merges, erasure and the re-keying
of stored hashes. Write functions run inside the single writer's transaction
(storage.db.Database.write), so each operation commits or fails whole.

A merge moves points only through postings (storage.ledger.post): every lot of the member
absorbed with points left (or owed) is emptied by a `transfer` posting and refilled on the
surviving member as a new lot with the same dates, the pair's counter accounts naming each
other, so the hash chain, the lot sums and the zero sum of accounts hold as for any posting.
"""
from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

import msgspec

from storage import coupons, events, ledger, member_facts, offers, segments
from storage.accounts import member_account
from storage.schema import LEGACY_FINGERPRINT, legacy_fingerprint
from storage.sql import WriteConflict, arrival, byte_order, integrity_errors, is_postgresql

CHANNELS = ledger.CONSENT_CHANNELS
PHONE_MATCHES_MAX = 20
# A care operation on one member runs as one write: a member with more receipts than this
# would hold every other write while their bodies are rewritten.
ERASE_RECEIPTS_MAX = 100_000
# Members merged into one erased with it, at most (a chain of merges, read one level at a time).
MERGED_MAX = 1_000


class CareRefused(Exception):
    """A care operation refused for a reason its caller can act on; `code` names it."""

    def __init__(self, code: str, message: str, path: str | None = None):
        super().__init__(message)
        self.code, self.message, self.path = code, message, path


# ---------------------------------------------------------------- members

@dataclass
class CareState:
    id: int
    crm_id: str | None
    consent: dict[str, bool]
    consent_updated_at: str | None
    merged_into: int | None
    erased_at: str | None


def care_state(conn: sqlite3.Connection, member_id: int) -> CareState | None:
    row = conn.execute("SELECT id, crm_id, consent_sms, consent_viber, consent_email, consent_push, "
                       "consent_updated_at, merged_into, erased_at FROM members WHERE id = ?",
                       (member_id,)).fetchone()
    if row is None:
        return None
    return CareState(row[0], row[1], dict(zip(CHANNELS, map(bool, row[2:6]))), row[6], row[7], row[8])


def crm_fields(state: CareState) -> dict:
    """What the member answer shows of the CRM's fields."""
    return {"crm_id": state.crm_id, "consent": state.consent, "consent_updated_at": state.consent_updated_at}


def set_crm(conn: sqlite3.Connection, member_id: int, crm_id: str | None, consent: dict[str, bool],
            now: str, imported: bool = False) -> list[str]:
    """crm_id: None leaves it, "" clears it; consent: only the channels given change. When
    either changed, member.updated names which (`imported`: by `loyalty import members`),
    in the caller's transaction, with the member's fields as they now are. What changed."""
    before = crm_of(conn, member_id)
    _write_crm(conn, member_id, crm_id, consent, now)
    after = crm_of(conn, member_id)
    changed = [name for name, old, new in zip(("crm_id", "consent"), before, after) if old != new]
    if changed:
        events.emit(conn, "member.updated", member_id, {"changed": changed, **({"imported": True} if imported else {})},
                    now, crm=events.Crm(*after))
    return changed


def crm_of(conn: sqlite3.Connection, member_id: int) -> tuple[str | None, int]:
    return conn.execute(f"SELECT m.crm_id, {ledger.CONSENT_BITS} FROM members m WHERE m.id = ?",
                        (member_id,)).fetchone()


def _write_crm(conn: sqlite3.Connection, member_id: int, crm_id: str | None, consent: dict[str, bool],
               now: str) -> None:
    sets, values = [], []
    if crm_id is not None:
        sets.append("crm_id = ?")
        values.append(crm_id or None)
    for channel, granted in consent.items():
        sets.append(f"consent_{channel} = ?")
        values.append(int(granted))
    if consent:
        sets.append("consent_updated_at = ?")
        values.append(now)
    if not sets:
        return
    try:
        conn.execute(f"UPDATE members SET {', '.join(sets)}, updated_at = ? WHERE id = ?", (*values, now, member_id))
    except integrity_errors():
        raise CareRefused("crm_id_taken", f"crm_id {crm_id} belongs to another member", "crm_id") from None


def members_by_phone(conn: sqlite3.Connection, digests: tuple[str, ...]) -> list[int]:
    marks = ", ".join("?" * len(digests))
    return [r[0] for r in conn.execute(f"SELECT id FROM members WHERE phone_hmac IN ({marks}) ORDER BY id LIMIT ?",
                                       (*digests, PHONE_MATCHES_MAX))]


# ---------------------------------------------------------------- cards

def active_cards(conn: sqlite3.Connection, member_id: int) -> list[tuple[str, str]]:
    """(hash, last four digits) of each card in use, oldest first."""
    return conn.execute("SELECT card, card_last4 FROM cards WHERE member_id = ? ORDER BY created_at, card",
                        (member_id,)).fetchall()


@dataclass
class RetiredCard:
    member_id: int
    card_last4: str | None
    reason: str             # replaced | merged
    successor: str          # the new card's last four digits, or the surviving member's id
    retired_at: str


def retired_card(conn: sqlite3.Connection, card: str) -> RetiredCard | None:
    """card: the card number's HMAC, with its older ones during a key rotation (ledger.card_match)."""
    match, digests = ledger.card_match(card)
    row = conn.execute("SELECT member_id, card_last4, reason, successor, retired_at FROM retired_cards c "
                       f"WHERE {match} LIMIT 1", digests).fetchone()
    return RetiredCard(*row) if row else None


def retire_card(conn: sqlite3.Connection, card: str, member_id: int, reason: str, successor: str, now: str) -> None:
    """Moves a card out of use: look-ups no longer find it, retired_card() says why."""
    last4 = conn.execute("DELETE FROM cards WHERE card = ? RETURNING card_last4", (card,)).fetchone()[0]
    conn.execute("INSERT INTO retired_cards (card, member_id, card_last4, reason, successor, retired_at) "
                 "VALUES (?, ?, ?, ?, ?, ?)", (card, member_id, last4, reason, successor, now))


def replaced_by(conn: sqlite3.Connection, member_id: int, card: str) -> tuple[str | None] | None:
    """(the last four digits of the card it replaced,) when `card` (a card in use of the
    member, its stored hash) came to the member by a replacement; None when it came by
    enrolment or an import. A replacement retires the old card at the moment it adds the new."""
    return conn.execute("SELECT r.card_last4 FROM cards c JOIN retired_cards r ON r.member_id = c.member_id "
                        "AND r.reason = 'replaced' AND r.successor = c.card_last4 AND r.retired_at = c.created_at "
                        "WHERE c.card = ? AND c.member_id = ? LIMIT 1", (card, member_id)).fetchone()


def add_card(conn: sqlite3.Connection, card: str, card_last4: str, member_id: int, now: str) -> None:
    conn.execute("INSERT INTO cards (card, card_last4, member_id, created_at) VALUES (?, ?, ?, ?)",
                 (card, card_last4, member_id, now))


# ---------------------------------------------------------------- merges

def get_merge(conn: sqlite3.Connection, merge_id: str) -> tuple[str, bytes] | None:
    return conn.execute("SELECT body_sha256, result FROM member_merges WHERE merge_id = ?", (merge_id,)).fetchone()


def insert_merge(conn: sqlite3.Connection, merge_id: str, *, body_sha256: str, from_member: int, into_member: int,
                 result: bytes, key_id: str, now: str) -> None:
    conn.execute("INSERT INTO member_merges (merge_id, body_sha256, from_member, into_member, result, key_id, "
                 "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                 (merge_id, body_sha256, from_member, into_member, result, key_id, now))


def move_points(conn: sqlite3.Connection, source: int, target: int, at: ledger.PostingRef) -> tuple[int, int]:
    """Every lot of `source` with points left or owed goes to `target` as a transfer pair;
    returns (lots moved, net points moved). Debts move first, so the points that follow
    repay them (and the target's own debts) as any points credited do."""
    lots = sorted(ledger.lots_of(conn, source), key=lambda lot: (lot.remaining > 0, lot.id))
    net = 0
    for lot in lots:
        dates = (lot.available_from, lot.expires_on)
        ledger.post(conn, source, lot.id, "transfer", -lot.remaining, member_account(target), at, lot_dates=dates)
        moved = ledger.new_lot(conn, target, lot.available_from, lot.expires_on, lot.remaining)
        ledger.post(conn, target, moved, "transfer", lot.remaining, member_account(source), at, lot_dates=dates,
                    counted=True)
        if lot.remaining > 0:
            ledger.repay_debts(conn, target, moved, at)
        net += lot.remaining
    return len(lots), net


def move_offers(conn: sqlite3.Connection, source: int, target: int) -> int:
    """The personal offers of `source` go to `target` (storage.offers.take_over); how many."""
    return offers.take_over(conn, source, target, {m: with_merged(conn, m) for m in (source, target)})


def survivor(conn: sqlite3.Connection, member_id: int) -> int | None:
    """The member a merged member's points went to, through any chain of merges; None for a
    member not merged."""
    found = None
    for _ in range(MERGED_MAX):
        row = conn.execute("SELECT merged_into FROM members WHERE id = ?", (member_id,)).fetchone()
        if row is None or row[0] is None:
            break
        found = member_id = row[0]
    return found


def points_holder(conn: sqlite3.Connection, member_id: int) -> int:
    """The member whose balance holds what `member_id` earns or is owed: the member it was
    merged into, through any chain of merges (where its points went), or itself."""
    return survivor(conn, member_id) or member_id


def heirs(conn: sqlite3.Connection) -> dict[int, int]:
    """Every member merged away -> the member at the end of its chain of merges (X -> Y -> Z:
    X and Y -> Z), from one statement over the merged members only (members_merged_into):
    merges are few, and a job over a million members looks each one up in this instead."""
    merged = dict(conn.execute("SELECT id, merged_into FROM members WHERE merged_into IS NOT NULL"))
    out = {}
    for member_id in merged:
        heir = member_id
        for _ in range(MERGED_MAX):
            if heir not in merged:
                break
            heir = merged[heir]
        out[member_id] = heir
    return out


def points_holders(conn: sqlite3.Connection, member_ids: list[int]) -> list[int]:
    """points_holder of many members at once, each once, in id order: the merges read in one
    statement (few members are merged; a segment may hold millions)."""
    merged = heirs(conn)
    return sorted({merged.get(m, m) for m in member_ids})


def reachable_holders(conn: sqlite3.Connection, member_ids: list[int]) -> list[int]:
    """points_holders less the erased members: those a card still reaches, as an offer to a
    segment goes to them. A computed segment keeps an erased member until the daily job's
    next run, and a member merged away may lead to one erased with it since."""
    erased = segments.erased_members(conn)
    return [m for m in points_holders(conn, member_ids) if m not in erased]


def lock_points_holder(conn: sqlite3.Connection, member_id: int) -> int:
    """points_holder, read under the holder's lock (PostgreSQL), for a write that changes
    the holder's points or offers. A merge of the holder that commits between the look-up
    and the lock has moved its points on to another member, which the write would miss (and
    leave what it takes back or credits on a member no card reaches): that member is locked
    and looked up again. Merges only ever lengthen a chain, so this ends. The holder is
    locked after the members the write holds already (ledger.lock_members_after): a holder
    of a lower id that another write holds runs the write again with it locked first."""
    holder = points_holder(conn, member_id)
    if not is_postgresql(conn):
        return holder
    for _ in range(MERGED_MAX):
        ledger.lock_members_after(conn, [holder])
        again = points_holder(conn, member_id)
        if again == holder:
            return holder
        holder = again
    raise WriteConflict(f"the member holding m_{member_id}'s points kept being merged on")


def lock_receipt(conn: sqlite3.Connection, key: ledger.ReceiptKey, member_id: int | None) -> bool:
    """ledger.lock_receipt for a take-back of the receipt: its member and, for a member
    merged away, the member holding its points (which the take-back follows: follow_merge),
    locked together in the order of their ids, as every writer of several members takes
    them. Locked one after the other, the member then its holder, two such take-backs, or
    one and an erasure or a job's batch, could each hold the lock the other waits for.
    lock_points_holder reads the holder again under the locks."""
    if not is_postgresql(conn):
        return False
    return ledger.lock_receipt(conn, key, [] if member_id is None else [member_id, points_holder(conn, member_id)])


def follow_merge(conn: sqlite3.Connection, member_id: int, at: ledger.PostingRef) -> None:
    """After a return or a cancel of a merged member's receipt: what it took back (a debt) or
    refunded went onto the merged member's lots, which no points reach any more; it moves on
    to the member its points went to, as the merge moved them. What it took back comes first
    from that member's lots with the same dates (where the merge put the receipt's points)."""
    if survivor(conn, member_id) is None:
        return
    heir = lock_points_holder(conn, member_id)
    moved = ledger.PostingRef(at.effective_at, at.created_at, ref=f"merged:m_{heir}")
    _take_back_from_heir(conn, member_id, heir, moved)
    move_points(conn, member_id, heir, moved)


def _take_back_from_heir(conn: sqlite3.Connection, member_id: int, heir: int, at: ledger.PostingRef) -> None:
    """Each lot of the merged member below zero is refilled, by a transfer pair, from the
    heir's lots of the same dates while they have points left."""
    left = {lot.id: lot for lot in ledger.lots_of(conn, heir) if lot.remaining > 0}
    for debt in ledger.lots_of(conn, member_id):
        owed = -debt.remaining
        for lot in left.values():
            if owed <= 0:
                break
            if (lot.available_from, lot.expires_on) != (debt.available_from, debt.expires_on) or lot.remaining <= 0:
                continue
            take = min(owed, lot.remaining)
            ledger.post(conn, heir, lot.id, "transfer", -take, member_account(member_id), at)
            ledger.post(conn, member_id, debt.id, "transfer", take, member_account(heir), at)
            lot.remaining -= take
            owed -= take


def release_holds(conn: sqlite3.Connection, member_id: int, now: str) -> int:
    return conn.execute("UPDATE holds SET status = 'released', closed_at = ? WHERE member_id = ? AND status = 'open'",
                        (now, member_id)).rowcount


def mark_merged(conn: sqlite3.Connection, source: int, target: int, now: str) -> None:
    conn.execute("UPDATE members SET merged_into = ?, updated_at = ? WHERE id = ?", (target, now, source))


# ---------------------------------------------------------------- erasure

def with_merged(conn: sqlite3.Connection, member_id: int) -> list[int]:
    """The member and every member merged into it, directly or through others: one customer."""
    ids, frontier = [member_id], [member_id]
    while frontier and len(ids) <= MERGED_MAX:
        marks = ", ".join("?" * len(frontier))
        frontier = [r[0] for r in conn.execute(f"SELECT id FROM members WHERE merged_into IN ({marks})", frontier)]
        ids += frontier
    return ids[:MERGED_MAX + 1]


def lock_with_merged(conn: sqlite3.Connection, member_id: int) -> list[int]:
    """with_merged, read under the locks of the members it names (PostgreSQL), for an
    erasure. A merge into one of them that commits between the read and the locks adds a
    member the erasure finds (erase reads them again) but would erase without its lock:
    its cards, codes and events gone while a write of it runs. It is locked
    (ledger.lock_members_after) and the members read again, until they stop changing.
    Held, the erased member's lock keeps any merge into it waiting, and a member merged
    away takes no merge, so this ends."""
    ids = with_merged(conn, member_id)
    if not ledger.lock_members(conn, ids):
        return ids
    for _ in range(MERGED_MAX):
        again = with_merged(conn, member_id)
        if set(again) <= set(ids):
            return again
        ids = again
        ledger.lock_members_after(conn, ids)
    raise WriteConflict(f"members kept being merged into m_{member_id} while it was erased")


def erase(conn: sqlite3.Connection, member_id: int, now: str, today: date, seen: events.Seen | None,
          nobodys_card: str, card_forms: Callable[[str], tuple[str, ...]]) -> dict:
    """Personal data gone, of the member and of the members merged into it (the same
    customer): card and phone hashes with their last digits, birthday, tags, the CRM's id
    and consent; the card hash in their stored receipt bodies becomes null, their events
    keep what happened but no longer who (storage.events.forget_member), and birthday and
    tags leave their receipts' member facts; they leave every list segment, and their
    personal offers end on `today` (the program's local date). The member ids, receipts'
    amounts and the ledger stay (postings name the member id only). seen: their events as a
    reader found them before (storage.events.seen). nobodys_card: the hash (under the key in force) of a
    card no one has, which the coupon codes bound to their cards are bound to instead, so they
    stay nobody else's, even if a card is enrolled afresh; card_forms: a stored card hash ->
    every hash of that card a code may be bound under (server/privacy.py Privacy.forms)."""
    ids = with_merged(conn, member_id)
    marks = ", ".join("?" * len(ids))
    receipts = conn.execute(f"SELECT COUNT(*) FROM receipts WHERE member_id IN ({marks})", ids).fetchone()[0]
    if receipts > ERASE_RECEIPTS_MAX:
        raise CareRefused("too_many_receipts", f"the member has {receipts} receipts; erasing more than "
                          f"{ERASE_RECEIPTS_MAX} at once would hold every other write")
    done = {"cards_removed": 0, "receipts_scrubbed": 0, "members_erased": [f"m_{i}" for i in ids]}
    for one in ids:
        for name, count in _erase_one(conn, one, now, seen, nobodys_card, card_forms).items():
            done[name] += count
    segments.leave_every_list(conn, ids, now)
    offers.end_held_by(conn, ids, today)
    return done


_ERASED_LISTED = ("SELECT DISTINCT s.member_id, m.erased_at FROM segment_members s JOIN members m ON m.id = s.member_id "
                  "WHERE m.erased_at IS NOT NULL ORDER BY s.member_id")
_ERASED_OFFERED = ("SELECT DISTINCT o.member_id, m.erased_at FROM offer_members o JOIN members m ON m.id = o.member_id "
                   "WHERE m.erased_at IS NOT NULL AND o.to_date > substr(m.erased_at, 1, 10) ORDER BY o.member_id")
_OPEN_LIST_SPANS_FROM = ("SELECT MAX(valid_from) FROM segment_spans "
                         "WHERE member_id = ? AND from_run IS NULL AND valid_to IS NULL")


def finish_older_erasures(conn: sqlite3.Connection) -> None:
    """Members erased by versions that left them on their list segments and kept their
    personal offers open leave the lists and have their offers end, through the functions an
    erasure uses today, in the caller's transaction, as of the erasure's moment (erased_at):
    no card has reached the member since, so the lists counted, and the campaigns kept
    offering to, a customer gone from then on. A member with nothing left matches nothing,
    so a second run changes nothing.

    A list span an older version opened after the erasure ends when it began, not before.
    Offers end on the latest date anywhere on earth (UTC+14) at the erasure: an offer's dates
    are the program's local days, and no migration knows the program's timezone; ending
    on the erasure's UTC date could end an offer before a receipt of the same local day
    took from it. An erasure today ends them on its local day, never later than that."""
    listed = dict(conn.execute(_ERASED_LISTED).fetchall())
    offered = dict(conn.execute(_ERASED_OFFERED).fetchall())
    for member in sorted(listed.keys() | offered.keys()):      # in id order, as merges lock them
        ledger.lock_members(conn, [member])
        if member in listed:
            began = conn.execute(_OPEN_LIST_SPANS_FROM, (member,)).fetchone()[0]
            segments.leave_every_list(conn, [member], max(listed[member], began or ""))
        if member in offered:
            erased = datetime.fromisoformat(offered[member]).astimezone(timezone.utc)
            offers.end_held_by(conn, [member], (erased + timedelta(hours=14)).date())


def _erase_one(conn: sqlite3.Connection, member_id: int, now: str, seen: events.Seen | None,
               nobodys_card: str, card_forms: Callable[[str], tuple[str, ...]]) -> dict:
    cards = conn.execute("SELECT card FROM cards WHERE member_id = ? UNION ALL "
                         "SELECT card FROM retired_cards WHERE member_id = ?", (member_id, member_id)).fetchall()
    for (card,) in cards:
        coupons.rebind_codes(conn, card_forms(card), nobodys_card)
    cards = conn.execute("DELETE FROM cards WHERE member_id = ?", (member_id,)).rowcount
    cards += conn.execute("DELETE FROM retired_cards WHERE member_id = ?", (member_id,)).rowcount
    # Events a webhook or the warehouse has yet to read would still show who the member was.
    events.forget_member(conn, member_id, seen)
    conn.execute("UPDATE members SET phone = NULL, phone_hmac = NULL, phone_last4 = NULL, birthday = NULL, "
                 "tags = '[]', crm_id = NULL, consent_sms = 0, consent_viber = 0, consent_email = 0, "
                 "consent_push = 0, consent_updated_at = ?, erased_at = COALESCE(erased_at, ?), updated_at = ? "
                 "WHERE id = ?",
                 (now, now, now, member_id))
    scrubbed = 0
    row_id = arrival(conn)
    for rowid, body in conn.execute(f"SELECT {row_id}, body FROM receipts WHERE member_id = ?",
                                    (member_id,)).fetchall():
        decoded = msgspec.json.decode(ledger.unpack(body))
        if isinstance(decoded, dict) and decoded.get("card") is not None:
            decoded["card"] = None
            conn.execute(f"UPDATE receipts SET body = ? WHERE {row_id} = ?",
                         (ledger.pack(msgspec.json.encode(decoded)), rowid))
            scrubbed += 1
    member_facts.erase_personal(conn, member_id)
    release_holds(conn, member_id, now)
    return {"cards_removed": cards, "receipts_scrubbed": scrubbed}


# ---------------------------------------------------------------- key rotation

# (table, column holding the hash, its kind for the HMAC, the index or key ordering it)
REKEYED = (("cards", "card", "card"), ("retired_cards", "card", "card"), ("members", "phone_hmac", "phone"))


def stale_hashes(conn: sqlite3.Connection, table: str, column: str, in_force: tuple[str, str] | None,
                 limit: int) -> list[str]:
    """Up to `limit` stored hashes not under the key in force, read by ranges of the index on
    the column: the hashes under the key in force are the one range [low, high)."""
    if in_force is None:
        return []
    low, high = in_force
    hashed = f"{column}{byte_order(conn)}"
    rows = conn.execute(f"SELECT {column} FROM {table} WHERE {hashed} < ? ORDER BY {hashed} LIMIT ?",
                        (low, limit)).fetchall()
    if len(rows) < limit:
        rows += conn.execute(f"SELECT {column} FROM {table} WHERE {hashed} >= ? ORDER BY {hashed} LIMIT ?",
                             (high, limit - len(rows))).fetchall()
    return [r[0] for r in rows]


def count_stale(conn: sqlite3.Connection, table: str, column: str, in_force: tuple[str, str] | None) -> int:
    if in_force is None:
        return 0
    low, high = in_force
    hashed = f"{column}{byte_order(conn)}"
    return conn.execute(f"SELECT (SELECT COUNT(*) FROM {table} WHERE {hashed} < ?) + "
                        f"(SELECT COUNT(*) FROM {table} WHERE {hashed} >= ?)", (low, high)).fetchone()[0]


def rewrap(conn: sqlite3.Connection, table: str, column: str, pairs: list[tuple[str, str]]) -> int:
    """pairs: (stored hash, the same wrapped up to the key in force). A row changed since it
    was read (a card retired, a phone changed) simply matches nothing. Members' rows are
    locked first in id order, as every writer of several members takes them."""
    if table == "members" and is_postgresql(conn) and pairs:
        marks = ", ".join("?" * len(pairs))
        ledger.lock_members(conn, [r[0] for r in conn.execute(
            f"SELECT id FROM members WHERE {column} IN ({marks})", [old for old, _ in pairs])])
    return sum(conn.execute(f"UPDATE {table} SET {column} = ? WHERE {column} = ?", (new, old)).rowcount
               for old, new in pairs)


def receipt_bodies(conn: sqlite3.Connection, after_rowid: int,
                   limit: int) -> list[tuple[int, bytes, bytes, bytes | None]]:
    """(rowid, body as stored, fingerprint, takes) of up to `limit` receipts with a card after
    `after_rowid`, in rowid order: a body keeps the card's hash it was confirmed with, and
    its takes (storage/receipt_takes.py) the hashes of the codes it used. On
    PostgreSQL their members are locked first (in id order) and the bodies read after: an
    erasure that scrubbed one meanwhile is then seen, never written back over."""
    row_id = arrival(conn)
    if is_postgresql(conn):
        ledger.lock_members(conn, [r[0] for r in conn.execute(
            "SELECT DISTINCT member_id FROM (SELECT member_id FROM receipts WHERE id > ? AND member_id IS NOT NULL "
            "ORDER BY id LIMIT ?) AS batch", (after_rowid, limit))])
    return conn.execute(f"SELECT {row_id}, body, body_sha256, takes FROM receipts WHERE {row_id} > ? "
                        f"AND member_id IS NOT NULL ORDER BY {row_id} LIMIT ?", (after_rowid, limit)).fetchall()


def rewrite_bodies(conn: sqlite3.Connection, rows: list[tuple[bytes, bytes, int]]) -> None:
    """rows: (body, fingerprint, rowid) of receipts whose card's hash was wrapped."""
    conn.executemany(f"UPDATE receipts SET body = ?, body_sha256 = ? WHERE {arrival(conn)} = ?", rows)


def rewrite_takes(conn: sqlite3.Connection, rows: list[tuple[bytes, int]]) -> None:
    """rows: (takes, rowid) of receipts whose codes' hashes were wrapped."""
    conn.executemany(f"UPDATE receipts SET takes = ? WHERE {arrival(conn)} = ?", rows)


# (table, its key, the columns of legacy_fingerprint) of the fingerprints of bodies with cards
FINGERPRINTED = (("adjustments", "adjustment_id", ("adjustment_id", "member_id", "points", "reason")),
                 ("offers", "offer_id", ("offer_id", "rule_id", "from_date", "to_date", "points")))


def fingerprints_to_fields(conn: sqlite3.Connection, table: str, key: str, columns: tuple[str, ...],
                           in_force: tuple[str, str], limit: int) -> int:
    """Up to `limit` fingerprints neither under the key in force ([low, high)) nor made of
    the row's fields already, replaced by legacy_fingerprint of `columns`; how many."""
    low, high = in_force
    rows = conn.execute(f"SELECT {', '.join(columns)} FROM {table} WHERE (body_sha256 < ? OR body_sha256 >= ?) "
                        f"AND body_sha256 NOT LIKE '{LEGACY_FINGERPRINT}%' LIMIT ?", (low, high, limit)).fetchall()
    conn.executemany(f"UPDATE {table} SET body_sha256 = ? WHERE {key} = ?",
                     [(legacy_fingerprint(*row), row[columns.index(key)]) for row in rows])
    return len(rows)


def recorded_keys(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    """(key id, check value) of each HMAC key recorded, in order; the last is in force."""
    return [(r[0], r[1]) for r in conn.execute("SELECT key_id, check_value FROM privacy_keys ORDER BY position")]


def keys_problem(recorded: list[tuple[str, str]], keys: list[tuple[str, str]]) -> str | None:
    """Why `keys` (id, check value; in order) cannot find the hashes made under `recorded`, or
    None: every key recorded must be listed, in its place, because every hash stored is
    wrapped in all of them."""
    for position, (key_id, check) in enumerate(recorded):
        name = (f"key {key_id} (privacy.hmac_key_rotations[{position - 1}])" if key_id
                else "the first key (privacy.hmac_key_env or privacy.hmac_key)")
        if position >= len(keys) or keys[position][0] != key_id:
            return (f"the card and phone hashes of this database are wrapped in {name}: without it none can be "
                    "found; list it again in its place")
        if keys[position][1] != check:
            return (f"{name} is not the key this database's card and phone hashes were made with: with it "
                    "none can be found (a new key is added as a rotation, never put in place of the old one)")
    return None


def record_keys(conn: sqlite3.Connection, keys: list[tuple[str, str]], now: str) -> str | None:
    """Records the keys of `keys` (id, check value; in order) not recorded yet. Returns why
    they cannot be used on this database (keys_problem), or None."""
    recorded = recorded_keys(conn)
    if refused := keys_problem(recorded, keys):
        return refused
    conn.executemany("INSERT INTO privacy_keys (position, key_id, check_value, recorded_at) VALUES (?, ?, ?, ?)",
                     [(position, key_id, check, now) for position, (key_id, check) in enumerate(keys)
                      if position >= len(recorded)])
    return None
