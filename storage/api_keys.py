"""Keys of people (`loyalty keys add|list|revoke`): rows of api_keys, never deleted.

Only a key's SHA-256 is stored. Rows are only ever inserted or revoked (triggers refuse
anything else), so (highest seq, number revoked) changes whenever the set of usable keys
does: a running server compares that pair to know when to read the keys again.
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass

from storage.sql import is_postgresql

ID_PREFIX = "person-"
_COLUMNS = "id, name, role, stores, sha256, created_at, created_by, revoked_at, revoked_by"


@dataclass(frozen=True)
class KeyRow:
    id: str
    name: str
    role: str
    stores: tuple[str, ...]
    sha256: str
    created_at: str
    created_by: str
    revoked_at: str | None
    revoked_by: str | None


def _row(r) -> KeyRow:
    return KeyRow(r[0], r[1], r[2], tuple(json.loads(r[3])), *r[4:])


def add(conn: sqlite3.Connection, *, name: str, role: str, stores: list[str], sha256: str, created_at: str,
        created_by: str) -> str:
    """The new key's id, person-<seq>: seq is never reused (AUTOINCREMENT, rows never deleted;
    on PostgreSQL its identity column's sequence)."""
    if is_postgresql(conn):
        seq = conn.execute("SELECT nextval(pg_get_serial_sequence('api_keys', 'seq'))").fetchone()[0]
    else:
        last = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'api_keys'").fetchone()
        seq = (last[0] if last else 0) + 1
    key_id = f"{ID_PREFIX}{seq}"
    conn.execute(f"INSERT INTO api_keys (seq, {_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL)",
                 (seq, key_id, name, role, json.dumps(sorted(stores)), sha256, created_at, created_by))
    return key_id


def get(conn: sqlite3.Connection, key_id: str) -> KeyRow | None:
    r = conn.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE id = ?", (key_id,)).fetchone()
    return _row(r) if r else None


def revoke(conn: sqlite3.Connection, key_id: str, *, at: str, by: str) -> bool:
    """False when the key is not there or already revoked."""
    cur = conn.execute("UPDATE api_keys SET revoked_at = ?, revoked_by = ? WHERE id = ? AND revoked_at IS NULL",
                       (at, by, key_id))
    return cur.rowcount == 1


def all_keys(conn: sqlite3.Connection) -> list[KeyRow]:
    """Every key ever added, revoked ones included, oldest first."""
    return [_row(r) for r in conn.execute(f"SELECT {_COLUMNS} FROM api_keys ORDER BY seq")]


def version(conn: sqlite3.Connection) -> tuple[int, int]:
    """Changes whenever a key is added or revoked (both only ever grow)."""
    return conn.execute("SELECT COALESCE(MAX(seq), 0), COUNT(revoked_at) FROM api_keys").fetchone()


def write_config_names(conn: sqlite3.Connection, names: dict[str, str]) -> None:
    """The names config.yaml gives its keys now, for the adjustments' key_name trigger."""
    conn.execute("DELETE FROM config_key_names")
    conn.executemany("INSERT INTO config_key_names (id, name) VALUES (?, ?)", names.items())

