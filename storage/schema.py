"""The database schema as an ordered list of migrations (applied once each, in order).

Postings are the ledger: append-only, enforced by triggers; a correction is a new
posting. Each posting is a balanced transfer between a member's account and one
counter account (storage/accounts.py), so the accounts always sum to zero, and it
carries a SHA-256 chained to the posting before it, so an edited row is detectable. A lot is a parcel of points with one activation date and one expiry date; its
remaining points are the sum of the postings that name it (kept in lots.remaining since m013). A
receipt's accrual is one posting per lot, split by rule in posting_rules (m030; one posting
per rule before), and what each rule has issued is its posting_rules points plus its reversal
postings (kept in rule_totals since m016; by triggers until m032, since by storage/ledger.py's
posting writers once per batch). Receipts, holds and the counters for rule limits are working state beside the ledger.
"""
import hashlib
import re

import msgspec
from sqlite_utils.migrations import Migrations

from storage import ledger, line_records

migrations = Migrations("loyalty")


def _run(db, script: str) -> None:
    for statement in script.split(";\n"):
        if statement.strip():
            db.execute(statement)


@migrations()
def m001_core(db):
    _run(db, """
CREATE TABLE members (
    id INTEGER PRIMARY KEY,
    phone TEXT,
    birthday TEXT,
    tags TEXT NOT NULL DEFAULT '[]',
    referred_by INTEGER REFERENCES members(id),
    enrolled_at TEXT NOT NULL,
    enrolled_store TEXT,
    manual_tier TEXT,
    manual_tier_until TEXT,
    updated_at TEXT NOT NULL
);
CREATE TABLE cards (
    card TEXT PRIMARY KEY,
    member_id INTEGER NOT NULL REFERENCES members(id),
    created_at TEXT NOT NULL
);
CREATE INDEX cards_member ON cards(member_id);
CREATE TABLE receipts (
    store_id TEXT NOT NULL,
    register_id TEXT NOT NULL,
    receipt_id TEXT NOT NULL,
    body_sha256 TEXT NOT NULL,
    member_id INTEGER REFERENCES members(id),
    ts TEXT NOT NULL,
    local_date TEXT NOT NULL,
    total INTEGER NOT NULL,
    rules_version TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('confirmed', 'cancelled')),
    body BLOB NOT NULL,
    result BLOB NOT NULL,
    detail BLOB NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (store_id, register_id, receipt_id)
) WITHOUT ROWID;
CREATE INDEX receipts_member ON receipts(member_id, ts);
CREATE TABLE lots (
    id INTEGER PRIMARY KEY,
    member_id INTEGER NOT NULL REFERENCES members(id),
    available_from TEXT NOT NULL,
    expires_on TEXT,
    created_at TEXT NOT NULL,
    -- Set by the expiry job once it has dealt with the lot, so later runs skip it.
    expiry_done INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX lots_member ON lots(member_id);
CREATE TABLE postings (
    id INTEGER PRIMARY KEY,
    member_id INTEGER NOT NULL REFERENCES members(id),
    lot_id INTEGER NOT NULL REFERENCES lots(id),
    kind TEXT NOT NULL CHECK (kind IN ('accrual', 'redemption', 'reversal', 'refund',
                                       'adjustment', 'event', 'expiry', 'repayment')),
    points INTEGER NOT NULL,
    counter_account TEXT NOT NULL,
    effective_at TEXT NOT NULL,
    created_at TEXT NOT NULL,
    rule_id TEXT,
    rules_version TEXT,
    store_id TEXT,
    register_id TEXT,
    receipt_id TEXT,
    ref TEXT,
    key_id TEXT,
    note TEXT,
    hash TEXT NOT NULL
);
CREATE INDEX postings_member ON postings(member_id, id);
CREATE INDEX postings_lot ON postings(lot_id);
CREATE INDEX postings_counter ON postings(counter_account, effective_at);
CREATE INDEX lots_expiry ON lots(expires_on) WHERE expiry_done = 0 AND expires_on IS NOT NULL;
CREATE INDEX postings_receipt ON postings(store_id, register_id, receipt_id) WHERE receipt_id IS NOT NULL;
CREATE TRIGGER postings_append_only_update BEFORE UPDATE ON postings
BEGIN SELECT RAISE(ABORT, 'postings are append-only: post a correction instead'); END;
CREATE TRIGGER postings_append_only_delete BEFORE DELETE ON postings
BEGIN SELECT RAISE(ABORT, 'postings are append-only: post a correction instead'); END;
CREATE TABLE holds (
    store_id TEXT NOT NULL,
    register_id TEXT NOT NULL,
    receipt_id TEXT NOT NULL,
    member_id INTEGER NOT NULL REFERENCES members(id),
    points INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('open', 'consumed', 'released')),
    closed_at TEXT,
    PRIMARY KEY (store_id, register_id, receipt_id)
) WITHOUT ROWID;
CREATE INDEX holds_member_open ON holds(member_id) WHERE status = 'open';
CREATE TABLE returns (
    store_id TEXT NOT NULL,
    register_id TEXT NOT NULL,
    return_id TEXT NOT NULL,
    body_sha256 TEXT NOT NULL,
    receipt_store TEXT NOT NULL,
    receipt_register TEXT NOT NULL,
    receipt_id TEXT NOT NULL,
    member_id INTEGER,
    result BLOB NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (store_id, register_id, return_id)
) WITHOUT ROWID;
CREATE TABLE return_lines (
    receipt_store TEXT NOT NULL,
    receipt_register TEXT NOT NULL,
    receipt_id TEXT NOT NULL,
    line_no INTEGER NOT NULL,
    return_store TEXT NOT NULL,
    return_register TEXT NOT NULL,
    return_id TEXT NOT NULL,
    qty TEXT NOT NULL,
    amount INTEGER NOT NULL,
    points_reversed INTEGER NOT NULL,
    points_refunded INTEGER NOT NULL,
    discount_refunded INTEGER NOT NULL,
    by_rule BLOB NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX return_lines_receipt ON return_lines(receipt_store, receipt_register, receipt_id, line_no);
CREATE TABLE adjustments (
    adjustment_id TEXT PRIMARY KEY,
    body_sha256 TEXT NOT NULL,
    member_id INTEGER NOT NULL REFERENCES members(id),
    points INTEGER NOT NULL,
    reason TEXT NOT NULL,
    key_id TEXT NOT NULL,
    result BLOB NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE rule_fires (
    member_id INTEGER NOT NULL,
    rule_id TEXT NOT NULL,
    local_date TEXT NOT NULL,
    store_id TEXT NOT NULL,
    register_id TEXT NOT NULL,
    receipt_id TEXT NOT NULL
);
CREATE INDEX rule_fires_member ON rule_fires(member_id, rule_id, local_date);
CREATE INDEX rule_fires_receipt ON rule_fires(store_id, register_id, receipt_id);
CREATE TABLE event_fires (
    member_id INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    occasion TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (member_id, event_id, occasion)
) WITHOUT ROWID
""")


