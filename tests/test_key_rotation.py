"""Card and phone hash key rotation: `loyalty privacy rotate-key` wraps every stored hash in
the new key while the server serves, every card found throughout; a server started without a
key its hashes were made with refuses to start instead of finding no card."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
import yaml

from conftest import KEYS, MARKET, connect, database_section, migrated_connection
from server.config import ConfigError, config_from_dict
from server.cvm import members_of_cards
from server.privacy import Digest, Privacy, candidates, marked, privacy_from_config
from storage import ledger, member_care
from storage.sql import is_postgresql
from test_crash_safety import NOW, Server

FIRST_KEY = "the-first-key-of-these-tests"
SECOND_KEY = "the-second-key-of-these-tests"
ROTATED = {"hmac_key": FIRST_KEY, "hmac_key_rotations": [{"id": "k2", "key": SECOND_KEY}]}
CARDS = [f"70000000{n:05d}" for n in range(40)]
ROOT = Path(__file__).parent.parent


def call(server, method, path, body=None, role="manager"):
    resp = requests.request(method, server.url(path), json=body, timeout=10,
                            headers={"Authorization": f"Bearer {KEYS[role]}"})
    return resp.status_code, resp.json()


# Rotating with no server running: SQLite's serve lock tells the command it is alone.
ALONE = ("rotates alone, which only SQLite's serve lock can tell; on PostgreSQL a server started on the new "
         "config records its keys first (server/privacy.py)")


def rotate(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", "privacy", "rotate-key", "--config", str(config),
                           *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def audit_verify(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", "audit", "verify", "--config", str(config)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def stored_hashes(db: Path) -> list[str]:
    with connect(db) as conn:
        return [r[0] for r in conn.execute("SELECT card FROM cards UNION ALL SELECT card FROM retired_cards "
                                           "UNION ALL SELECT phone_hmac FROM members WHERE phone_hmac IS NOT NULL")]


class Lookups(threading.Thread):
    """Looks every card up, and confirms receipts, until stopped; keeps every answer's status."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.server, self.stop, self.statuses, self.n = server, threading.Event(), [], 0

    def run(self):
        while not self.stop.is_set():
            card = CARDS[self.n % len(CARDS)]
            self.statuses.append((card, call(self.server, "GET", f"/v1/members/{card}", role="register")[0]))
            body = {"receipt_id": f"L-{self.n}", "store_id": "S001", "register_id": "K01", "ts": NOW, "card": card,
                    "lines": [{"line_no": 1, "sku": "x", "category": "grocery", "qty": 1, "price": 1000,
                               "amount": 1000}], "total": 1000}
            self.statuses.append((card, call(self.server, "POST", "/v1/receipts", body, role="register")[0]))
            self.n += 1


