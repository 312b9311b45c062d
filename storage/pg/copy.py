"""A SQLite installation copied into an empty PostgreSQL database, for `loyalty migrate
sqlite-to-postgres` (server/migrate_cli.py), in the caller's one transaction: a copy that
fails, or does not verify, leaves the target as empty as it was.

Every table both schemas have is copied with COPY, its rows as SQLite stores them, read in
primary key order (rowid order for the tables without a key) a batch at a time, so memory
stays bounded whatever the size. What PostgreSQL keeps its own way is made from the rows:
- postings get their member's running number (chain_seq) and a hash chained to the
  member's previous posting, from SQLite's postings in id order (the order they were
  written in); chain_heads holds each member's last, and anchors then list every head;
- rule_totals are summed by rule and shard from the split by rule and the reversals, as
  the triggers would have kept them;
- the events SQLite had not fanned out to the webhooks yet are queued for the fan-out.
The tables' own triggers are off while their rows are copied (a copied adjustment keeps
the key_name it was written with, the totals are summed once instead of row by row), on
again before the transaction ends. Identity columns continue after the highest id copied.
"""
from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import datetime

from storage import events
from storage.ledger import GENESIS_HASH, HASHED_SELECT, posting_hash
from storage.pg import anchors, parity
from storage.pg.connection import Connection
from storage.pg.schema import INTENDED_DIFFERENCES, RULE_TOTAL_SHARDS, SMALL_INTEGER_COLUMNS

# Rows read from SQLite per fetch: bounds the memory a table's copy takes.
BATCH_ROWS = 10_000
# A progress line per this many rows of a table, and one when it is done.
PROGRESS_EVERY_ROWS = 100_000
# Made from the copied rows, not copied (see the module's docstring).
DERIVED = {"rule_totals"}


class CopyRefused(RuntimeError):
    """The source or the target is not what a copy needs; nothing was written."""


Progress = Callable[[str], None]


def check_ready(lite: sqlite3.Connection, pg: Connection) -> None:
    """CopyRefused unless the target holds no rows and both schemas are the twins the
    parity test holds them to (both at their newest migration)."""
    lite_shape, pg_shape = parity.sqlite_shape(lite), parity.pg_shape(pg)
    unexpected = [d for d in parity.differences(lite_shape, pg_shape, SMALL_INTEGER_COLUMNS)
                  if d not in INTENDED_DIFFERENCES]
    if unexpected:
        raise CopyRefused("the two schemas differ (" + "; ".join(unexpected[:5]) + "): open the SQLite database "
                          "with this version's server once, so it is migrated, and stop it")
    holding = [t for t in sorted(pg_shape) if pg.execute(f"SELECT EXISTS (SELECT 1 FROM {t})").fetchone()[0]]
    if holding:
        raise CopyRefused(f"the target database is not empty ({', '.join(holding[:5])} hold rows); "
                          "copy into a new, empty database")


def copy_all(lite: sqlite3.Connection, pg: Connection, now: datetime, progress: Progress) -> dict[str, int]:
    """Copies every table in the caller's transactions (SQLite's: one snapshot; PostgreSQL's:
    the whole copy), chains the postings per member, anchors them and gathers the planner's
    statistics; rows per table."""
    lite_shape, pg_shape = parity.sqlite_shape(lite), parity.pg_shape(pg)
    tables = _parents_first({t: pg_shape[t] for t in lite_shape if t in pg_shape and t not in DERIVED})
    for table in tables:
        pg.execute(f"ALTER TABLE {table} DISABLE TRIGGER USER")
    copied = {}
    for table in tables:
        columns = [c.name for c in lite_shape[table].columns]
        copied[table] = (_copy_postings(lite, pg, columns, progress) if table == "postings" else
                         _copy_table(lite, pg, table, columns, lite_shape[table].primary_key,
                                     {c.name for c in pg_shape[table].columns if c.type == "bytea"}, progress))
    for table in tables:
        pg.execute(f"ALTER TABLE {table} ENABLE TRIGGER USER")
    _sum_rule_totals(pg)
    events.queue_after_cursors(pg)
    _continue_identities(lite, pg, tables)
    pg.execute("INSERT INTO chain_heads (member_id, seq, hash) SELECT DISTINCT ON (member_id) member_id, chain_seq, "
               "hash FROM postings ORDER BY member_id, chain_seq DESC")
    progress(f"anchors: {anchors.write_anchors(pg, now):,} member chains anchored")
    # A bulk load leaves the planner no statistics until autovacuum's first analyze (a minute
    # or more); meanwhile the audit below and the first receipts after the cutover were
    # planned blind (a benchmark's first round confirmed 8 receipts/s, the next 116). ANALYZE
    # in the copy's transaction counts its own rows and commits with them.
    pg.execute(f"ANALYZE {', '.join(tables)}")
    progress(f"statistics: {len(tables)} tables analyzed")
    return copied