@migrations()
def m010_audit_log(db):
    """Every admin request: who (key id), what (method, path, body digest), when, and its status.
    Append-only like postings; each row's hash covers the previous row's hash (storage/admin_audit.py)."""
    _run(db, """
CREATE TABLE audit_log (
    id INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
    key_id TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    body_digest TEXT NOT NULL,
    status INTEGER NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE
);
CREATE TRIGGER audit_log_append_only_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_log_append_only_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END
""")


@migrations()
def m011_personal_data(db):
    """Card numbers and phones as keyed HMACs: cards.card holds the card's HMAC from now on,
    members.phone is no longer written. Rows written before are converted at start-up,
    when the key is known (storage/personal.py)."""
    _run(db, """
ALTER TABLE cards ADD COLUMN card_last4 TEXT;
ALTER TABLE members ADD COLUMN phone_hmac TEXT;
ALTER TABLE members ADD COLUMN phone_last4 TEXT;
CREATE INDEX members_phone_hmac ON members(phone_hmac) WHERE phone_hmac IS NOT NULL;
CREATE INDEX cards_unprotected ON cards(card) WHERE card_last4 IS NULL;
CREATE INDEX members_phone_unprotected ON members(id) WHERE phone IS NOT NULL
""")


@migrations()
def m012_receipts_member_counts(db):
    # Tier and receipt-number reads count and sum a member's confirmed receipts on every
    # receipt; with (member_id, ts) alone each of those rows is looked up in the receipts
    # table, whose rows carry the stored bodies (kilobytes each). This index answers the
    # three queries of ledger.receipt_counts without touching the table.
    db.execute("CREATE INDEX IF NOT EXISTS receipts_member_counts ON receipts(member_id, status, ts, total)")


def _unhex(value):
    return bytes.fromhex(value) if isinstance(value, str) else value


@migrations()
def m013_compact_rows(db):
    """Fewer bytes per receipt and posting, for databases of many millions of members.

    - postings.hash and receipts.body_sha256 hold the 32 bytes of the digest, not 64 hex
      characters (the chain is still computed over the hex text: storage/ledger.posting_hash).
    - receipts is a rowid table: WITHOUT ROWID keeps at most ~1 KB of a row in its b-tree
      page and spills the rest of every receipt to overflow pages of its own (a mostly
      empty 4 KB page per receipt). Rows are appended in rowid order; the key is a unique
      index.
    - receipts.body (and .result, should that pay off one day) is JSON or its zlib stream
      (storage/ledger.pack); rows written before stay JSON, which readers take as well.
    - receipts.detail (what a return needs per line) is derived from body and result
      (server/returns.receipt_lines); it holds NULL, or the (rule, line_no, points) pairs as
      a JSON list when one receipt earned by several rules, or for rows written before this
      migration the whole per-line detail as a JSON object.
    - receipts_member (member_id, ts) is gone: every query that used it also asks for
      status = 'confirmed', which receipts_member_counts (member_id, status, ts, total) answers.
    - lots.remaining is the sum of the lot's postings, kept by storage/ledger.post in the
      same transaction (audit verify recomputes it), so the balance read on every receipt
      does not aggregate postings; lots.created_at is gone: it is the created_at of the
      lot's first posting.
    Rows are copied as they are (no re-compression), so a large database upgrades at the
    speed of a table copy."""
    db.conn.create_function("unhex_digest", 1, _unhex, deterministic=True)
    _run(db, """
DROP TRIGGER postings_append_only_update;
UPDATE postings SET hash = unhex_digest(hash) WHERE typeof(hash) = 'text';
CREATE TRIGGER postings_append_only_update BEFORE UPDATE ON postings
BEGIN SELECT RAISE(ABORT, 'postings are append-only: post a correction instead'); END;
CREATE TABLE receipts_compact (
    id INTEGER PRIMARY KEY,
    store_id TEXT NOT NULL,
    register_id TEXT NOT NULL,
    receipt_id TEXT NOT NULL,
    body_sha256 BLOB NOT NULL,
    member_id INTEGER REFERENCES members(id),
    ts TEXT NOT NULL,
    local_date TEXT NOT NULL,
    total INTEGER NOT NULL,
    rules_version TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('confirmed', 'cancelled')),
    body BLOB NOT NULL,
    result BLOB NOT NULL,
    detail BLOB,
    created_at TEXT NOT NULL
);
INSERT INTO receipts_compact (store_id, register_id, receipt_id, body_sha256, member_id, ts, local_date, total,
                              rules_version, status, body, result, detail, created_at)
SELECT store_id, register_id, receipt_id, unhex_digest(body_sha256), member_id, ts, local_date, total,
       rules_version, status, body, result, detail, created_at FROM receipts;
DROP TABLE receipts;
ALTER TABLE receipts_compact RENAME TO receipts;
CREATE UNIQUE INDEX receipts_key ON receipts(store_id, register_id, receipt_id);
CREATE INDEX receipts_member_counts ON receipts(member_id, status, ts, total);
ALTER TABLE lots DROP COLUMN created_at;
ALTER TABLE lots ADD COLUMN remaining INTEGER NOT NULL DEFAULT 0;
UPDATE lots SET remaining = t.points FROM (SELECT lot_id, SUM(points) AS points FROM postings GROUP BY lot_id) AS t
WHERE t.lot_id = lots.id
""")