def test_rotation_while_serving_finds_every_card_throughout(tmp_path):
    first = Server(tmp_path, privacy={"hmac_key": FIRST_KEY})
    first.start()
    try:
        for n, card in enumerate(CARDS):
            fields = {"phone": f"+38050{n:07d}"} if n % 2 else {}
            assert call(first, "POST", "/v1/members", {"card": card, **fields})[0] == 201
        assert call(first, "POST", "/v1/admin/members/m_1/replace-card", {"new_card": "7100000000001"})[0] == 201
        CARDS[0] = "7100000000001"
        rotated = Server(tmp_path, privacy=ROTATED)     # same database, the key added
        # Beside a server that has not taken the new key up, nothing is wrapped.
        refused = rotate(rotated.config)
        assert refused.returncode == 2 and "restart it with this config first" in refused.stderr
        assert "restart it" not in refused.stdout     # a refusal is an error: on stderr
    finally:
        first.kill()
    assert all(not h.startswith("~") for h in stored_hashes(first.db))

    rotated.start()
    try:
        lookups = Lookups(rotated)
        lookups.start()
        run = rotate(rotated.config, "--batch-rows", "7")
        assert call(rotated, "POST", "/v1/members", {"card": "7200000000001"})[0] == 201
        lookups.stop.set()
        lookups.join(30)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "cards.card: 40 of 40 wrapped" in run.stdout and "members.phone_hmac: 20 of 20" in run.stdout
        assert lookups.n > 0 and {s for _, s in lookups.statuses} <= {200, 201}, lookups.statuses
        hashes = stored_hashes(rotated.db)
        assert len(hashes) == 40 + 1 + 1 + 20 and all(h.startswith("~k2~") for h in hashes)
        for card in CARDS + ["7200000000001"]:
            assert call(rotated, "GET", f"/v1/members/{card}", role="register")[0] == 200
        status, err = call(rotated, "GET", "/v1/members/7000000000000")
        assert status == 404 and err["error"]["code"] == "card_replaced"
        status, found = call(rotated, "POST", "/v1/admin/members/search", {"phone": "+380500000003"})
        assert status == 200 and [m["member_id"] for m in found["members"]] == ["m_4"]
        again = rotate(rotated.config)
        assert again.returncode == 0 and "done: 0 hash(es) wrapped" in again.stdout
    finally:
        rotated.kill()
    verified = audit_verify(rotated.config)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    # Without the first key no hash can be found: the server says so instead of serving.
    second_only = Server(tmp_path, privacy={"hmac_key": SECOND_KEY})
    with pytest.raises(RuntimeError, match="the first key .* is not the key this database's card and phone"):
        second_only.start()
    assert second_only.proc.wait(10) == 2
    # Nor without the rotation's key.
    with pytest.raises(RuntimeError, match=r"wrapped in key k2 .*list it again in its place"):
        Server(tmp_path, privacy={"hmac_key": FIRST_KEY}).start()
    rotated_again = Server(tmp_path, privacy=ROTATED)
    rotated_again.start()
    try:
        assert call(rotated_again, "GET", f"/v1/members/{CARDS[5]}", role="register")[0] == 200
    finally:
        rotated_again.kill()


@pytest.mark.sqlite_only(reason=ALONE)
def test_rotate_key_alone_wraps_everything_and_goes_on_where_it_stopped(tmp_path):
    server = Server(tmp_path, privacy={"hmac_key": FIRST_KEY})
    server.start()
    try:
        for card in CARDS[:10]:
            assert call(server, "POST", "/v1/members", {"card": card})[0] == 201
    finally:
        server.kill()
    config = tmp_path / "rotated.yaml"
    raw = yaml.safe_load(server.config.read_text())
    raw["privacy"] = ROTATED
    config.write_text(yaml.safe_dump(raw))
    with connect(server.db) as conn:     # as if a run had stopped after three rows
        privacy = Privacy(FIRST_KEY.encode(), [("k2", SECOND_KEY.encode())])
        for (old,) in conn.execute("SELECT card FROM cards ORDER BY card LIMIT 3").fetchall():
            conn.execute("UPDATE cards SET card = ? WHERE card = ?", (privacy.rewrap("card", old), old))
    run = rotate(config)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "cards.card: 7 of 7 wrapped" in run.stdout
    assert all(h.startswith("~k2~") for h in stored_hashes(server.db))


def first_and_rotated(folder) -> dict:
    """Two configs of one database: under the first key, and rotated from it."""
    configs = {}
    for name, privacy in (("first", {"hmac_key": FIRST_KEY}), ("rotated", ROTATED)):
        configs[name] = folder / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump({
            "database": database_section(folder / "loyalty.db"), "rules": {"dir": str(MARKET), "watch": False},
            "clock": {"start": NOW}, "privacy": privacy}))
    return configs


