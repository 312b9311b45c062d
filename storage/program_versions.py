"""The programs that went live, in the database (tables of m020_program_versions).

A version's files are stored once, as the JSON object {relative path: text}; each time a
version goes live is a row of program_loads, and the newest of those rows is the program
every server on the database serves.
"""
from __future__ import annotations

import sqlite3
from typing import Literal

import msgspec

Source = Literal["directory", "api", "console", "rollback"]
_LOAD_COLUMNS = ("id", "version", "program", "loaded_at", "source", "deployed_by", "deployed_by_name", "reason")
_LOADS = """SELECT l.id, l.version, v.program_id, l.loaded_at, l.source, l.deployed_by, l.deployed_by_name, l.reason
            FROM program_loads l JOIN program_versions v USING (version)"""


def record(conn: sqlite3.Connection, *, version: str, program_id: str, files: dict[str, str], at: str,
           source: Source, deployed_by: str | None, reason: str | None, deployed_by_name: str | None = None) -> int:
    """The id of the load row that makes `version` the newest; deployed_by is the key id,
    deployed_by_name the person holding it. Idempotent: when it is the newest already (a
    restart, the watcher reading back files a deploy wrote), nothing is added."""
    newest = newest_load(conn)
    if newest is not None and newest[1] == version:
        return newest[0]
    conn.execute("INSERT INTO program_versions (version, program_id, files, recorded_at) "
                 "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING", (version, program_id, msgspec.json.encode(files), at))
    return int(conn.execute("INSERT INTO program_loads (version, loaded_at, source, deployed_by, deployed_by_name, "
                            "reason) VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                            (version, at, source, deployed_by, deployed_by_name, reason)).fetchone()[0])


def newest_load(conn: sqlite3.Connection) -> tuple[int, str] | None:
    """(load id, version) of what should be served; one b-tree step from the end."""
    row = conn.execute("SELECT id, version FROM program_loads ORDER BY id DESC LIMIT 1").fetchone()
    return (row[0], row[1]) if row else None


def loads(conn: sqlite3.Connection, limit: int, before: int | None = None) -> list[dict]:
    """Newest first: each time a version went live, with the program it is and who did it."""
    where, args = ("WHERE l.id < ?", [before]) if before is not None else ("", [])
    rows = conn.execute(f"{_LOADS} {where} ORDER BY l.id DESC LIMIT ?", (*args, limit))
    return [dict(zip(_LOAD_COLUMNS, row)) for row in rows]


def files(conn: sqlite3.Connection, version: str) -> dict[str, str] | None:
    row = conn.execute("SELECT files FROM program_versions WHERE version = ?", (version,)).fetchone()
    return msgspec.json.decode(row[0], type=dict[str, str]) if row else None


def version_info(conn: sqlite3.Connection, version: str) -> dict | None:
    """The version's program, when it was first recorded and its files."""
    row = conn.execute("SELECT program_id, files, recorded_at FROM program_versions WHERE version = ?",
                       (version,)).fetchone()
    if row is None:
        return None
    return {"version": version, "program": row[0], "recorded_at": row[2],
            "files": msgspec.json.decode(row[1], type=dict[str, str])}


def matching(conn: sqlite3.Connection, prefix: str, limit: int = 2) -> list[str]:
    """Versions starting with `prefix` (`sha256:` may be left out), for a command line."""
    if not prefix.startswith("sha256:"):
        prefix = "sha256:" + prefix
    # A range, not LIKE: `_` and `%` in what was typed match only themselves.
    rows = conn.execute("SELECT version FROM program_versions WHERE version >= ? AND version < ? "
                        "ORDER BY version LIMIT ?", (prefix, prefix + "\U0010ffff", limit))
    return [row[0] for row in rows]


def load_history(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    """(version, loaded_at) of every load, oldest first: each in force until the next."""
    return [(row[0], row[1]) for row in conn.execute("SELECT version, loaded_at FROM program_loads ORDER BY id")]