@migrations()
def m014_returns_member(db):
    # Tier reads subtract a member's returned amounts on every receipt; found from the
    # member's returns (usually none) instead of from each of their receipts' rows.
    db.execute("CREATE INDEX IF NOT EXISTS returns_member ON returns(member_id) WHERE member_id IS NOT NULL")


@migrations()
def m015_hot_lookups(db):
    """One page per look-up on the receipt path, for databases far larger than memory.

    - cards is keyed by the card's HMAC itself (WITHOUT ROWID): card -> member is one
      b-tree search instead of an index search and then a table row, and the separate
      index holding every HMAC a second time is gone.
    - lots_live covers the member's lots with points left (remaining != 0): balances read
      that index alone, not one lots row (on a page of its own) per lot. Spent and expired
      lots leave it. lots_member goes: the past (?at=) is found from postings_member."""
    _run(db, """
CREATE TABLE cards_by_card (
    card TEXT PRIMARY KEY,
    member_id INTEGER NOT NULL REFERENCES members(id),
    created_at TEXT NOT NULL,
    card_last4 TEXT
) WITHOUT ROWID;
INSERT INTO cards_by_card (card, member_id, created_at, card_last4)
SELECT card, member_id, created_at, card_last4 FROM cards ORDER BY card;
DROP TABLE cards;
ALTER TABLE cards_by_card RENAME TO cards;
CREATE INDEX cards_member ON cards(member_id);
CREATE INDEX cards_unprotected ON cards(card) WHERE card_last4 IS NULL;
DROP INDEX lots_member;
CREATE INDEX lots_live ON lots(member_id, id, available_from, expires_on, remaining) WHERE remaining != 0
""")


@migrations()
def m016_rule_totals(db):
    """Points each rule has issued, net of returns, for campaign budgets.

    - rule_totals holds one row per rule: the sum of its accrual and reversal postings.
      Budgets read it at start-up and after a program reload, one b-tree search per
      rule, where summing postings by rule_id scans the whole ledger (minutes at
      millions of members).
    - An AFTER INSERT trigger on postings keeps it, inside the posting's own
      transaction, so every writer (receipts, returns, jobs, the CLI, generated data)
      keeps it right without a Python round-trip per posting. Postings are append-only,
      so inserts are the only change to follow. audit verify recomputes it.
    Filling it reads the postings once, at the upgrade."""
    _run(db, """
CREATE TABLE rule_totals (
    rule_id TEXT PRIMARY KEY,
    points INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO rule_totals (rule_id, points)
SELECT rule_id, SUM(points) FROM postings
WHERE rule_id IS NOT NULL AND kind IN ('accrual', 'reversal') GROUP BY rule_id;
CREATE TRIGGER postings_rule_totals AFTER INSERT ON postings
WHEN NEW.rule_id IS NOT NULL AND NEW.kind IN ('accrual', 'reversal')
BEGIN INSERT INTO rule_totals (rule_id, points) VALUES (NEW.rule_id, NEW.points)
      ON CONFLICT (rule_id) DO UPDATE SET points = points + excluded.points; END
""")


@migrations()
def m017_members_manual_tier(db):
    # A program reload counts the members whose manual tier it no longer defines: read from
    # the few members with a manual tier, not from every member's row.
    db.execute("CREATE INDEX IF NOT EXISTS members_manual_tier ON members(manual_tier, manual_tier_until) "
               "WHERE manual_tier IS NOT NULL")


@migrations()
def m018_person_keys(db):
    """Keys of people, added with `loyalty keys add` beside the keys of config.yaml.

    - api_keys: one row per key ever added, never deleted; revoking sets revoked_at once. The
      key itself is never stored, only its SHA-256 (as config.yaml stores its keys). Ids are
      person-<seq> and never reused, so a key id in the ledger or the audit log names one
      person for good.
    - config_key_names: the names config.yaml gives its keys, rewritten at each start, so the
      records below can name a config key's holder too.
    - adjustments.key_name: who made the adjustment, copied by a trigger from the key's row
      when the adjustment is written, so renaming a config key later does not rewrite history.
    - audit_log.key_name: who made the admin request (storage/admin_audit.py)."""
    _run(db, """
CREATE TABLE api_keys (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('register', 'manager', 'support', 'monitor')),
    stores TEXT NOT NULL DEFAULT '[]',
    sha256 TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    created_by TEXT NOT NULL,
    revoked_at TEXT,
    revoked_by TEXT
);
CREATE TRIGGER api_keys_keep_rows BEFORE DELETE ON api_keys
BEGIN SELECT RAISE(ABORT, 'keys are revoked, never deleted: loyalty keys revoke ID'); END;
CREATE TRIGGER api_keys_revoke_only BEFORE UPDATE ON api_keys
WHEN OLD.revoked_at IS NOT NULL OR NEW.revoked_at IS NULL OR NEW.seq IS NOT OLD.seq OR NEW.id IS NOT OLD.id
  OR NEW.name IS NOT OLD.name OR NEW.role IS NOT OLD.role OR NEW.stores IS NOT OLD.stores
  OR NEW.sha256 IS NOT OLD.sha256 OR NEW.created_at IS NOT OLD.created_at OR NEW.created_by IS NOT OLD.created_by
BEGIN SELECT RAISE(ABORT, 'a key can only be revoked, once'); END;
CREATE TABLE config_key_names (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL
) WITHOUT ROWID;
ALTER TABLE adjustments ADD COLUMN key_name TEXT;
CREATE TRIGGER adjustments_key_name AFTER INSERT ON adjustments WHEN NEW.key_name IS NULL
BEGIN UPDATE adjustments SET key_name = COALESCE(
        (SELECT name FROM api_keys WHERE id = NEW.key_id),
        (SELECT name FROM config_key_names WHERE id = NEW.key_id))
      WHERE adjustment_id = NEW.adjustment_id; END;
ALTER TABLE audit_log ADD COLUMN key_name TEXT
""")