@pytest.mark.sqlite_only(reason=ALONE)
def test_ctrl_c_stops_the_rotation_between_batches_and_a_run_again_finishes_it(tmp_path, capsys, monkeypatch):
    from server.cli import main as cli
    members = tmp_path / "members.csv"
    members.write_text("card\n" + "".join(f"{card}\n" for card in CARDS[:5]))
    configs = first_and_rotated(tmp_path)
    assert cli(["import", "members", "--csv", str(members), "--config", str(configs["first"])]) == 0
    rewrap = member_care.rewrap

    def ctrl_c_during_the_first_batch(conn, table, column, pairs):
        os.kill(os.getpid(), signal.SIGINT)
        return rewrap(conn, table, column, pairs)
    monkeypatch.setattr(member_care, "rewrap", ctrl_c_during_the_first_batch)
    capsys.readouterr()
    rotate_key = ["privacy", "rotate-key", "--config", str(configs["rotated"]), "--batch-rows", "2"]
    assert cli(rotate_key) == 130
    out, err = capsys.readouterr()
    assert out == "cards.card: 2 of 5 wrapped\n"
    assert err.splitlines()[-1] == ("interrupted (Ctrl-C): the hashes counted above are wrapped; run it again, "
                                    "it goes on where it stopped")
    assert sorted(h.startswith("~k2~") for h in stored_hashes(tmp_path / "loyalty.db")) == [False] * 3 + [True] * 2
    monkeypatch.undo()
    assert cli(rotate_key) == 0
    assert "cards.card: 3 of 3 wrapped" in capsys.readouterr().out
    assert all(h.startswith("~k2~") for h in stored_hashes(tmp_path / "loyalty.db"))


def sale(receipt_id: str, card: str, amount: int = 1000) -> dict:
    return {"receipt_id": receipt_id, "store_id": "S001", "register_id": "K01", "ts": NOW, "card": card,
            "lines": [{"line_no": 1, "sku": "x", "category": "grocery", "qty": 1, "price": amount,
                       "amount": amount}], "total": amount}


def test_a_receipt_confirmed_before_a_rotation_is_replayed_while_it_runs_and_after(tmp_path):
    first = Server(tmp_path, privacy={"hmac_key": FIRST_KEY})
    first.start()
    try:
        answers = {}
        for n, card in enumerate(CARDS[:3]):
            assert call(first, "POST", "/v1/members", {"card": card})[0] == 201
            status, answers[n] = call(first, "POST", "/v1/receipts", sale(f"R-{n}", card), role="register")
            assert status == 201
    finally:
        first.kill()
    rotated = Server(tmp_path, privacy=ROTATED)
    rotated.start()
    try:
        # While the rotation runs: some cards wrapped in the new key, others not yet.
        with connect(rotated.db) as conn:
            privacy = Privacy(FIRST_KEY.encode(), [("k2", SECOND_KEY.encode())])
            old = privacy.card(CARDS[0]).older[0]
            conn.execute("UPDATE cards SET card = ? WHERE card = ?", (privacy.rewrap("card", old), old))
        for moment in ("while it runs", "after it finished"):
            for n, card in enumerate(CARDS[:3]):
                status, again = call(rotated, "POST", "/v1/receipts", sale(f"R-{n}", card), role="register")
                assert status == 200, (moment, again)
                assert again == {**answers[n], "replayed": True}, moment
            # Another body under the same identity is still a conflict, under either key.
            status, err = call(rotated, "POST", "/v1/receipts", sale("R-0", CARDS[0], 2000), role="register")
            assert status == 409 and err["error"]["code"] == "idempotency_conflict", moment
            status, err = call(rotated, "POST", "/v1/receipts", sale("R-1", CARDS[2]), role="register")
            assert status == 409 and err["error"]["code"] == "idempotency_conflict", moment
            if moment == "while it runs":
                run = rotate(rotated.config)
                assert run.returncode == 0, run.stdout + run.stderr
        assert all(h.startswith("~k2~") for h in stored_hashes(rotated.db))
        # A new receipt under the new key is fingerprinted with it, and replays as well.
        assert call(rotated, "POST", "/v1/receipts", sale("R-new", CARDS[1]), role="register")[0] == 201
        assert call(rotated, "POST", "/v1/receipts", sale("R-new", CARDS[1]), role="register")[0] == 200
    finally:
        rotated.kill()


