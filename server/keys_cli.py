"""`loyalty keys add|list|revoke`: keys for people, kept in the database.

They run beside a serving server: add and revoke write through the same single-writer
storage (without taking the server's checkpoint turn), list reads on a read-only
connection. The server reads the keys again within auth.keys_refresh_seconds of a change.
A key is printed once, when it is made; only its SHA-256 is stored.
"""
from __future__ import annotations

import getpass
import hashlib
import json
import logging
import secrets
import sqlite3
import sys
from contextlib import closing
from datetime import datetime, timezone
from typing import Callable, TypeVar

from storage import api_keys
from storage.sql import database_errors

T = TypeVar("T")

ROLES = ("register", "manager", "support", "monitor")
NAME_LENGTH_MAX = 128
# 32 random bytes: guessing one is out of reach, and its SHA-256 alone is worth nothing.
KEY_BYTES = 32


def add_parser(sub) -> None:
    keys = sub.add_parser("keys", help="keys of people: add, list, revoke").add_subparsers(
        dest="keys_command", required=True)
    add = keys.add_parser("add", help="make a key for a person; prints it once")
    add.add_argument("--role", required=True, choices=ROLES)
    add.add_argument("--name", required=True, help="who will hold the key (shown in the audit log)")
    add.add_argument("--store", action="append", default=[], dest="stores",
                     help="a store a register key may act for (repeat for several)")
    add.add_argument("--by", help="who adds it (default: the operating-system user)")
    add.add_argument("--config", default="config.yaml")
    listing = keys.add_parser("list", help="every key: config.yaml's and the people's, revoked ones too")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.add_argument("--config", default="config.yaml")
    revoke = keys.add_parser("revoke", help="stop a person's key from working")
    revoke.add_argument("id", help="the key's id, person-<n> (see keys list)")
    revoke.add_argument("--by", help="who revokes it (default: the operating-system user)")
    revoke.add_argument("--config", default="config.yaml")


def dispatch(args) -> int:
    from server.databases import CannotOpen, config_for_command
    try:
        config = config_for_command(args.config)
    except CannotOpen as e:
        print(e, file=sys.stderr)
        return 2
    if args.keys_command == "list":
        return list_keys(config, args.json)
    if args.keys_command == "add":
        if problem := _add_problem(args.name, args.role, args.stores) or _no_database(config, "no key was added"):
            print(problem, file=sys.stderr)
            return 2
        return add_key(config, args.name.strip(), args.role, args.stores, args.by or _os_user())
    if problem := _no_database(config, "nothing was revoked"):
        print(problem, file=sys.stderr)
        return 2
    return revoke_key(config, args.id, args.by or _os_user())


def _add_problem(name: str, role: str, stores: list[str]) -> str | None:
    name = name.strip()
    if not name or len(name) > NAME_LENGTH_MAX or not name.isprintable():
        return f"--name must be 1 to {NAME_LENGTH_MAX} printable characters"
    if role == "register" and not stores:
        return "a register key needs at least one --store"
    if role != "register" and stores:
        return f"--store is for register keys; a {role} key is not limited to stores"
    return None


def _no_database(config, outcome: str) -> str | None:
    """Why a key cannot be added to or revoked in SQLite's file: it is not there (a mistyped
    path or config would get a new empty database holding nothing but the key; the server
    makes the database when it first starts). PostgreSQL's database is found when it is
    opened. outcome: what the refusal left undone, said last."""
    if config.database.url is None and not config.resolve(config.database.path).exists():
        from server.databases import described
        return f"{described(config)}: no database (start the server once to make it); {outcome}"
    return None


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):    # no name for this uid (a container, say)
        return "unknown"


def _now() -> str:
    # Real time, not clock.start: when a key was made or revoked is an operator's fact.
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class CannotWrite(Exception):
    pass