@migrations()
def m019_console(db):
    """What the manager's console reads and records.

    - receipts_day: a day's receipts in time order (today's count on the dashboard, the
      receipts of a period replayed by a backtest, page by page) without reading every receipt.
    - audit_log.detail: what an action was for, in the words of the person who did it (a
      deploy's reason, an adjustment's); the row's hash covers it when present."""
    db.execute("CREATE INDEX IF NOT EXISTS receipts_day ON receipts(local_date, ts)")
    db.execute("ALTER TABLE audit_log ADD COLUMN detail TEXT")


@migrations()
def m020_program_versions(db):
    """Every program that went live, so each server on the database serves the newest and any
    can go back to an earlier one.

    - program_versions: one row per distinct program (its version hash), with its files as
      the JSON object {relative path: text}, enough to load it again without its folder.
    - program_loads: one row each time a version went live (loaded from the folder, deployed,
      rolled back), who did it and why; the row with the highest id is what is served.
    Both are append-only like the audit log: history that can be rewritten proves nothing."""
    _run(db, """
CREATE TABLE program_versions (
    version TEXT PRIMARY KEY,
    program_id TEXT NOT NULL,
    files BLOB NOT NULL,
    recorded_at TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE program_loads (
    id INTEGER PRIMARY KEY,
    version TEXT NOT NULL REFERENCES program_versions(version),
    loaded_at TEXT NOT NULL,
    source TEXT NOT NULL,
    deployed_by TEXT,
    reason TEXT
);
CREATE INDEX program_loads_version ON program_loads(version, id);
CREATE TRIGGER program_versions_append_only_update BEFORE UPDATE ON program_versions
BEGIN SELECT RAISE(ABORT, 'program versions are append-only'); END;
CREATE TRIGGER program_versions_append_only_delete BEFORE DELETE ON program_versions
BEGIN SELECT RAISE(ABORT, 'program versions are append-only'); END;
CREATE TRIGGER program_loads_append_only_update BEFORE UPDATE ON program_loads
BEGIN SELECT RAISE(ABORT, 'program loads are append-only'); END;
CREATE TRIGGER program_loads_append_only_delete BEFORE DELETE ON program_loads
BEGIN SELECT RAISE(ABORT, 'program loads are append-only'); END
""")


@migrations()
def m021_program_loads_names(db):
    """program_loads.deployed_by_name: the person behind the key that put a version live, kept
    as it was then (like adjustments.key_name), so a key renamed later does not rewrite who did it."""
    db.execute("ALTER TABLE program_loads ADD COLUMN deployed_by_name TEXT")


@migrations()
def m022_imported_receipts(db):
    """Receipts of the history before the program, brought in by `loyalty import receipts`.

    They are stored in receipts as confirmed (tiers, receipt numbers and every count of a
    member's receipts take them as they are) with no postings; this table marks them, so a
    return or a cancel of one is refused (storage/imports.py), and says where each came from."""
    _run(db, """
CREATE TABLE imported_receipts (
    store_id TEXT NOT NULL,
    register_id TEXT NOT NULL,
    receipt_id TEXT NOT NULL,
    imported_at TEXT NOT NULL,
    source TEXT NOT NULL,
    line INTEGER NOT NULL,
    PRIMARY KEY (store_id, register_id, receipt_id)
) WITHOUT ROWID
""")


def _line_records_of(body, result, detail, lots) -> bytes:
    lot_of_rule = {rule: int(lot) for rule, lot in msgspec.json.decode(lots).items()} if lots else {}
    return line_records.encode(line_records.from_stored(ledger.unpack(body), ledger.unpack(result), detail,
                                                        lot_of_rule))


@migrations()
def m023_line_records(db):
    """receipts.lines: each receipt's typed line records (storage/line_records.py), which
    returns and cancels read instead of deriving them from the stored body and answer.

    Rows written before get theirs from what was stored then (body, answer, detail) and the
    lot of each rule's accrual posting; receipts.detail is emptied, nothing reads it any
    more. Every receipt is decoded once in Python: a database of millions of receipts
    upgrades at some tens of thousands of receipts a second."""
    db.conn.create_function("line_records_of", 4, _line_records_of, deterministic=True)
    _run(db, """
ALTER TABLE receipts ADD COLUMN lines BLOB;
UPDATE receipts SET detail = NULL, lines = line_records_of(body, result, detail,
    (SELECT json_group_object(p.rule_id, p.lot_id) FROM postings p
     WHERE p.store_id = receipts.store_id AND p.register_id = receipts.register_id
       AND p.receipt_id = receipts.receipt_id AND p.kind = 'accrual' AND p.rule_id IS NOT NULL))
""")


