"""Keys of people: `loyalty keys add` prints a key once and stores its hash; a running server
accepts it, and refuses it once revoked, within auth.keys_refresh_seconds and without a
restart; the audit log and the adjustment's record name the person."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
import requests

from conftest import KEYS, _h, connect, database_section, migrated_connection, storage_database, tamper
from server.auth import KeyRing
from server.config import ConfigError, config_from_dict
from storage import admin_audit, api_keys
from storage.sql import integrity_errors
from test_crash_safety import Server

ROOT = Path(__file__).resolve().parent.parent
CARD = "7000000000001"
# Generous: the server reads the keys every 0.2 s here, on a machine that may be busy.
CHANGE_SEEN_WITHIN_SECONDS = 20


def loyalty(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def call(server: Server, method: str, path: str, key: str, body: dict | None = None) -> requests.Response:
    return requests.request(method, server.url(path), json=body, headers={"Authorization": f"Bearer {key}"},
                            timeout=10)


def wait_for_status(server: Server, key: str, wanted, path: str = f"/v1/members/{CARD}") -> int:
    """The status of GET path with key, once it is in `wanted` (or the last one seen)."""
    deadline = time.monotonic() + CHANGE_SEEN_WITHIN_SECONDS
    while True:
        status = call(server, "GET", path, key).status_code
        if status in wanted or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def read_db(server: Server, sql: str) -> list[tuple]:
    with closing(connect(server.db)) as conn:
        return conn.execute(sql).fetchall()


@pytest.fixture
def server(tmp_path):
    keys = [{"id": "manager", "sha256": _h(KEYS["manager"]), "role": "manager", "name": "Head office"}]
    s = Server(tmp_path, auth={"keys": keys, "keys_refresh_seconds": 0.2, "support_adjustment_max_points": 500})
    s.start()
    try:
        yield s
    finally:
        s.kill()


def test_a_key_added_beside_the_running_server_works_until_revoked(server):
    assert call(server, "POST", "/v1/members", KEYS["manager"], {"card": CARD}).status_code == 201
    added = loyalty("keys", "add", "--role", "support", "--name", "Olena Kovalenko", "--config", str(server.config))
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    assert len(key) >= 40 and "\n" not in key
    assert "person-1" in added.stderr and "shown only now" in added.stderr

    assert wait_for_status(server, key, {200}) == 200
    adjusted = call(server, "POST", "/v1/admin/adjustments", key,
                    {"card": CARD, "points": 120, "reason": "broken coffee machine", "adjustment_id": "S-1"})
    assert adjusted.status_code == 201, adjusted.text
    assert adjusted.json()["key_id"] == "person-1" and adjusted.json()["key_name"] == "Olena Kovalenko"
    assert call(server, "GET", "/v1/admin/rules", key).status_code == 403

    # The record of the adjustment and the audit log name her; the key itself is nowhere.
    assert read_db(server, "SELECT key_id, key_name FROM adjustments") == [("person-1", "Olena Kovalenko")]
    assert read_db(server, "SELECT key_id, key_name, path, status FROM audit_log ORDER BY id") == [
        ("person-1", "Olena Kovalenko", "/v1/admin/adjustments", 201),
        ("person-1", "Olena Kovalenko", "/v1/admin/rules", 403)]
    digest = hashlib.sha256(key.encode()).hexdigest()
    assert read_db(server, "SELECT sha256 FROM api_keys") == [(digest,)]
    for stored in (server.db, server.db.with_name("loyalty.db-wal")):
        assert not stored.exists() or key.encode() not in stored.read_bytes()

    listed = loyalty("keys", "list", "--config", str(server.config))
    assert listed.returncode == 0, listed.stderr
    person = next(line for line in listed.stdout.splitlines() if line.startswith("person-1"))
    assert "Olena Kovalenko" in person and "support" in person and person.rstrip().endswith("-")
    assert "Head office" in listed.stdout
    assert digest[:6] not in listed.stdout and key not in listed.stdout

    revoked = loyalty("keys", "revoke", "person-1", "--by", "security", "--config", str(server.config))
    assert revoked.returncode == 0, revoked.stderr
    assert wait_for_status(server, key, {401}) == 401
    answer = call(server, "GET", f"/v1/members/{CARD}", key)
    assert answer.json()["error"]["code"] == "unauthorized"
    # The config's key never stopped working, and the person is still named after revoking.
    assert call(server, "GET", f"/v1/members/{CARD}", KEYS["manager"]).status_code == 200
    rows = [json.loads(line) for line in loyalty("keys", "list", "--json", "--config", str(server.config))
            .stdout.splitlines()]
    assert [(r["id"], r["name"], r["revoked"] is not None) for r in rows] == [
        ("manager", "Head office", False), ("person-1", "Olena Kovalenko", True)]
    statement = call(server, "GET", f"/v1/members/{CARD}/statement", KEYS["manager"]).json()
    adjustment = next(p for p in statement["postings"] if p["kind"] == "adjustment")
    assert (adjustment["key_id"], adjustment["key_name"]) == ("person-1", "Olena Kovalenko")


def test_a_register_key_of_a_person_is_limited_to_its_stores(server):
    added = loyalty("keys", "add", "--role", "register", "--name", "Till 7", "--store", "S002",
                    "--config", str(server.config))
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    assert wait_for_status(server, key, {404}) == 404      # authenticated: the card is not enrolled
    assert call(server, "POST", "/v1/members", key, {"card": CARD, "store_id": "S002"}).status_code == 201
    refused = call(server, "POST", "/v1/members", key, {"card": "7000000000002", "store_id": "S001"})
    assert refused.status_code == 403 and refused.json()["error"]["details"][0]["path"] == "store_id"


def made(server: Server) -> Server:
    """server with its database made, as its first start makes it."""
    db = storage_database(server.db)
    db.open()
    db.close()
    return server


def test_keys_add_refuses_what_would_make_a_useless_key(tmp_path):
    server = made(Server(tmp_path))
    for args, words in [(["--role", "register", "--name", "Till"], "at least one --store"),
                        (["--role", "manager", "--name", "Ann", "--store", "S001"], "--store is for register"),
                        (["--role", "manager", "--name", "   "], "--name must be"),
                        (["--role", "manager", "--name", "x" * 129], "--name must be")]:
        done = loyalty("keys", "add", *args, "--config", str(server.config))
        assert done.returncode == 2 and words in done.stderr and done.stdout == ""
    revoke_config_key = loyalty("keys", "revoke", "manager", "--config", str(server.config))
    assert revoke_config_key.returncode == 2 and "remove it there" in revoke_config_key.stderr
    unknown = loyalty("keys", "revoke", "person-9", "--config", str(server.config))
    assert unknown.returncode == 1 and "no key person-9" in unknown.stderr


@pytest.mark.sqlite_only(reason="a missing file is SQLite's; PostgreSQL's database is made by its operator")
def test_keys_add_and_revoke_make_no_database_file(tmp_path):
    server = Server(tmp_path)
    added = loyalty("keys", "add", "--role", "monitor", "--name", "Grafana", "--config", str(server.config))
    assert added.returncode == 2 and added.stdout == ""
    assert added.stderr == f"{server.db}: no database (start the server once to make it); no key was added\n"
    revoked = loyalty("keys", "revoke", "person-1", "--config", str(server.config))
    assert revoked.returncode == 2 and revoked.stderr.count("\n") == 1 and "nothing was revoked" in revoked.stderr
    assert not server.db.exists()


def test_a_config_key_may_not_take_the_id_of_a_person():
    keys = [{"id": "person-3", "sha256": _h("x"), "role": "manager"}]
    with pytest.raises(ConfigError) as e:
        config_from_dict({"auth": {"keys": keys}})
    assert e.value.key == "auth.keys[0].id" and "person-<number>" in e.value.reason
    assert config_from_dict({"auth": {"keys": [{**keys[0], "id": "person-three"}]}}).auth.keys[0].id == "person-three"


def test_key_rows_are_revoked_once_and_never_deleted(tmp_path):
    conn = migrated_connection(tmp_path / "k.db")
    first = api_keys.add(conn, name="Ann", role="manager", stores=[], sha256=_h("a"), created_at="t", created_by="me")
    assert first == "person-1"
    assert api_keys.revoke(conn, first, at="t2", by="me") and not api_keys.revoke(conn, first, at="t3", by="me")
    with pytest.raises(integrity_errors(), match="revoked, never deleted"):
        conn.execute("DELETE FROM api_keys")
    with pytest.raises(integrity_errors(), match="only be revoked"):
        conn.execute("UPDATE api_keys SET revoked_at = NULL")
    with pytest.raises(integrity_errors(), match="only be revoked"):
        conn.execute("UPDATE api_keys SET name = 'Bob'")
    assert api_keys.add(conn, name="Bob", role="support", stores=[], sha256=_h("b"), created_at="t",
                        created_by="me") == "person-2"
    assert api_keys.version(conn) == (2, 1)


def test_the_audit_chain_covers_the_name(tmp_path):
    conn = migrated_connection(tmp_path / "a.db")
    for i in range(3):
        admin_audit.append(conn, at=f"t{i}", key_id="person-1", key_name="Ann", method="POST",
                           path="/v1/admin/adjustments", body_digest="0" * 64, status=201)
    assert admin_audit.verify(conn).ok
    tamper(conn, "audit_log", "UPDATE audit_log SET key_name = 'Bob' WHERE id = 2")
    assert admin_audit.verify(conn).first_bad_id == 2
    tamper(conn, "audit_log", "UPDATE audit_log SET key_name = NULL WHERE id = 2")
    assert admin_audit.verify(conn).first_bad_id == 2


def test_authentication_reads_no_database_and_revoked_keys_keep_their_name():
    """The keyring has no database: it is swapped whole by the refresh, so a request's
    authentication is a dict lookup whatever the number of keys."""
    ring = KeyRing(config_from_dict({"auth": {"keys": [
        {"id": "manager", "sha256": _h("m"), "role": "manager"}]}}).auth.keys)
    rows = [api_keys.KeyRow(f"person-{n}", f"Person {n}", "support", (), _h(f"k{n}"), "t", "me",
                            "t2" if n == 7 else None, None) for n in range(1, 10_001)]
    ring.use_people(rows, (10_000, 1))
    assert ring.lookup("k5").key_id == "person-5" and ring.lookup("k5").name == "Person 5"
    assert ring.lookup("k7") is None and ring.name_of("person-7") == "Person 7"
    assert ring.lookup("m").key_id == "manager" and ring.name_of("manager") == "manager"
    assert ring.lookup("nobody") is None and ring.lookup("") is None


@pytest.mark.sqlite_only(reason="SQLite's write lock held by a sqlite3 shell")
def test_keys_add_while_another_program_holds_the_write_lock_is_one_line(tmp_path):
    server = Server(tmp_path, database={**database_section(tmp_path / "loyalty.db"), "busy_wait_seconds": 0.2})
    assert loyalty("keys", "list", "--config", str(server.config)).returncode == 0   # no database yet: fine
    made(server)
    assert loyalty("keys", "add", "--role", "monitor", "--name", "Grafana", "--config",
                   str(server.config)).returncode == 0
    with closing(sqlite3.connect(server.db, isolation_level=None)) as holder:
        holder.execute("BEGIN IMMEDIATE")
        done = loyalty("keys", "add", "--role", "manager", "--name", "Ann", "--config", str(server.config))
        holder.execute("ROLLBACK")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "held the database's write lock" in done.stderr, done.stderr
    assert read_db(server, "SELECT id, name FROM api_keys") == [("person-1", "Grafana")]


async def test_a_storage_fault_keeps_the_keys_in_force_and_is_logged_once(caplog):
    from server.auth import keep_keys_fresh
    from storage.db import StorageBusy

    class LockedDatabase:
        reads = 0

        async def read(self, fn):
            self.reads += 1
            raise StorageBusy("write lock held by another program")

    ring = KeyRing([])
    ring.use_people([api_keys.KeyRow("person-1", "Ann", "manager", (), _h("a"), "t", "me", None, None)], (1, 0))
    db = LockedDatabase()
    task = asyncio.create_task(keep_keys_fresh(ring, db, 0.01))
    deadline = time.monotonic() + 10
    while db.reads < 5 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert db.reads >= 5
    assert ring.lookup("a").name == "Ann"
    assert [r.levelname for r in caplog.records if r.name == "loyalty.auth"] == ["ERROR"]


async def test_a_request_never_queries_the_keys(make_api, monkeypatch):
    from server.auth import refresh_keys
    from server.keys import DATABASE, KEYRING
    api = await make_api(now="2026-11-24T12:00:05+02:00", auth={"keys_refresh_seconds": 300})
    app = api.client.server.app
    await app[DATABASE].write(lambda c: api_keys.add(c, name="Ann", role="monitor", stores=[], sha256=_h("ann-key"),
                                                     created_at="t", created_by="me"))
    assert await refresh_keys(app[KEYRING], app[DATABASE])
    queries = []
    for name in ("version", "all_keys", "get"):
        monkeypatch.setattr(api_keys, name, lambda *a, name=name: queries.append(name))
    for _ in range(50):
        status, _body = await api.call("GET", "/metrics", as_=None, headers={"Authorization": "Bearer ann-key"})
        assert status == 200
    assert queries == []


def test_keys_against_a_postgresql_that_does_not_answer_is_one_line(tmp_path):
    pytest.importorskip("psycopg")
    config = tmp_path / "config.yaml"
    config.write_text(f'database: {{url: "postgresql://loyalty@/loyalty?host={tmp_path / "no-socket"}&port=5432"}}\n')
    listed = loyalty("keys", "list", "--config", str(config))
    assert listed.returncode == 2 and listed.stdout == "", listed.stdout
    assert listed.stderr.startswith("cannot connect to PostgreSQL") and listed.stderr.count("\n") == 1, listed.stderr
    for command in (["add", "--role", "monitor", "--name", "Grafana"], ["revoke", "person-1"]):
        done = loyalty("keys", *command, "--config", str(config))
        assert done.returncode == 1 and done.stdout == "" and done.stderr.count("\n") == 1, done.stderr
        assert "cannot connect to PostgreSQL" in done.stderr and "nothing was written" in done.stderr