def _parents_first(tables: dict[str, parity.Table]) -> list[str]:
    """The tables ordered so that each comes after those its foreign keys name."""
    ordered: list[str] = []

    def place(name: str, seen: frozenset[str]) -> None:
        if name in ordered or name in seen:
            return
        for _, parent in sorted(tables[name].foreign_keys):
            if parent in tables and parent != name:
                place(parent, seen | {name})
        ordered.append(name)
    for name in sorted(tables):
        place(name, frozenset())
    return ordered


def _copy_table(lite, pg: Connection, table: str, columns: list[str], key: tuple[str, ...], blobs: set[str],
                progress: Progress) -> int:
    # A BLOB column may hold text SQLite was given as str (older rows); bytea takes its bytes.
    text_to_bytes = [i for i, c in enumerate(columns) if c in blobs]
    rows = lite.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {', '.join(key) or 'rowid'}")

    def fixed(row):
        if not text_to_bytes:
            return row
        row = list(row)
        for i in text_to_bytes:
            if isinstance(row[i], str):
                row[i] = row[i].encode()
        return row
    return _stream(pg, table, columns, (fixed(r) for r in _batches(rows)), progress)


def _copy_postings(lite, pg: Connection, columns: list[str], progress: Progress) -> int:
    """SQLite's postings with their member's chain: read member by member, each member's in
    id order, numbered and hashed as storage/pg/ledger.append_postings would have. columns:
    SQLite's, which check_ready found to be PostgreSQL's without chain_seq."""
    rows = lite.execute(f"SELECT {HASHED_SELECT}, p.hash FROM postings p JOIN lots l ON l.id = p.lot_id "
                        "ORDER BY p.member_id, p.id")

    def chained():
        member, seq, prev = None, 0, GENESIS_HASH
        for posting_id, member_id, lot_id, available_from, expires_on, *rest in _batches(rows):
            fields = rest[:-1]
            if member_id != member:
                member, seq, prev = member_id, 0, GENESIS_HASH
            seq += 1
            prev = posting_hash(prev, (seq, member_id, lot_id, available_from, expires_on, *fields))
            yield (posting_id, member_id, seq, lot_id, *fields, prev)
    return _stream(pg, "postings", ["id", "member_id", "chain_seq", *columns[2:]], chained(), progress)


def _batches(cursor):
    while batch := cursor.fetchmany(BATCH_ROWS):
        yield from batch


def _stream(pg: Connection, table: str, columns: list[str], rows, progress: Progress) -> int:
    count = 0
    # One COPY per table: foreign keys are checked at the end of the statement, so a member
    # merged into one enrolled after it goes in with the rest.
    with pg.raw.cursor().copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)
            count += 1
            if count % PROGRESS_EVERY_ROWS == 0:
                progress(f"{table}: {count:,} rows")
    progress(f"{table}: {count:,} rows copied")
    return count


def _sum_rule_totals(pg: Connection) -> None:
    """rule_totals as its triggers keep it: each accrual's split by rule and each reversal,
    in the shard of the posting's member."""
    pg.execute(f"""
INSERT INTO rule_totals (rule_id, shard, points)
SELECT rule_id, member_id % {RULE_TOTAL_SHARDS}, SUM(points) FROM (
    SELECT pr.rule_id, p.member_id, pr.points FROM posting_rules pr JOIN postings p ON p.id = pr.posting_id
    UNION ALL
    SELECT rule_id, member_id, points FROM postings WHERE rule_id IS NOT NULL AND kind = 'reversal'
) AS issued GROUP BY 1, 2""")


def _continue_identities(lite, pg: Connection, tables: list[str]) -> None:
    """Each identity column's next value after the highest id copied, and after SQLite's
    AUTOINCREMENT counter (api_keys' ids are never reused)."""
    counters = dict(lite.execute("SELECT name, seq FROM sqlite_sequence").fetchall()) if lite.execute(
        "SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'").fetchone() else {}
    for table, column in pg.execute("SELECT table_name, column_name FROM information_schema.columns "
                                    "WHERE table_schema = current_schema() AND is_identity = 'YES'").fetchall():
        if table not in tables:
            continue
        highest = max(pg.execute(f"SELECT COALESCE(MAX({column}), 0) FROM {table}").fetchone()[0],
                      counters.get(table, 0))
        if highest:
            pg.execute(f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'), ?)", (highest,))
