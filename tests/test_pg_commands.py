"""The commands that change stored rows, on PostgreSQL (`database.url`): `import members`,
`import receipts`, `privacy rotate-key`, `events retry`; and `backup`, which refuses it.

Each test gets an empty database of a throwaway cluster (tests/pg_cluster.py) and skips,
saying why, without PostgreSQL. The server runs in the test's process on the same
database, as the commands run beside a serving one.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import msgspec
import yaml
from conftest import FIRST_PRIVACY, MARKET, ROTATED_PRIVACY, TEST_HMAC_KEY, Api, line, receipt, test_config
from test_import_members import NOW, write_csv

from server.app import create_app
from server.cli import main as cli
from server.config import DatabaseConfig
from server.privacy import ROTATED_MARK
from storage.audit import verify
from storage.pg.connection import connect

# What an import writes, to compare the database before and after a rerun.
IMPORTED_TABLES = ("members", "cards", "lots", "postings", "chain_heads", "events", "receipts", "imported_receipts")


def write_config(tmp_path: Path, url: str, privacy: dict | None = None) -> str:
    path = tmp_path / "pg.yaml"
    path.write_text(yaml.safe_dump({"database": {"url": url}, "rules": {"dir": str(MARKET), "watch": False},
                                    "clock": {"start": NOW}, "privacy": privacy or {"hmac_key": TEST_HMAC_KEY}}))
    return str(path)


async def serve(aiohttp_client, tmp_path: Path, url: str, privacy: dict | None = None) -> Api:
    overrides = {"privacy": privacy} if privacy else {}
    config = test_config(tmp_path, NOW, **overrides)
    return Api(await aiohttp_client(create_app(msgspec.structs.replace(config, database=DatabaseConfig(url=url)))))


async def run(*argv: str) -> int:
    """The command off the test's event loop, as from a shell beside the server."""
    return await asyncio.to_thread(cli, list(argv))


def rows(url: str, *tables: str) -> dict[str, list]:
    conn = connect(url)
    try:
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in tables}
    finally:
        conn.close()


def audited(url: str):
    conn = connect(url)
    try:
        return verify(conn)
    finally:
        conn.close()


async def test_import_members_then_a_rerun_changes_nothing(aiohttp_client, tmp_path, pg_url, capsys):
    source = write_csv(tmp_path, ["7000000000001,+380501234567,1990-05-01,vip,1500,2027-06-30,2020-01-15",
                                  "7000000000002,,,,0,,",
                                  "7000000000003,,,,250,,2025-03-01"])
    config = write_config(tmp_path, pg_url)
    assert await run("import", "members", "--csv", str(source), "--config", config) == 0
    assert "3 imported, 0 updated, 0 already there, 0 refused" in capsys.readouterr().out
    before = rows(pg_url, *IMPORTED_TABLES)
    assert await run("import", "members", "--csv", str(source), "--config", config, "--batch-rows", "2") == 0
    assert "0 imported, 0 updated, 3 already there, 0 refused" in capsys.readouterr().out
    assert rows(pg_url, *IMPORTED_TABLES) == before
    report = audited(pg_url)
    assert report.problems == [] and report.liability == 1750

    api = await serve(aiohttp_client, tmp_path, pg_url)
    status, member = await api.get("/v1/members/7000000000001")
    assert status == 200 and member["balance"]["available"] == 1500
    # The imported members' ids came from the identity's sequence: an enrollment after them gets a new one.
    status, enrolled = await api.post("/v1/members", {"card": "7000000000009"})
    assert status == 201 and enrolled["member_id"] not in {f"m_{r[0]}" for r in before["members"]}


async def test_import_receipts_counts_the_history_and_a_rerun_skips_it(aiohttp_client, tmp_path, pg_url, capsys):
    config = write_config(tmp_path, pg_url)
    members = write_csv(tmp_path, ["7000000000001,,,,0,,"])
    assert await run("import", "members", "--csv", str(members), "--config", config) == 0
    history = tmp_path / "history.jsonl"
    history.write_text("".join(json.dumps(receipt(f"H-{n}", [line(1, "grocery", 100_000)], card="7000000000001",
                                                  ts=f"2026-10-0{n}T12:00:00+02:00")) + "\n" for n in (1, 2)))
    assert await run("import", "receipts", "--jsonl", str(history), "--config", config) == 0
    assert "2 imported, 0 already there, 0 refused" in capsys.readouterr().out
    before = rows(pg_url, "receipts", "imported_receipts")
    assert await run("import", "receipts", "--jsonl", str(history), "--config", config) == 0
    assert "0 imported, 2 already there, 0 refused" in capsys.readouterr().out
    assert rows(pg_url, "receipts", "imported_receipts") == before
    assert [r[2] for r in before["imported_receipts"]] == ["H-1", "H-2"]

    api = await serve(aiohttp_client, tmp_path, pg_url)
    status, answer = await api.post("/v1/receipts/S001/K01/H-1/cancel", as_="register")
    assert status == 422 and answer["error"]["code"] == "receipt_imported"
    assert audited(pg_url).problems == []


