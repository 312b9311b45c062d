"""The events outbox: what happened to members, for webhooks and for a warehouse pulling it.

An event is written by `emit` inside the write transaction of the change it announces, so it
is committed exactly when the change is, and a kill -9 loses neither or both. The dispatcher
(server/webhooks.py) gives each webhook a delivery row per event it subscribes to
(`fan_out`), sends each member's oldest pending one (`due`), and records the outcomes
(`record`). A card appears only as its last four digits, a member only as its public id,
with the CRM's id and consent per channel as they were when the event was written.
"""
from __future__ import annotations

import sqlite3
import threading
from datetime import datetime
from typing import Any, NamedTuple

import msgspec

from storage.ledger import CONSENT_BITS, CONSENT_CHANNELS, iso, member_public_id
from storage.sql import is_postgresql, json_ids

TYPES = ("member.enrolled", "receipt.confirmed", "receipt.cancelled", "return.accepted", "referral.rewarded",
         "referral.reversed", "tier.changed", "points.expiring", "points.expired", "birthday", "offer.assigned",
         "card.replaced", "member.merged", "member.erased", "member.updated")

_JSON = msgspec.json.Encoder()


class Crm(NamedTuple):
    """The member's CRM fields as of an event: its id in the CRM and the consent bits
    (storage.ledger.CONSENT_CHANNELS, a bit each)."""
    crm_id: str | None
    consent: int


# The member m as an event names them: the first card's last four digits and the CRM's fields.
_NAMED_COLUMNS = ("(SELECT card_last4 FROM cards WHERE member_id = m.id ORDER BY created_at LIMIT 1), m.crm_id, "
                  f"{CONSENT_BITS}")
_NAMED = f"SELECT {_NAMED_COLUMNS} FROM members m WHERE m.id = ?"


def emit(conn: sqlite3.Connection, type_: str, member_id: int, data: dict[str, Any], occurred_at: datetime | str,
         once_key: str | None = None, card_last4: str | None = None, crm: Crm | None = None) -> int | None:
    """Writes one event in the caller's transaction; its id, or None when `once_key` was already used.
    card_last4: of the card the change was made with; by default the member's first card's.
    crm: the member's CRM fields when the caller read them with the member (a receipt does);
    otherwise read here, in the same query as the card."""
    if type_ not in TYPES:
        raise ValueError(f"unknown event type {type_!r}")
    at = occurred_at if isinstance(occurred_at, str) else iso(occurred_at)
    if card_last4 is None or crm is None:
        first_card, crm_id, consent = conn.execute(_NAMED, (member_id,)).fetchone() or (None, None, 0)
        card_last4 = first_card if card_last4 is None else card_last4
        crm = crm or Crm(crm_id, consent)
    if type_ == "member.enrolled":
        # The tier a member starts with, so their first move up is a tier.changed.
        _note_tier_row(conn, member_id, data["tier"])
    row = conn.execute("INSERT INTO events (type, member_id, card_last4, crm_id, consent, occurred_at, data, "
                       "once_key, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id",
                       (type_, member_id, card_last4, crm.crm_id, crm.consent, at, _JSON.encode(data), once_key,
                        at)).fetchone()
    return row[0] if row else None


def _note_tier_row(conn: sqlite3.Connection, member_id: int, tier: str) -> None:
    conn.execute("INSERT INTO event_member_tiers (member_id, tier) VALUES (?, ?) "
                 "ON CONFLICT (member_id) DO UPDATE SET tier = excluded.tier", (member_id, tier))


def note_tier(conn: sqlite3.Connection, member_id: int, tier: str, occurred_at: datetime | str,
              reason: str, card_last4: str | None = None, crm: Crm | None = None) -> int | None:
    """Emits tier.changed when `tier` differs from the one last noted for the member. The first
    tier noted (at enrollment, or for a member enrolled before events existed) is only recorded.
    card_last4, crm: as emit takes them."""
    row = conn.execute("SELECT tier FROM event_member_tiers WHERE member_id = ?", (member_id,)).fetchone()
    if row is not None and row[0] == tier:
        return None
    _note_tier_row(conn, member_id, tier)
    if row is None:
        return None
    return emit(conn, "tier.changed", member_id, {"from": row[0], "to": tier, "reason": reason}, occurred_at,
                card_last4=card_last4, crm=crm)