@pytest.mark.sqlite_only(reason=ALONE)
def test_a_hash_under_a_key_no_longer_listed_stops_the_rotation_naming_it(tmp_path):
    server = Server(tmp_path, privacy={"hmac_key": FIRST_KEY})
    server.start()
    try:
        assert call(server, "POST", "/v1/members", {"card": CARDS[1]})[0] == 201
    finally:
        server.kill()
    with connect(server.db) as conn:
        conn.execute("UPDATE cards SET card = '~gone~' || card")
    rotated = Server(tmp_path, privacy=ROTATED)
    run = rotate(rotated.config)
    assert run.returncode == 1 and "key 'gone'" in run.stderr


def test_a_wrapped_hash_is_the_hash_under_every_key_in_turn():
    first = Privacy(FIRST_KEY.encode())
    both = Privacy(FIRST_KEY.encode(), [("k2", SECOND_KEY.encode())])
    digest = both.card("7000000000001")
    assert digest.startswith("~k2~") and candidates(digest) == (digest, first.card("7000000000001"))
    assert both.rewrap("card", first.card("7000000000001")) == digest
    assert both.rewrap("card", digest) == digest
    assert both.rewrap("phone", first.phone("+380 50 123 45 67")) == both.phone("380501234567")
    assert both.rewrap("card", "~other~abc") is None
    assert candidates(first.card("7000000000001")) == (first.card("7000000000001"),)


@pytest.mark.parametrize("rotation, words", [
    ({"id": "k2"}, "exactly one of key_env and key"),
    ({"id": "k2", "key": SECOND_KEY, "key_env": "X"}, "exactly one of key_env and key"),
    ({"id": "k2", "key_env": "LOYALTY_TEST_UNSET_KEY"}, "LOYALTY_TEST_UNSET_KEY is not set"),
])
def test_a_rotation_without_its_key_stops_start_up(rotation, words):
    config = config_from_dict({"privacy": {"hmac_key": FIRST_KEY, "hmac_key_rotations": [rotation]}})
    with pytest.raises(ConfigError, match=words):
        privacy_from_config(config, environ={})


def test_a_rotation_key_id_is_checked_by_the_config():
    with pytest.raises(ConfigError, match="hmac_key_rotations"):
        config_from_dict({"privacy": {"hmac_key_rotations": [{"id": "Has Spaces", "key": SECOND_KEY}]}})


@pytest.mark.sqlite_only(reason=ALONE)
def test_an_import_run_again_after_a_rotation_changes_nothing(tmp_path, capsys):
    from server.cli import main as cli
    from test_import_members import ledger_state
    members = tmp_path / "members.csv"
    members.write_text("card,opening_points\n" + "".join(f"{card},{n + 1}\n" for n, card in enumerate(CARDS[:5])))
    history = tmp_path / "history.jsonl"
    history.write_text("".join(json.dumps({**sale(f"H-{n}", card), "ts": "2026-11-01T12:00:00+02:00"}) + "\n"
                               for n, card in enumerate(CARDS[:5])))
    configs = first_and_rotated(tmp_path)
    for command in (["members", "--csv", str(members)], ["receipts", "--jsonl", str(history)]):
        assert cli(["import", *command, "--config", str(configs["first"])]) == 0
    done = ledger_state(tmp_path / "loyalty.db")
    capsys.readouterr()
    for moment in ("before the hashes are wrapped", "after"):
        assert cli(["import", "members", "--csv", str(members), "--config", str(configs["rotated"])]) == 0, moment
        assert cli(["import", "receipts", "--jsonl", str(history), "--config", str(configs["rotated"])]) == 0, moment
        out = capsys.readouterr().out
        assert "5 members rows: 0 imported, 0 updated, 5 already there, 0 refused" in out, (moment, out)
        assert "5 receipts rows: 0 imported, 5 already there, 0 refused" in out, (moment, out)
        if moment != "after":
            assert rotate(configs["rotated"]).returncode == 0
    hashes = stored_hashes(tmp_path / "loyalty.db")
    assert len(hashes) == 5 and all(h.startswith("~k2~") for h in hashes)
    after = ledger_state(tmp_path / "loyalty.db")
    assert (after[0], after[2], after[3]) == (done[0], done[2], done[3])    # only the cards' hashes are wrapped


