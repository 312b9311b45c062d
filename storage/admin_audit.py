"""The log of admin actions: append-only rows, each chained to the one before (the
ledger's own audit is storage/audit.py).

hash = sha256(previous row's hash + canonical row), the first row chaining to GENESIS, so
changing, removing or reordering a row breaks every hash after it; verify() finds where.
Rows name who holds the key (key_name); rows written before names were kept have none, and
their hash covers the row without it, so they verify as they were written.
Rows are appended by the single writer thread, so the chain has no forks.
"""
from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass

import msgspec

GENESIS = "0" * 64
_encode = msgspec.json.Encoder().encode
_COLUMNS = "id, at, key_id, method, path, body_digest, status, key_name"


def row_hash(prev_hash: str, row: tuple, detail: str | None = None) -> str:
    """row: (id, at, key_id, method, path, body_digest, status, key_name). A row without a
    key_name is hashed as the seven fields it was written with before names were kept; a
    detail joins the hashed fields only when there is one. Rows written before either
    column existed verify as before."""
    fields = list(row[:7]) if row[7] is None else list(row)
    if detail is not None:
        fields.append(detail)
    return hashlib.sha256(prev_hash.encode() + _encode(fields)).hexdigest()


def append(conn: sqlite3.Connection, *, at: str, key_id: str, key_name: str | None, method: str, path: str,
           body_digest: str, status: int, detail: str | None = None) -> int:
    """key_name: the person behind the key; detail: what the action was for, in its author's
    words (a deploy's reason)."""
    last = conn.execute("SELECT id, hash FROM audit_log ORDER BY id DESC LIMIT 1").fetchone()
    row_id, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
    row = (row_id, at, key_id, method, path, body_digest, status, key_name)
    conn.execute(f"INSERT INTO audit_log ({_COLUMNS}, detail, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 (*row, detail, prev, row_hash(prev, row, detail)))
    return row_id


@dataclass
class Verification:
    ok: bool
    rows: int
    first_bad_id: int | None = None
    reason: str = ""


def verify(conn: sqlite3.Connection) -> Verification:
    prev, n = GENESIS, 0
    for r in conn.execute(f"SELECT {_COLUMNS}, detail, prev_hash, hash FROM audit_log ORDER BY id"):
        n += 1
        row, detail, prev_hash, hash_ = tuple(r[:8]), r[8], r[9], r[10]
        if prev_hash != prev:
            return Verification(False, n, row[0], "prev_hash does not match the previous row's hash")
        if row_hash(prev, row, detail) != hash_:
            return Verification(False, n, row[0], "hash does not match the row")
        prev = hash_
    return Verification(True, n)


def rows(conn: sqlite3.Connection, limit: int = 100, path: str | None = None) -> list[dict]:
    """Newest first; path: only the rows of that path."""
    where, params = ("WHERE path = ?", (path, limit)) if path else ("", (limit,))
    out = conn.execute(f"SELECT {_COLUMNS}, detail, hash FROM audit_log {where} ORDER BY id DESC LIMIT ?", params)
    names = ("id", "at", "key_id", "method", "path", "body_digest", "status", "key_name", "detail", "hash")
    return [dict(zip(names, r)) for r in out]