def _write(config, fn: Callable[[sqlite3.Connection], T]) -> T:
    """fn run in one write transaction beside a serving server (which checkpoints its WAL, so
    this does not); CannotWrite says why in one line (a lock held past database.busy_wait_seconds,
    a full disk, a path that is not a database)."""
    from server.databases import for_command
    from storage.db import StorageBusy, StorageError
    # The storage words its faults for a server ("refusing requests with 503"); here the
    # one line below says what happened.
    logging.getLogger("storage").setLevel(logging.CRITICAL)
    path = config.database.url or config.resolve(config.database.path)
    db = for_command(config)
    try:
        db.open()
        return db.write_sync(fn)
    except StorageBusy:
        raise CannotWrite(f"{path}: another program held the database's write lock for "
                          f"{config.database.busy_wait_seconds:g}s (database.busy_wait_seconds); nothing was "
                          f"written, run it again") from None
    except (StorageError, *database_errors(), OSError, RuntimeError) as e:
        raise CannotWrite(f"{path}: cannot write: {e}; nothing was written") from None
    finally:
        db.close()


def add_key(config, name: str, role: str, stores: list[str], by: str) -> int:
    key = secrets.token_urlsafe(KEY_BYTES)
    digest = hashlib.sha256(key.encode()).hexdigest()
    try:
        key_id = _write(config, lambda conn: api_keys.add(
            conn, name=name, role=role, stores=stores, sha256=digest, created_at=_now(), created_by=by))
    except CannotWrite as e:
        print(e, file=sys.stderr)
        return 1
    # The key alone on standard output, so `KEY=$(loyalty keys add ...)` takes just it.
    print(key)
    where = f" at {', '.join(sorted(stores))}" if stores else ""
    print(f"added {key_id}: {role} key of {name}{where}. The key above is shown only now (the database keeps "
          f"its SHA-256); a running server accepts it within {config.auth.keys_refresh_seconds:g}s.",
          file=sys.stderr)
    return 0


def revoke_key(config, key_id: str, by: str) -> int:
    if any(k.id == key_id for k in config.auth.keys):
        print(f"{key_id} is a key of the config file (auth.keys): remove it there and restart the server",
              file=sys.stderr)
        return 2
    try:
        done, row = _write(config, lambda conn: (api_keys.revoke(conn, key_id, at=_now(), by=by),
                                                 api_keys.get(conn, key_id)))
    except CannotWrite as e:
        print(e, file=sys.stderr)
        return 1
    if row is None:
        print(f"no key {key_id} (loyalty keys list shows them)", file=sys.stderr)
        return 1
    if not done:
        print(f"{key_id} ({row.name}) was already revoked at {row.revoked_at} by {row.revoked_by}")
        return 0
    print(f"revoked {key_id} ({row.name}); a running server refuses it within "
          f"{config.auth.keys_refresh_seconds:g}s")
    return 0


def list_keys(config, as_json: bool) -> int:
    from server.databases import CannotOpen
    try:
        people = _people(config)
    except CannotOpen as e:
        print(e, file=sys.stderr)
        return 2
    rows = [{"id": k.id, "name": k.name or k.id, "role": k.role, "stores": sorted(k.stores),
             "created": "config", "created_by": "config", "revoked": None} for k in config.auth.keys]
    rows += [{"id": r.id, "name": r.name, "role": r.role, "stores": list(r.stores), "created": r.created_at,
              "created_by": r.created_by, "revoked": r.revoked_at} for r in people]
    if as_json:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
        return 0
    header = ("id", "name", "role", "stores", "created", "by", "revoked")
    table = [header] + [(r["id"], r["name"], r["role"], ",".join(r["stores"]) or "-", r["created"],
                         r["created_by"], r["revoked"] or "-") for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
    return 0


def _people(config) -> list[api_keys.KeyRow]:
    """The database's keys; none when there is no database or it predates keys of people."""
    if config.database.url is not None:
        from server.databases import open_existing
        db = open_existing(config)      # CannotOpen, in one line, when PostgreSQL does not answer
        try:
            return db.read_sync(api_keys.all_keys)
        finally:
            db.close()
    path = config.resolve(config.database.path)
    if not path.exists():
        return []
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        try:
            return api_keys.all_keys(conn)
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return []
            raise