class WrappedAfterFirstStatement:
    """A connection on which `privacy rotate-key` wraps the card right after the first
    statement a look-up runs, as a rotation committing between two statements of one
    look-up shows on PostgreSQL, where each statement reads its own snapshot."""

    def __init__(self, conn, old: str, new: str):
        self.conn, self.old, self.new, self.statements = conn, old, new, 0

    def execute(self, sql, params=()):
        rows = self.conn.execute(sql, params).fetchall()
        self.statements += 1
        if self.statements == 1:
            for table in ("cards", "retired_cards"):
                self.conn.execute(f"UPDATE {table} SET card = ? WHERE card = ?", (self.new, self.old))
        return _Rows(rows)


class _Rows(list):
    """The rows a statement read, with a cursor's fetchone()."""

    def fetchone(self):
        return self[0] if self else None


def digest_during_rotation(old: str, new: str) -> Digest:
    digest = Digest(new)
    digest.older = (old,)
    return digest


@pytest.mark.parametrize("look_up", ["member", "lock", "console", "segment_list", "retired"])
def test_a_card_wrapped_while_it_is_looked_up_is_found(tmp_path, look_up):
    old, new = "a" * 64, marked("b" * 64, "k2")
    conn = migrated_connection(tmp_path / "loyalty.db")
    try:
        member_id = ledger.insert_member(conn, card=old, card_last4="0001", phone_hmac=None, phone_last4=None,
                                         birthday=None, tags="[]", referred_by=None, store_id=None, now=NOW)
        if look_up == "retired":
            member_care.retire_card(conn, old, member_id, "replaced", "0002", NOW)
        if look_up == "lock" and not is_postgresql(conn):
            pytest.skip("members are locked by row only on PostgreSQL; SQLite's one writer orders writes")
        racing = WrappedAfterFirstStatement(conn, old, new)
        card = digest_during_rotation(old, new)
        if look_up == "member":
            assert ledger.member_by_card(racing, card).id == member_id
        elif look_up == "lock":
            from storage.pg.ledger import lock_member_by_card
            assert lock_member_by_card(racing, card) == member_id
        elif look_up == "console":
            assert ledger.member_id_of_card(racing, card) == member_id
        elif look_up == "segment_list":
            privacy = type("P", (), {"card": staticmethod(lambda number: card)})
            assert members_of_cards(racing, privacy, ["7000000000001"]) == [member_id]
        else:
            found = member_care.retired_card(racing, card)
            assert found is not None and found.member_id == member_id
    finally:
        conn.close()


def test_commands_under_other_keys_than_the_servers_refuse_and_enrol_no_card_twice(tmp_path, capsys):
    """A command run with a config that lacks a key the stored hashes are wrapped in would
    not find an enrolled card and would enrol it a second time; one with a key no server has
    taken up would store hashes no server finds. Both are refused, as the server refuses to
    start, and nothing is written."""
    from server.cli import main as cli
    members = tmp_path / "members.csv"
    members.write_text("card,opening_points\n" + "".join(f"{card},10\n" for card in CARDS[:3]))
    configs = first_and_rotated(tmp_path)
    assert cli(["import", "members", "--csv", str(members), "--config", str(configs["rotated"])]) == 0
    with connect(tmp_path / "loyalty.db") as conn:    # what the server records at its start
        rotated = Privacy(FIRST_KEY.encode(), [("k2", SECOND_KEY.encode())])
        assert member_care.record_keys(conn, rotated.key_checks(), NOW) is None
        conn.commit()
    third = tmp_path / "third.yaml"
    raw = yaml.safe_load(configs["rotated"].read_text())
    raw["privacy"]["hmac_key_rotations"].append({"id": "k3", "key": "the-third-key-of-these-tests"})
    third.write_text(yaml.safe_dump(raw))
    receipt = tmp_path / "receipt.json"
    receipt.write_text(json.dumps(sale("E-1", CARDS[0])))
    capsys.readouterr()
    for config, why in ((configs["first"], "wrapped in key k2"), (third, "key k3 is not in use on this database yet")):
        assert cli(["import", "members", "--csv", str(members), "--config", str(config)]) == 2
        assert why in capsys.readouterr().err
        assert cli(["coupons", "generate", "--campaign", "xmas", "--count", "1", "--out", str(tmp_path / "c.csv"),
                    "--config", str(config)]) == 2
        assert why in capsys.readouterr().err and not (tmp_path / "c.csv").exists()
        assert cli(["rules", "explain", str(receipt), "--config", str(config)]) == 2
        assert why in capsys.readouterr().err
    with connect(tmp_path / "loyalty.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM members").fetchone()[0] == 3
    assert cli(["import", "members", "--csv", str(members), "--config", str(configs["rotated"])]) == 0
    assert "3 members rows: 0 imported, 0 updated, 3 already there" in capsys.readouterr().out