def offers_assigned(conn: sqlite3.Connection, offer_id: str, rule_id: str, valid_from: str, valid_to: str,
                    points: int | None, member_ids: list[int], occurred_at: datetime | str) -> int:
    """offer.assigned for each member given the offer, in the assignment's transaction: one
    statement for them all (a segment may hold a million members); once per member and offer.
    How many were written."""
    at = occurred_at if isinstance(occurred_at, str) else iso(occurred_at)
    data = _JSON.encode({"offer_id": offer_id, "rule": rule_id, "from": valid_from, "to": valid_to, "points": points})
    return conn.execute(
        "INSERT INTO events (type, member_id, card_last4, crm_id, consent, occurred_at, data, once_key, "
        f"created_at) SELECT 'offer.assigned', m.id, {_NAMED_COLUMNS}, ?, ?, 'offer:' || ? || ':' || m.id, ? "
        # WHERE true: SQLite would read the ON of an upsert after a bare FROM as a join's.
        f"FROM {json_ids(conn)} j JOIN members m ON m.id = j.value WHERE true ORDER BY m.id ON CONFLICT DO NOTHING",
        (at, data, offer_id, at, _JSON.encode(member_ids))).rowcount


def members_imported(conn: sqlite3.Connection, member_ids: list[int], tier: str, occurred_at: datetime | str) -> int:
    """member.enrolled, marked imported, for each member an import inserted, in its
    transaction: one statement for the batch. Each starts at `tier`, so a later move is a
    tier.changed. How many were written."""
    at = occurred_at if isinstance(occurred_at, str) else iso(occurred_at)
    ids = _JSON.encode(member_ids)
    conn.execute(f"INSERT INTO event_member_tiers (member_id, tier) SELECT j.value, ? FROM {json_ids(conn)} j "
                 "WHERE true ON CONFLICT (member_id) DO UPDATE SET tier = excluded.tier", (tier, ids))
    return conn.execute(
        "INSERT INTO events (type, member_id, card_last4, crm_id, consent, occurred_at, data, created_at) "
        f"SELECT 'member.enrolled', m.id, {_NAMED_COLUMNS}, ?, ?, ? "
        f"FROM {json_ids(conn)} j JOIN members m ON m.id = j.value ORDER BY m.id",
        (at, _JSON.encode({"store_id": None, "tier": tier, "imported": True}), at, ids)).rowcount


# Fields of an event's data that tell who the member is; an erasure makes them null.
PERSONAL_DATA = {"birthday": ("date",), "card.replaced": ("old_card_last4", "new_card_last4")}


class Seen(NamedTuple):
    """The events of some members as a reader saw them before their erasure: events has no
    index on member_id (every receipt writes one), so finding them is a scan, done here
    rather than while the erasure holds the writer."""
    newest: int                         # no event at or below it can still commit
    ids: dict[int, list[int]]           # member id: their event ids up to `newest`


