"""Turns a database back to the ledger format before m030: one accrual posting per earning
rule, no posting_rules. Tests that rebuild older databases from a fresh one start here.

Every accrual posting is replaced by one posting per rule of its split, the ledger is
renumbered and its hash chain recomputed as the server of that time wrote it; rule_totals
keeps its sums (the same points, counted per rule) under m016's trigger, which m032 drops
again once the server upgrades it."""
from __future__ import annotations

import sqlite3

from storage.ledger import GENESIS_HASH, posting_hash

_COLUMNS = ("member_id, lot_id, kind, points, counter_account, effective_at, created_at, rule_id, rules_version, "
            "store_id, register_id, receipt_id, ref, key_id, note")


def to_per_rule_postings(path) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN")
        rows = _per_rule(conn)
        _run(conn, """
DROP TRIGGER postings_append_only_delete;
DROP TRIGGER IF EXISTS postings_rule_totals;
DROP TRIGGER IF EXISTS posting_rules_rule_totals;
DELETE FROM postings;
DROP TABLE posting_rules;
""")
        prev = GENESIS_HASH
        dates = dict((lot, (a, e)) for lot, a, e in conn.execute("SELECT id, available_from, expires_on FROM lots"))
        for posting_id, row in enumerate(rows, 1):
            prev = posting_hash(prev, (posting_id, row[0], row[1], *dates[row[1]], *row[2:]))
            conn.execute(f"INSERT INTO postings (id, {_COLUMNS}, hash) VALUES ({', '.join('?' * 17)})",
                         (posting_id, *row, prev))
        _run(conn, """
CREATE TRIGGER postings_append_only_delete BEFORE DELETE ON postings
BEGIN SELECT RAISE(ABORT, 'postings are append-only: post a correction instead'); END;
CREATE TRIGGER postings_rule_totals AFTER INSERT ON postings
WHEN NEW.rule_id IS NOT NULL AND NEW.kind IN ('accrual', 'reversal')
BEGIN INSERT INTO rule_totals (rule_id, points) VALUES (NEW.rule_id, NEW.points)
      ON CONFLICT (rule_id) DO UPDATE SET points = points + excluded.points; END;
DELETE FROM _sqlite_migrations WHERE name IN ('m030_posting_rules', 'm032_rule_totals_per_batch')
""")
        conn.execute("COMMIT")
    finally:
        conn.close()


def _run(conn: sqlite3.Connection, script: str) -> None:
    # executescript would commit first; this stays in the caller's transaction.
    for statement in script.split(";\n"):
        if statement.strip():
            conn.execute(statement)


def _per_rule(conn: sqlite3.Connection) -> list[tuple]:
    split: dict[int, list[tuple[str, int]]] = {}
    for posting_id, rule, points in conn.execute("SELECT posting_id, rule_id, points FROM posting_rules "
                                                 "ORDER BY posting_id, rule_id"):
        split.setdefault(posting_id, []).append((rule, points))
    out = []
    for posting_id, *row in conn.execute(f"SELECT id, {_COLUMNS} FROM postings ORDER BY id"):
        if row[2] == "accrual" and posting_id in split:
            out += [(*row[:3], points, *row[4:7], rule, *row[8:]) for rule, points in split[posting_id]]
        else:
            out.append(tuple(row))
    return out