def test_a_card_enrolled_under_the_first_key_is_not_enrolled_again_before_the_rotation_wraps_it(tmp_path):
    # A register enrolling a customer's card again after the restart on the new key: one member,
    # and a rotation that can still wrap every card.
    first = Server(tmp_path, privacy={"hmac_key": FIRST_KEY})
    first.start()
    try:
        assert call(first, "POST", "/v1/members", {"card": "7300000000001"})[0] == 201
    finally:
        first.kill()
    rotated = Server(tmp_path, privacy=ROTATED)
    rotated.start()
    try:
        status, err = call(rotated, "POST", "/v1/members", {"card": "7300000000001"}, role="register")
        assert status == 409 and err["error"]["code"] == "card_already_enrolled", err
        assert call(rotated, "POST", "/v1/members", {"card": "7300000000002"})[0] == 201
        assert call(rotated, "POST", "/v1/members", {"card": "7300000000002"})[0] == 409
        run = rotate(rotated.config)
        assert run.returncode == 0 and "done: 1 hash(es) wrapped" in run.stdout, run.stdout + run.stderr
        status, err = call(rotated, "POST", "/v1/members", {"card": "7300000000001"})
        assert status == 409 and err["error"]["code"] == "card_already_enrolled", err
    finally:
        rotated.kill()
    with connect(rotated.db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM members").fetchone()[0] == 2


def test_a_card_enrolled_twice_by_an_earlier_version_stops_the_rotation_naming_both_members(tmp_path):
    # Versions before enrolled a card again under the new key while its row was under the first:
    # the rotation cannot keep both hashes, and says which members to merge before running again.
    first = Server(tmp_path, privacy={"hmac_key": FIRST_KEY})
    first.start()
    try:
        assert call(first, "POST", "/v1/members", {"card": "7300000000001"})[0] == 201
        assert call(first, "POST", "/v1/members", {"card": "7300000000009"})[0] == 201
    finally:
        first.kill()
    rotated = Server(tmp_path, privacy=ROTATED)
    rotated.start()
    try:
        assert call(rotated, "POST", "/v1/members", {"card": "7300000000002"})[0] == 201     # m_3
        with connect(rotated.db) as conn:   # m_3's card made the second hash of m_1's, as those versions did
            conn.execute("UPDATE cards SET card = ? WHERE member_id = 3",
                         (Privacy(FIRST_KEY.encode(), [("k2", SECOND_KEY.encode())]).card("7300000000001"),))
            conn.commit()
        run = rotate(rotated.config)
        assert run.returncode == 1, run.stdout + run.stderr
        assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
        assert "cards.card: the same card is stored under an earlier key and under the key in force" in run.stderr
        assert "m_1 (under the earlier key) and m_3" in run.stderr and "/v1/admin/members/merge" in run.stderr
        merged = call(rotated, "POST", "/v1/admin/members/merge", {"merge_id": "twice", "from_member_id": "m_3",
                                                                   "into_member_id": "m_1", "reason": "enrolled twice"})
        assert merged[0] == 201, merged
        run = rotate(rotated.config)
        assert run.returncode == 0, run.stdout + run.stderr
        assert call(rotated, "GET", "/v1/members/7300000000001")[1]["member_id"] == "m_1"
    finally:
        rotated.kill()