def seen(conn: sqlite3.Connection, member_ids: list[int], settled: int | None = None) -> Seen:
    """settled: on PostgreSQL the settled id (Settled.settle), which this snapshot must be
    taken after; the newest id is not enough there, an event below it may commit later.
    SQLite's one writer commits in id order: the newest id it sees."""
    newest = settled if settled is not None else conn.execute(
        "SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]
    found: dict[int, list[int]] = {m: [] for m in member_ids}
    for event_id, member_id in conn.execute(
            f"SELECT id, member_id FROM events WHERE id <= ? AND member_id IN ({','.join('?' * len(member_ids))})",
            (newest, *member_ids)):
        found[member_id].append(event_id)
    return Seen(newest, found)


def forget_member(conn: sqlite3.Connection, member_id: int, before: Seen | None = None) -> None:
    """An erased member's events keep what happened and no longer who: the card's last digits,
    the CRM's id and the personal fields of their data become null, consent none. A webhook
    yet to deliver one sends it so; a warehouse pulling it reads it so. before: what a reader
    found of the member's events; only those written since are looked for here, by id range
    (without it, every event is read)."""
    scrub = "UPDATE events SET card_last4 = NULL, crm_id = NULL, consent = 0 WHERE "
    if before is None or member_id not in before.ids:
        rows = conn.execute(scrub + "member_id = ? RETURNING id, type, data", (member_id,)).fetchall()
    else:
        rows = conn.execute(scrub + "id > ? AND member_id = ? RETURNING id, type, data",
                            (before.newest, member_id)).fetchall()
        rows += conn.execute(scrub + f"id IN (SELECT value FROM {json_ids(conn)} j) RETURNING id, type, data",
                             (_JSON.encode(before.ids[member_id]),)).fetchall()
    for event_id, type_, data in rows:
        if type_ in PERSONAL_DATA:
            fields = msgspec.json.decode(data)
            fields.update(dict.fromkeys(PERSONAL_DATA[type_]))
            conn.execute("UPDATE events SET data = ? WHERE id = ?", (_JSON.encode(fields), event_id))


# The largest id either database can hold (a signed 64-bit integer).
ID_MAX = 2**63 - 1
_EVENT_COLUMNS = "e.id, e.type, e.occurred_at, e.member_id, e.card_last4, e.data, e.crm_id, e.consent"


def as_json(row: tuple) -> dict:
    """The wire form of an event, for a webhook's body and for GET /v1/admin/events: the
    envelope, then the member's CRM fields as of the event, then the type's data."""
    event_id, type_, occurred_at, member_id, card_last4, data, crm_id, consent = row[:8]
    return {"id": event_id, "type": type_, "occurred_at": occurred_at, "member_id": member_public_id(member_id),
            "card_last4": card_last4, "crm_id": crm_id, "consent": consent_json(consent),
            "data": msgspec.json.decode(data)}


def consent_json(bits: int | None) -> dict[str, bool] | None:
    """None for an event written before consent was kept with events."""
    if bits is None:
        return None
    return {channel: bool(bits >> i & 1) for i, channel in enumerate(CONSENT_CHANNELS)}


def page(conn: sqlite3.Connection, after: int, limit: int, upto: int = ID_MAX) -> list[dict]:
    """The events after the id, oldest first, none above upto: on PostgreSQL the settled id
    (Settled), read in a snapshot taken after it was settled; SQLite's one writer commits
    events in id order, and its pages reach the newest."""
    return [as_json(r) for r in conn.execute(
        f"SELECT {_EVENT_COLUMNS} FROM events e WHERE e.id > ? AND e.id <= ? ORDER BY e.id LIMIT ?",
        (after, upto, limit))]


# How long a pull waits on PostgreSQL for the transactions writing events to end. Writers
# that come meanwhile queue behind the pull's lock, so this is also the longest a receipt
# waits for a pull; a receipt's transaction ends in milliseconds. Well under PostgreSQL's
# deadlock_timeout (1 s): a writer holding the lock shared that waits for a writer queued
# behind the pull (a member's row) is freed by the pull giving up, not by a deadlock error.
SETTLE_WAIT_MS = 100


class Settled:
    """On PostgreSQL the highest event id below which no transaction can still commit an
    event: a pull hands out no id above it, so a warehouse's bookmark never passes an event
    that commits late (several writers take ids in one order and commit in another).

    Every statement writing events holds the writers' lock shared from before its ids are
    taken to its transaction's end (p011's trigger); settle() holds it exclusive for a
    moment, when every id handed out so far belongs to a transaction that has ended, and
    reads the sequence. While a transaction writing events runs longer than SETTLE_WAIT_MS
    (an import, an offer to a segment) the id this process settled last serves: settled
    stays settled, so it only grows; a page below it needs no settling (`known`). A
    rolled-back id is settled like any other, a hole that blocks nothing."""

    def __init__(self) -> None:
        self._id = 0
        self._lock = threading.Lock()

    @property
    def known(self) -> int:
        """The id settled last, without asking PostgreSQL."""
        with self._lock:
            return self._id

    def settle(self, conn) -> int:
        """The settled id, settled anew when the writers let go in time. In a transaction
        of its own: a snapshot taken before it waited would miss what committed meanwhile."""
        now = settled_now(conn)
        with self._lock:
            self._id = max(self._id, now or 0)
            return self._id


def settled_now(conn) -> int | None:
    """The newest event id handed out, once no transaction writing events is left running;
    None when some still were after SETTLE_WAIT_MS. PostgreSQL only: its driver is imported
    here, so that SQLite never loads it."""
    import psycopg

    from storage.pg.schema import EVENTS_WRITERS_LOCK_KEY
    try:
        with conn.raw.transaction():        # a savepoint: a lock not had in time leaves the rest usable
            conn.execute(f"SET LOCAL lock_timeout = {SETTLE_WAIT_MS}")
            conn.execute("SELECT pg_advisory_xact_lock(?)", (EVENTS_WRITERS_LOCK_KEY,))
    except psycopg.errors.LockNotAvailable:
        return None
    # Held until this transaction ends, a moment from now: no writer is between its id and
    # its commit, and the next one's ids come after this value.
    return conn.execute("SELECT COALESCE(pg_sequence_last_value(pg_get_serial_sequence('events', 'id')), 0)"
                        ).fetchone()[0]


def start_fanout(conn: sqlite3.Connection, webhook_id: str) -> None:
    """A webhook seen for the first time gets the events from now on (a warehouse pulls older
    ones). SQLite: its cursor starts at the newest event. PostgreSQL keeps no cursor: a webhook
    gets what the queue hands the fan-out from the first round it is configured in."""
    if is_postgresql(conn):
        return
    conn.execute("INSERT INTO event_fanout (webhook_id, after_id) "
                 # WHERE true: SQLite would read the ON of an upsert after a bare FROM as a join's.
                 "SELECT ?, COALESCE(MAX(id), 0) FROM events WHERE true ON CONFLICT DO NOTHING", (webhook_id,))


class Hook(NamedTuple):
    webhook_id: str
    types: list[str]        # the event types it subscribes to


def fan_out(conn: sqlite3.Connection, hooks: list[Hook], limit: int, now_s: float) -> int:
    """Delivery rows, for each webhook subscribed to its type, of up to `limit` events not
    fanned out yet; how many events it passed (at most `limit` per webhook on SQLite).

    SQLite commits events in id order (one writer), so a cursor per webhook is exact and
    costs its receipts nothing. PostgreSQL's writers commit out of id order: an event may
    commit after one with a higher id was fanned out, so there each event is a row of
    event_fanout_pending, written with it (p009's trigger), claimed here and deleted."""
    if is_postgresql(conn):
        return _fan_out_queue(conn, hooks, limit, now_s)
    return sum(_fan_out_cursor(conn, hook, limit, now_s) for hook in hooks)


def _fan_out_cursor(conn: sqlite3.Connection, hook: Hook, limit: int, now_s: float) -> int:
    after = conn.execute("SELECT after_id FROM event_fanout WHERE webhook_id = ?", (hook.webhook_id,)).fetchone()[0]
    last, seen = conn.execute("SELECT MAX(id), COUNT(*) FROM (SELECT id FROM events WHERE id > ? ORDER BY id "
                              "LIMIT ?) AS e", (after, limit)).fetchone()
    if not seen:
        return 0
    conn.execute(f"INSERT INTO event_deliveries (webhook_id, event_id, member_id, state, next_attempt_at) "
                 f"SELECT ?, id, member_id, 'pending', ? FROM events WHERE id > ? AND id <= ? "
                 f"AND type IN ({','.join('?' * len(hook.types))}) ON CONFLICT DO NOTHING",
                 (hook.webhook_id, now_s, after, last, *hook.types))
    conn.execute("UPDATE event_fanout SET after_id = ? WHERE webhook_id = ?", (last, hook.webhook_id))
    return seen


def _fan_out_queue(conn, hooks: list[Hook], limit: int, now_s: float) -> int:
    # SKIP LOCKED: a second process fanning out at the same moment (the jobs' lock changing
    # hands) takes other rows rather than waiting. A queue row not committed yet is not seen,
    # and is taken by a later round once it is. With no webhook configured the rows are
    # taken all the same, so the queue stays short and its events may be purged.
    claimed = [r[0] for r in conn.execute(
        "DELETE FROM event_fanout_pending WHERE event_id IN (SELECT event_id FROM event_fanout_pending "
        "ORDER BY event_id LIMIT ? FOR UPDATE SKIP LOCKED) RETURNING event_id", (limit,))]
    if not claimed:
        return 0
    ids = _JSON.encode(claimed)
    for hook in hooks:
        conn.execute(f"INSERT INTO event_deliveries (webhook_id, event_id, member_id, state, next_attempt_at) "
                     f"SELECT ?, e.id, e.member_id, 'pending', ? FROM {json_ids(conn)} j "
                     f"JOIN events e ON e.id = j.value WHERE e.type IN ({','.join('?' * len(hook.types))}) "
                     "ON CONFLICT DO NOTHING",
                     (hook.webhook_id, now_s, ids, *hook.types))
    return len(claimed)


class Due(NamedTuple):
    event_id: int
    attempts: int
    first_attempt_at: float | None
    event: dict


def due(conn: sqlite3.Connection, webhook_id: str, now_s: float, limit: int) -> list[Due]:
    """Each member's oldest pending event for the webhook, when its next attempt is due: a later
    event of a member waits until the one before it was delivered or went dead."""
    rows = conn.execute(
        f"SELECT d.event_id, d.attempts, d.first_attempt_at, {_EVENT_COLUMNS} FROM event_deliveries d "
        "JOIN events e ON e.id = d.event_id "
        "WHERE d.webhook_id = ? AND d.state = 'pending' AND d.next_attempt_at <= ? AND d.event_id = "
        "(SELECT MIN(h.event_id) FROM event_deliveries h WHERE h.webhook_id = d.webhook_id "
        "AND h.member_id = d.member_id AND h.state = 'pending') ORDER BY d.event_id LIMIT ?",
        (webhook_id, now_s, limit)).fetchall()
    return [Due(r[0], r[1], r[2], as_json(r[3:])) for r in rows]


def next_due(conn: sqlite3.Connection, webhook_id: str) -> float | None:
    return conn.execute("SELECT MIN(next_attempt_at) FROM event_deliveries WHERE webhook_id = ? "
                        "AND state = 'pending'", (webhook_id,)).fetchone()[0]


class Outcome(NamedTuple):
    webhook_id: str
    event_id: int
    state: str                  # delivered (the row goes), pending (to retry), dead
    attempts: int
    first_attempt_at: float
    next_attempt_at: float
    error: str | None
    done_at: float | None


def record(conn: sqlite3.Connection, outcomes: list[Outcome]) -> None:
    """A delivered event's row goes (the event itself stays for the retention period), so the
    table holds only what is still owed: pending and dead. Only a pending row changes."""
    conn.executemany("DELETE FROM event_deliveries WHERE webhook_id = ? AND event_id = ? AND state = 'pending'",
                     [(o.webhook_id, o.event_id) for o in outcomes if o.state == "delivered"])
    conn.executemany(
        "UPDATE event_deliveries SET state = ?, attempts = ?, first_attempt_at = ?, next_attempt_at = ?, "
        "last_error = ?, done_at = ? WHERE webhook_id = ? AND event_id = ? AND state = 'pending'",
        [(o.state, o.attempts, o.first_attempt_at, o.next_attempt_at, o.error, o.done_at, o.webhook_id, o.event_id)
         for o in outcomes if o.state != "delivered"])


def counts(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
    """Pending and dead deliveries by (webhook, state)."""
    return {(w, s): n for w, s, n in conn.execute(
        "SELECT webhook_id, state, COUNT(*) FROM event_deliveries GROUP BY webhook_id, state")}


def queue_after_cursors(conn) -> int:
    """PostgreSQL: the fan-out's queue for events copied from a SQLite database (whose rows
    went in with the queue's trigger off): every event after the lowest webhook cursor, which
    SQLite had not fanned out to every webhook yet. A webhook further along may get some of
    them a second time, which delivery at least once allows. How many were queued."""
    return conn.execute("INSERT INTO event_fanout_pending (event_id) SELECT id FROM events "
                        "WHERE id > (SELECT MIN(after_id) FROM event_fanout) ON CONFLICT DO NOTHING").rowcount


def not_fanned_out(conn: sqlite3.Connection, webhook_id: str, limit: int = -1) -> int:
    """Events the webhook has not been given delivery rows for yet (at most `limit`; -1: all):
    after its cursor on SQLite, in the fan-out's queue on PostgreSQL."""
    bound, args = (" LIMIT ?", (limit,)) if limit >= 0 else ("", ())
    if is_postgresql(conn):
        return conn.execute(f"SELECT COUNT(*) FROM (SELECT 1 FROM event_fanout_pending{bound}) AS q",
                            args).fetchone()[0]
    return conn.execute("SELECT COUNT(*) FROM (SELECT 1 FROM events WHERE id > (SELECT after_id FROM event_fanout "
                        f"WHERE webhook_id = ?){bound}) AS e", (webhook_id, *args)).fetchone()[0]


def fan_out_owed(conn: sqlite3.Connection, webhook_ids: list[str]) -> bool:
    """Whether the fan-out has anything to do: an event after some webhook's cursor (SQLite),
    any event in the queue (PostgreSQL, where it is emptied with no webhook configured too)."""
    if is_postgresql(conn):
        return conn.execute("SELECT EXISTS (SELECT 1 FROM event_fanout_pending)").fetchone()[0]
    return any(not_fanned_out(conn, w, limit=1) for w in webhook_ids)


def any_written_before(conn: sqlite3.Connection, before: datetime) -> bool:
    row = conn.execute("SELECT created_at FROM events ORDER BY id LIMIT 1").fetchone()
    return row is not None and row[0] < iso(before)


def purge(conn: sqlite3.Connection, before: datetime, webhook_ids: list[str], limit: int) -> int:
    """Deletes up to `limit` events written before `before`, oldest first, that the configured
    webhooks have all fanned out (past every cursor on SQLite, out of the queue on PostgreSQL)
    and none still has to send (pending or dead), with their delivery rows (a webhook removed
    from the config holds nothing back). How many went."""
    marks = ",".join("?" * len(webhook_ids))
    queued = is_postgresql(conn)
    fanned = conn.execute(f"SELECT MIN(after_id) FROM event_fanout WHERE webhook_id IN ({marks})",
                          webhook_ids).fetchone()[0] if webhook_ids and not queued else None
    # Only below the first id written at `before`, so the walk never reads the recent events;
    # and below the newest event, which stays so that the next id is still one more than it.
    bound = min(_first_id_written_at(conn, iso(before)), conn.execute("SELECT MAX(id) FROM events").fetchone()[0] or 0)
    if fanned is not None:
        bound = min(bound, fanned + 1)
    # PostgreSQL refuses an empty IN list (no webhook configured): then nothing is owed.
    owed = (f" AND NOT EXISTS (SELECT 1 FROM event_deliveries d WHERE d.event_id = e.id "
            f"AND d.webhook_id IN ({marks}))") if webhook_ids else ""
    if queued:
        owed += " AND NOT EXISTS (SELECT 1 FROM event_fanout_pending q WHERE q.event_id = e.id)"
    ids = [(r[0],) for r in conn.execute(f"SELECT e.id FROM events e WHERE e.id < ? AND e.created_at < ?{owed} "
                                         "ORDER BY e.id LIMIT ?", (bound, iso(before), *webhook_ids, limit))]
    conn.executemany("DELETE FROM event_deliveries WHERE event_id = ?", ids)
    conn.executemany("DELETE FROM events WHERE id = ?", ids)
    return len(ids)


def _first_id_written_at(conn: sqlite3.Connection, moment: str) -> int:
    """The first event id whose created_at is `moment` or later (ids grow with time): a binary
    search over rowids, as events has no index on created_at (it would cost every receipt)."""
    lo, hi = conn.execute("SELECT MIN(id), MAX(id) + 1 FROM events").fetchone()
    if lo is None:
        return 0
    while lo < hi:
        mid = (lo + hi) // 2
        row = conn.execute("SELECT created_at FROM events WHERE id >= ? ORDER BY id LIMIT 1", (mid,)).fetchone()
        if row is not None and row[0] < moment:
            lo = mid + 1
        else:
            hi = mid
    return lo


def retry_dead(conn: sqlite3.Connection, webhook_id: str | None, event_id: int | None) -> int:
    """Dead deliveries back to pending, due at once with a fresh retry period; how many."""
    where, args = ["state = 'dead'"], []
    if webhook_id is not None:
        where.append("webhook_id = ?")
        args.append(webhook_id)
    if event_id is not None:
        where.append("event_id = ?")
        args.append(event_id)
    return conn.execute(f"UPDATE event_deliveries SET state = 'pending', attempts = 0, first_attempt_at = NULL, "
                        f"next_attempt_at = 0, done_at = NULL WHERE {' AND '.join(where)}", args).rowcount