async def test_rotate_key_wraps_the_hashes_and_the_old_card_is_still_found(aiohttp_client, tmp_path, pg_url,
                                                                            capsys):
    card = "7000000000001"
    first = await serve(aiohttp_client, tmp_path, pg_url, FIRST_PRIVACY)
    assert (await first.post("/v1/members", {"card": card, "phone": "+380501234567"}))[0] == 201
    bought = receipt("R-1", [line(1, "grocery", 10_000)], card=card)
    assert (await first.post("/v1/receipts", bought, as_="register"))[0] == 201
    # The servers take up the new key first (one records it), then the command wraps the stored hashes.
    rotated = await serve(aiohttp_client, tmp_path, pg_url, ROTATED_PRIVACY)
    config = write_config(tmp_path, pg_url, ROTATED_PRIVACY)
    assert await run("privacy", "rotate-key", "--config", config, "--batch-rows", "1") == 0
    assert "every card, phone and coupon code hash is under key k2" in capsys.readouterr().out
    stored = rows(pg_url, "cards", "members")
    assert [r[0][:4] for r in stored["cards"]] == [f"{ROTATED_MARK}k2{ROTATED_MARK}"]
    assert all(r[stored_column(pg_url, "members", "phone_hmac")].startswith(f"{ROTATED_MARK}k2")
               for r in stored["members"])
    assert await run("privacy", "rotate-key", "--config", config) == 0
    assert "done: 0 hash(es) wrapped" in capsys.readouterr().out

    status, again = await rotated.post("/v1/receipts", bought, as_="register")
    assert status == 200 and again["replayed"] is True
    status, answer = await rotated.post("/v1/receipts", receipt("R-2", [line(1, "grocery", 10_000)], card=card),
                                        as_="register")
    assert status == 201 and answer["member_id"] == again["member_id"]
    assert audited(pg_url).problems == []


def stored_column(url: str, table: str, column: str) -> int:
    conn = connect(url)
    try:
        names = [r[0] for r in conn.execute("SELECT column_name FROM information_schema.columns WHERE "
                                            "table_name = ? ORDER BY ordinal_position", (table,))]
    finally:
        conn.close()
    return names.index(column)


async def test_events_retry_queues_the_dead_letters_again(aiohttp_client, tmp_path, pg_url, capsys):
    api = await serve(aiohttp_client, tmp_path, pg_url)
    assert (await api.post("/v1/members", {"card": "7000000000001"}))[0] == 201
    conn = connect(pg_url)
    try:
        event, member = conn.execute("SELECT id, member_id FROM events ORDER BY id LIMIT 1").fetchone()
        conn.execute("INSERT INTO event_deliveries (webhook_id, event_id, member_id, state, attempts, "
                     "first_attempt_at, next_attempt_at, last_error) VALUES (?, ?, ?, 'dead', 9, 1.0, 2.0, 'HTTP 500')",
                     ("crm", event, member))
    finally:
        conn.close()
    config = write_config(tmp_path, pg_url)
    assert await run("events", "retry", "--config", config, "--webhook", "warehouse") == 0
    assert "0 dead deliveries queued again" in capsys.readouterr().out
    assert await run("events", "retry", "--config", config, "--webhook", "crm") == 0
    assert "1 dead delivery queued again" in capsys.readouterr().out
    (delivery,) = rows(pg_url, "event_deliveries")["event_deliveries"]
    assert delivery[3:5] == ("pending", 0)


def test_backup_refuses_postgresql_in_one_line(tmp_path, pg_url, capsys):
    out = tmp_path / "copy.db"
    assert cli(["backup", "--out", str(out), "--config", write_config(tmp_path, pg_url)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pg_basebackup" in err and "pg_dump" in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "copy.db.partial").exists()


def test_a_command_without_postgresql_says_so_in_one_line(tmp_path, capsys):
    config = write_config(tmp_path, f"postgresql://postgres@/none?host={tmp_path}&port=1")
    assert cli(["events", "retry", "--config", config]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cannot connect to PostgreSQL: ") and "(database.url)" in err and err.count("\n") == 1


def test_rotate_key_finds_the_stale_hashes_whatever_the_database_collation(pg_url):
    """A database created for people's text (here ICU's en-US) orders `~k2~...` among the hex
    digits and ignores `\\x7f`: the hashes still to wrap are found by their bytes all the same."""
    from server.privacy import Privacy
    from storage import member_care
    from storage.pg.database import PgDatabase

    db = PgDatabase.from_config(DatabaseConfig(url=pg_url))
    db.open()
    try:
        privacy = Privacy(b"the-first-key-of-these-tests", [("k2", b"the-second-key-of-these-tests")])
        stale = ["0" * 64, "a" * 64, "f" * 64]
        wrapped = [privacy.rewrap("card", "1" * 64), privacy.rewrap("card", "b" * 64)]

        def setup(conn):
            conn.execute('ALTER TABLE cards ALTER COLUMN card TYPE text COLLATE "en-US-x-icu"')
            member = conn.execute("INSERT INTO members (enrolled_at, updated_at) VALUES ('x', 'x') RETURNING id")
            member_id = member.fetchone()[0]
            conn.executemany("INSERT INTO cards (card, card_last4, member_id, created_at) VALUES (?, '0000', ?, 'x')",
                             [(card, member_id) for card in stale + wrapped])
        db.write_sync(setup)
        in_force = privacy.in_force_range()
        assert db.read_sync(lambda c: member_care.count_stale(c, "cards", "card", in_force)) == len(stale)
        assert db.read_sync(lambda c: member_care.stale_hashes(c, "cards", "card", in_force, 10)) == stale
    finally:
        db.close()