@migrations()
def m024_events(db):
    """The outbox of events for webhooks and the warehouse (storage/events.py).

    - events: written in the transaction of the change they announce, so an event exists exactly
      when its change was committed; once_key makes an event that a job may look at twice (a
      lot's points.expiring) one row. Every receipt writes one, so it has no index beyond the
      rowid and that partial one: ids only grow because the newest event is never deleted
      (AUTOINCREMENT would cost a write of sqlite_sequence per event), and the retention
      purge walks ids, as old as created_at.
    - event_deliveries: what is still owed, one row per event and webhook that wants it: pending
      until the receiver answered 2xx (then the row goes) or retrying ran out (dead); the
      partial index finds each member's oldest pending event, all that may be sent for that
      member. Kept this small, the backlog is counted every second.
    - event_fanout: per webhook, the last event id already given its delivery rows.
    - event_member_tiers: the tier last announced per member, to see a tier.changed."""
    _run(db, """
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    type TEXT NOT NULL,
    member_id INTEGER NOT NULL,
    card_last4 TEXT,
    occurred_at TEXT NOT NULL,
    data BLOB NOT NULL,
    once_key TEXT,
    created_at TEXT NOT NULL
);
CREATE UNIQUE INDEX events_once ON events(once_key) WHERE once_key IS NOT NULL;
CREATE TABLE event_deliveries (
    webhook_id TEXT NOT NULL,
    event_id INTEGER NOT NULL,
    member_id INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    first_attempt_at REAL,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    done_at REAL,
    PRIMARY KEY (webhook_id, event_id)
) WITHOUT ROWID;
CREATE INDEX event_deliveries_pending ON event_deliveries(webhook_id, member_id, event_id) WHERE state = 'pending';
CREATE INDEX event_deliveries_event ON event_deliveries(event_id);
CREATE TABLE event_fanout (
    webhook_id TEXT PRIMARY KEY,
    after_id INTEGER NOT NULL
);
CREATE TABLE event_member_tiers (
    member_id INTEGER PRIMARY KEY,
    tier TEXT NOT NULL
)
""")


# Posting kinds the CHECK of postings allows; m025 adds 'transfer' to it in place.
_POSTING_KINDS_CHECK = re.compile(r"(kind\s+IN\s*\()([^)]*)\)", re.IGNORECASE)


@migrations()
def m025_member_care(db):
    """Member care and CRM fields.

    - members: the CRM's own id for the member (crm_id, unique when set), consent per channel
      (0 until granted), merged_into (the member a merge moved this one's points to) and
      erased_at (personal data erased on request; the row and its ledger stay).
    - retired_cards: cards taken out of use by a replacement or a merge, still keyed by their
      HMAC so a register presenting one is told what happened instead of `unknown_card`.
      An erasure deletes them with the member's cards.
    - member_merges: one row per merge, idempotent by its id like adjustments.
    - postings.kind gains 'transfer': points moved between two members' accounts (a merge).
      The CHECK only loosens, so no row changes: the table's stored SQL is edited in place
      (SQLite's documented procedure for such changes), where rebuilding the table would copy
      every posting.
    - privacy_keys: each HMAC key the card and phone hashes were made or wrapped with, in
      order (id "" is the first key), with a check value (an HMAC of a fixed text, which does
      not give the key back): a server whose keys do not start with these refuses to start,
      where it used to find no card at all, and `loyalty privacy rotate-key` wraps nothing
      under a key the serving server has not taken up."""
    _run(db, """
ALTER TABLE members ADD COLUMN crm_id TEXT;
ALTER TABLE members ADD COLUMN consent_sms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE members ADD COLUMN consent_viber INTEGER NOT NULL DEFAULT 0;
ALTER TABLE members ADD COLUMN consent_email INTEGER NOT NULL DEFAULT 0;
ALTER TABLE members ADD COLUMN consent_push INTEGER NOT NULL DEFAULT 0;
ALTER TABLE members ADD COLUMN consent_updated_at TEXT;
ALTER TABLE members ADD COLUMN merged_into INTEGER REFERENCES members(id);
ALTER TABLE members ADD COLUMN erased_at TEXT;
CREATE UNIQUE INDEX members_crm_id ON members(crm_id) WHERE crm_id IS NOT NULL;
CREATE INDEX members_merged_into ON members(merged_into) WHERE merged_into IS NOT NULL;
CREATE TABLE retired_cards (
    card TEXT PRIMARY KEY,
    member_id INTEGER NOT NULL REFERENCES members(id),
    card_last4 TEXT,
    reason TEXT NOT NULL CHECK (reason IN ('replaced', 'merged')),
    successor TEXT NOT NULL,
    retired_at TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX retired_cards_member ON retired_cards(member_id);
CREATE TABLE member_merges (
    merge_id TEXT PRIMARY KEY,
    body_sha256 TEXT NOT NULL,
    from_member INTEGER NOT NULL REFERENCES members(id),
    into_member INTEGER NOT NULL REFERENCES members(id),
    result BLOB NOT NULL,
    key_id TEXT NOT NULL,
    created_at TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE privacy_keys (
    position INTEGER PRIMARY KEY,
    key_id TEXT NOT NULL UNIQUE,
    check_value TEXT NOT NULL,
    recorded_at TEXT NOT NULL
)
""")
    _allow_posting_kind(db.conn, "transfer")


def _allow_posting_kind(conn, kind: str) -> None:
    sql = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'postings'").fetchone()[0]
    match = _POSTING_KINDS_CHECK.search(sql)
    if match is None or f"'{kind}'" in match.group(2):
        return
    widened = sql[:match.end(2)] + f", '{kind}'" + sql[match.end(2):]
    version = conn.execute("PRAGMA schema_version").fetchone()[0]
    conn.execute("PRAGMA writable_schema = ON")
    try:
        conn.execute("UPDATE sqlite_master SET sql = ? WHERE type = 'table' AND name = 'postings'", (widened,))
        conn.execute(f"PRAGMA schema_version = {int(version) + 1}")
    finally:
        conn.execute("PRAGMA writable_schema = OFF")


@migrations()
def m026_segments_offers_coupons(db):
    """Customer value management: RFM scores, list segments, personal offers, coupon codes.

    - rfm_runs/rfm_scores: each run of the RFM job writes its scores under its own run id
      and is marked finished last, so a receipt always reads one whole run (the newest
      finished one) while the next is being written; older runs are deleted afterwards.
    - segment_members: the members of `list` segments (rfm segments are read from scores).
    - offers/offer_members: an offer is resolved to its members when it is assigned; each
      member's row carries the offer's dates and budget; offer_charges say which receipt
      used how much of it, so a cancel gives it back.
    - coupon_codes: a code is kept as its HMAC (like cards), with its uses so far;
      coupon_uses names the receipt that used it, so a cancel or a full return gives it back.
    - holdout_points: what a rule would have given a member of its control group."""
    _run(db, """
CREATE TABLE rfm_runs (
    id INTEGER PRIMARY KEY,
    local_date TEXT NOT NULL,
    window_days INTEGER NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    members_scored INTEGER
);
CREATE TABLE rfm_scores (
    run_id INTEGER NOT NULL,
    member_id INTEGER NOT NULL,
    r INTEGER NOT NULL CHECK (r BETWEEN 1 AND 5),
    f INTEGER NOT NULL CHECK (f BETWEEN 1 AND 5),
    m INTEGER NOT NULL CHECK (m BETWEEN 1 AND 5),
    recency_days INTEGER NOT NULL,
    receipts INTEGER NOT NULL,
    spend INTEGER NOT NULL,
    PRIMARY KEY (run_id, member_id)
) WITHOUT ROWID;
CREATE TABLE segment_members (
    segment_id TEXT NOT NULL,
    member_id INTEGER NOT NULL REFERENCES members(id),
    added_at TEXT NOT NULL,
    PRIMARY KEY (segment_id, member_id)
) WITHOUT ROWID;
CREATE INDEX segment_members_member ON segment_members(member_id);
CREATE TABLE offers (
    offer_id TEXT PRIMARY KEY,
    rule_id TEXT NOT NULL,
    body_sha256 TEXT NOT NULL,
    from_date TEXT NOT NULL,
    to_date TEXT NOT NULL,
    points INTEGER,
    members INTEGER NOT NULL,
    created_at TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE offer_members (
    member_id INTEGER NOT NULL REFERENCES members(id),
    offer_id TEXT NOT NULL REFERENCES offers(offer_id),
    rule_id TEXT NOT NULL,
    from_date TEXT NOT NULL,
    to_date TEXT NOT NULL,
    points INTEGER,
    points_used INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (member_id, offer_id)
) WITHOUT ROWID;
CREATE TABLE offer_charges (
    store_id TEXT NOT NULL,
    register_id TEXT NOT NULL,
    receipt_id TEXT NOT NULL,
    member_id INTEGER NOT NULL,
    offer_id TEXT NOT NULL,
    points INTEGER NOT NULL,
    PRIMARY KEY (store_id, register_id, receipt_id, offer_id)
) WITHOUT ROWID;
CREATE TABLE coupon_codes (
    code TEXT PRIMARY KEY,
    campaign TEXT NOT NULL,
    card TEXT,
    uses INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE coupon_uses (
    store_id TEXT NOT NULL,
    register_id TEXT NOT NULL,
    receipt_id TEXT NOT NULL,
    code TEXT NOT NULL REFERENCES coupon_codes(code),
    used_at TEXT NOT NULL,
    PRIMARY KEY (store_id, register_id, receipt_id, code)
) WITHOUT ROWID;
CREATE TABLE holdout_points (
    store_id TEXT NOT NULL,
    register_id TEXT NOT NULL,
    receipt_id TEXT NOT NULL,
    rule_id TEXT NOT NULL,
    member_id INTEGER NOT NULL,
    points INTEGER NOT NULL,
    PRIMARY KEY (store_id, register_id, receipt_id, rule_id)
) WITHOUT ROWID;
CREATE INDEX holdout_points_rule ON holdout_points(rule_id, member_id)
""")


@migrations()
def m027_receipt_member_facts(db):
    """receipt_member_facts: what the rules knew about the member of each confirmed receipt
    (storage/member_facts.py), written in the receipt's transaction, which backtests, `rules
    diff` and explanations of stored receipts replay it with. A table of its own, beside
    receipts: only backtests read it, a page at a time by the receipts' key. Receipts
    confirmed before have no row; nothing from then tells their segments, offers or codes."""
    db.execute("""
CREATE TABLE receipt_member_facts (
    store_id TEXT NOT NULL,
    register_id TEXT NOT NULL,
    receipt_id TEXT NOT NULL,
    facts BLOB NOT NULL,
    PRIMARY KEY (store_id, register_id, receipt_id)
) WITHOUT ROWID""")


def legacy_fingerprint(*fields) -> str:
    """What m031 keeps of a fingerprint taken before it of a body with card numbers in it: a
    digest of the row's own stored fields, which a retry of that row is compared by."""
    return LEGACY_FINGERPRINT + hashlib.sha256(msgspec.json.encode(list(fields))).hexdigest()


LEGACY_FINGERPRINT = "m031:"      # never a hex digit: not a fingerprint taken since


@migrations()
def m028_segment_spans(db):
    """Segment membership with the time it held, for receipts and for reports on past dates.

    - segment_spans: one row per stretch a member was in a segment, from valid_from to
      valid_to (instants; NULL: still in it). The daily job writes the `rfm` and `when`
      segments' spans under its run ids (from_run, to_run): a receipt reads the spans the
      newest finished run leaves open, so a run being written is never half seen. A `list`
      segment's spans (no run) are written as members are added and removed.
    - rfm_runs.definitions_sha256: the computed segments a run evaluated; a program that
      changes them makes the job due again the same day.
    The `list` members of before start their spans when they were added. The computed
    segments start empty: the job after the upgrade (the server runs it at start) fills them."""
    _run(db, """
CREATE TABLE segment_spans (
    id INTEGER PRIMARY KEY,
    segment_id TEXT NOT NULL,
    member_id INTEGER NOT NULL REFERENCES members(id),
    valid_from TEXT NOT NULL,
    valid_to TEXT,
    from_run INTEGER,
    to_run INTEGER
);
CREATE INDEX segment_spans_member ON segment_spans(member_id);
CREATE INDEX segment_spans_segment ON segment_spans(segment_id, valid_from);
CREATE UNIQUE INDEX segment_spans_open ON segment_spans(segment_id, member_id, from_run IS NULL)
    WHERE valid_to IS NULL;
ALTER TABLE rfm_runs ADD COLUMN definitions_sha256 TEXT;
INSERT INTO segment_spans (segment_id, member_id, valid_from)
    SELECT segment_id, member_id, added_at FROM segment_members ORDER BY member_id
""")


@migrations()
def m029_events_crm(db):
    """events: the member's crm_id and consent per channel (a bit each, sms = 1, viber = 2,
    email = 4, push = 8) as they were when the event was written, so a CRM sends each
    message only where the member allowed it then. NULL consent: an event written before
    they were kept."""
    _run(db, """
ALTER TABLE events ADD COLUMN crm_id TEXT;
ALTER TABLE events ADD COLUMN consent INTEGER
""")


@migrations()
def m030_posting_rules(db):
    """One accrual posting per lot a receipt fills, its split by rule beside it.

    A receipt used to post one accrual per earning rule, each hashed into the chain, indexed
    four ways and counted by the rule_totals trigger; with many rules those postings were
    the largest part of a receipt's write. Now the posting is one per lot (rule_id names
    the rule only when it is the lot's one earner) and posting_rules holds what each rule
    put into it, one small row each.
    - posting_rules: (posting, rule, points), append-only like the postings. Filled here
      from the per-rule accrual postings written before, so every reader counts a rule's
      accruals from posting_rules alone, old receipts and new.
    - rule_totals counts accruals from posting_rules and reversals (still one per rule)
      from postings, each by its own trigger; the totals themselves do not change."""
    _run(db, """
CREATE TABLE posting_rules (
    posting_id INTEGER NOT NULL,
    rule_id TEXT NOT NULL,
    points INTEGER NOT NULL,
    PRIMARY KEY (posting_id, rule_id)
) WITHOUT ROWID;
INSERT INTO posting_rules (posting_id, rule_id, points)
SELECT id, rule_id, points FROM postings WHERE kind = 'accrual' AND rule_id IS NOT NULL;
CREATE TRIGGER posting_rules_append_only_update BEFORE UPDATE ON posting_rules
BEGIN SELECT RAISE(ABORT, 'posting_rules are append-only: post a correction instead'); END;
CREATE TRIGGER posting_rules_append_only_delete BEFORE DELETE ON posting_rules
BEGIN SELECT RAISE(ABORT, 'posting_rules are append-only: post a correction instead'); END;
DROP TRIGGER postings_rule_totals;
CREATE TRIGGER postings_rule_totals AFTER INSERT ON postings
WHEN NEW.rule_id IS NOT NULL AND NEW.kind = 'reversal'
BEGIN INSERT INTO rule_totals (rule_id, points) VALUES (NEW.rule_id, NEW.points)
      ON CONFLICT (rule_id) DO UPDATE SET points = points + excluded.points; END;
CREATE TRIGGER posting_rules_rule_totals AFTER INSERT ON posting_rules
BEGIN INSERT INTO rule_totals (rule_id, points) VALUES (NEW.rule_id, NEW.points)
      ON CONFLICT (rule_id) DO UPDATE SET points = points + excluded.points; END
""")


@migrations()
def m031_fingerprints_without_cards(db):
    """adjustments and offers: a fingerprint taken before this was an unkeyed SHA-256 of a
    body with card numbers in it, which trying every card number with the row's other
    fields would give back. The card-hash key is never in the database, so the body cannot
    be fingerprinted again as it is now (its cards replaced by their keyed hashes); each
    becomes a digest of what the row stores (legacy_fingerprint): an adjustment's id,
    member, points and reason; an offer's id, rule, dates and points. A retry of such a row
    is compared by those.

    Also the indexes `privacy rotate-key` reads coupon codes by: those bound to a card by
    the card's hash, and the uses of a code by the code."""
    conn = db.conn
    conn.execute("CREATE INDEX IF NOT EXISTS coupon_codes_card ON coupon_codes(card) WHERE card IS NOT NULL")
    conn.execute("CREATE INDEX IF NOT EXISTS coupon_uses_code ON coupon_uses(code)")
    adjustments = conn.execute("SELECT adjustment_id, member_id, points, reason FROM adjustments "
                               "WHERE body_sha256 NOT LIKE 'm031:%'").fetchall()
    conn.executemany("UPDATE adjustments SET body_sha256 = ? WHERE adjustment_id = ?",
                     [(legacy_fingerprint(a, m, p, r), a) for a, m, p, r in adjustments])
    offers = conn.execute("SELECT offer_id, rule_id, from_date, to_date, points FROM offers "
                          "WHERE body_sha256 NOT LIKE 'm031:%'").fetchall()
    conn.executemany("UPDATE offers SET body_sha256 = ? WHERE offer_id = ?",
                     [(legacy_fingerprint(o, r, f, t, p), o) for o, r, f, t, p in offers])


@migrations()
def m032_rule_totals_per_batch(db):
    """rule_totals is kept by storage/ledger.py (add_rule_totals), which writes every posting
    and split row, instead of triggers: a trigger ran an upsert per posting_rules row (and
    its WHEN per posting), and a batch of confirms now sums by rule and upserts each rule
    once. The totals themselves do not change; audit verify still recomputes them."""
    _run(db, """
DROP TRIGGER IF EXISTS posting_rules_rule_totals;
DROP TRIGGER IF EXISTS postings_rule_totals
""")


@migrations()
def m033_segment_spans_current(db):
    """A receipt reads its member's segments from the spans a reader takes as current (a list
    segment's open ones; a computed one's open, or closed by a run not finished yet), not from
    every span the member ever had (storage/segments.py current_spans).
    segment_spans_member_current is keyed by member, then to_run and valid_to, so each kind is
    one seek, and carries from_run and segment_id, so the rows come from the index alone. It
    replaces segment_spans_member (member_id alone), a prefix of it."""
    _run(db, """
CREATE INDEX segment_spans_member_current ON segment_spans(member_id, to_run, valid_to, from_run, segment_id);
DROP INDEX segment_spans_member
""")


# A trigger's body: segments_generation's row, with a new random value (m034).
NEW_GENERATION = ("BEGIN INSERT INTO segments_generation (id, value) VALUES (1, random())\n"
                  "    ON CONFLICT (id) DO UPDATE SET value = excluded.value; END")


@migrations()
def m034_segments_generation(db):
    """segments_generation: one row whose value is replaced by a random one whenever what
    readers take as current segment membership may change: by trigger when a run's row
    becomes (or stops being) a finished one, and by storage/segments.py's span writers (a
    list segment's members added or removed, spans of a run older than the newest finished
    one). Not by trigger on segment_spans: any trigger there makes SQLite keep a statement
    journal for each row the daily job writes (its first run on 200,000 members took some
    40 % more CPU). A server keeps members' segments in memory under the value it read with
    the member's row (storage/segments.py MembershipCache): another value means some
    membership may have changed, whichever connection or process wrote it, and what it kept
    is dropped. Random, not counted: a value read inside a transaction that was then rolled
    back never becomes current again, so nothing kept under it can be served later. No row
    until the first such write (none kept meanwhile): a new database stays empty, as
    `migrate sqlite-to-postgres` wants its target."""
    _run(db, f"""
CREATE TABLE segments_generation (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    value INTEGER NOT NULL
);
INSERT INTO segments_generation (id, value) SELECT 1, random()
    WHERE EXISTS (SELECT 1 FROM segment_spans) OR EXISTS (SELECT 1 FROM rfm_runs);
CREATE TRIGGER rfm_runs_generation_insert AFTER INSERT ON rfm_runs WHEN NEW.finished_at IS NOT NULL
{NEW_GENERATION};
CREATE TRIGGER rfm_runs_generation_update AFTER UPDATE ON rfm_runs
    WHEN OLD.finished_at IS NOT NEW.finished_at OR OLD.id IS NOT NEW.id
{NEW_GENERATION};
CREATE TRIGGER rfm_runs_generation_delete AFTER DELETE ON rfm_runs WHEN OLD.finished_at IS NOT NULL
{NEW_GENERATION}
""")


@migrations()
def m035_postings_lot_expiry(db):
    """postings_lot (every posting by its lot) goes: each index a receipt's posting goes into
    is one more B-tree page its COMMIT writes to the WAL, and what was read through it is
    answered otherwise. The expiry job reads a lot's points left from lots.remaining (exact,
    kept by every posting writer and checked by audit verify); a return reads what expiry
    took from a lot from postings_lot_expiry, which holds the expiry postings alone, which
    receipts never write. A balance at a past moment goes through postings_member as before."""
    _run(db, """
CREATE INDEX postings_lot_expiry ON postings(lot_id) WHERE kind = 'expiry';
DROP INDEX postings_lot
""")


@migrations()
def m036_member_facts_in_receipts(db):
    """A receipt's member facts (storage/member_facts.py) move from receipt_member_facts into
    its receipts row (receipts.member_facts). That table was keyed by the receipt's identity,
    so each receipt went into it at its register's place in the key order: a page (often
    two, when it split) of its own in every COMMIT, some 6 KiB of WAL a receipt even when ten
    shared a commit. As a column of the row, which is written anyway, it costs its ~40 bytes."""
    _run(db, """
ALTER TABLE receipts ADD COLUMN member_facts BLOB;
UPDATE receipts SET member_facts = f.facts FROM receipt_member_facts AS f
WHERE f.store_id = receipts.store_id AND f.register_id = receipts.register_id AND f.receipt_id = receipts.receipt_id;
DROP TABLE receipt_member_facts
""")


@migrations()
def m037_postings_receipt(db):
    """postings_receipt (a receipt's postings by its identity) goes: each register numbers
    its own receipts, so every receipt's postings went into it at a place of their own, a
    B-tree page (some 4 KiB of WAL) in every COMMIT even when ten receipts shared it. Every
    posting that carries a receipt's identity is its receipts row's member's (the receipt's
    own, and its cancel's and returns'), so a cancel and a return find a receipt's postings
    among its member's (postings_member); audit verify sums the postings by receipt in one
    pass. The campaign report's join of postings to receipts never used it."""
    _run(db, "DROP INDEX postings_receipt")


@migrations()
def m038_takes_in_receipts(db):
    """What a receipt took of coupon codes and personal offer budgets is written in its
    receipts row (receipts.takes, storage/receipt_takes.py) instead of a row of coupon_uses (and
    its index by code) and one of offer_charges, each keyed by the receipt's identity: a
    B-tree page of its own in every COMMIT (three for a receipt with a code and an offer),
    even when ten receipts shared it. The rows of receipts confirmed before stay where they
    are, and a give-back takes from both."""
    _run(db, "ALTER TABLE receipts ADD COLUMN takes BLOB")


@migrations()
def m039_stranded_customer_value(db):
    """Merges and card replacements made before they carried customer value along left
    personal offers and list-segment memberships on members merged away, and coupon codes
    bound to cards taken out of use; each goes where today's merge or replacement puts it
    (storage/stranded.py). Those rules are the live code's own, not a copy frozen here: a
    second set of them could only come to disagree with what merges do from now on."""
    from datetime import datetime, timezone

    from storage import stranded        # here: it imports storage.member_care, which imports this module
    stranded.repair(db.conn, datetime.now(timezone.utc))


@migrations()
def m040_erased_members(db):
    """members_erased: an offer to a segment passes over the erased members
    (storage/member_care.py reachable_holders), which were read by a scan of every member.
    Members erased by versions that left them on their list segments and kept their
    personal offers open leave the lists and have their offers end, as an erasure today
    does them (member_care.finish_older_erasures: the live code's own rules, as m039)."""
    from storage import member_care     # here: it imports this module
    _run(db, "CREATE INDEX members_erased ON members(id) WHERE erased_at IS NOT NULL")
    member_care.finish_older_erasures(db.conn)
