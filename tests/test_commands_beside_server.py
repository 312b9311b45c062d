"""The operations commands run beside a serving `loyalty serve` on the same database: only
`serve` takes the one-server lock, and their reads and writes share the file with it."""
from __future__ import annotations

import json
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest
import requests

from conftest import KEYS, _h, connect
from test_crash_safety import NOW, Server
from storage.audit import verify

ROOT = Path(__file__).resolve().parent.parent
CARDS = ["card-0", "card-1", "card-2"]


def loyalty(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def post(server: Server, path: str, body: dict, role: str) -> dict:
    resp = requests.post(server.url(path), json=body, headers={"Authorization": f"Bearer {KEYS[role]}"},
                         timeout=10)
    assert resp.status_code in (200, 201), resp.text
    return resp.json()


def receipt(n: int, store: str, card: str, redeem: int = 0) -> dict:
    return {"receipt_id": f"b-{n}", "store_id": store, "register_id": "K01", "ts": NOW, "card": card,
            "lines": [{"line_no": 1, "sku": "x", "category": "dairy", "qty": 2, "price": 25000, "amount": 50000}],
            "total": 50000, "redeem_points": redeem}


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    """A running server with members, receipts (one at the partner's store, some paid with
    points) and an adjustment; yields it and the points its partner store issued."""
    tmp = tmp_path_factory.mktemp("beside")
    keys = [{"id": "register-S001", "sha256": _h(KEYS["register"]), "role": "register", "stores": ["S001"]},
            {"id": "register-F001", "sha256": _h(KEYS["fuel"]), "role": "register", "stores": ["F001"]},
            {"id": "manager", "sha256": _h(KEYS["manager"]), "role": "manager"}]
    server = Server(tmp, auth={"keys": keys})
    server.start()
    try:
        for card in CARDS:
            post(server, "/v1/members", {"card": card}, "manager")
            post(server, "/v1/admin/adjustments", {"card": card, "points": 1000, "reason": "seed",
                                                   "adjustment_id": f"seed-{card}"}, "manager")
        for n in range(6):
            post(server, "/v1/receipts", receipt(n, "S001", CARDS[n % 3], redeem=100 if n % 2 else 0), "register")
        fuel = post(server, "/v1/receipts", receipt(99, "F001", CARDS[0], redeem=200), "fuel")
        yield server, fuel["accrued"]["points"]
    finally:
        server.kill()


def ledger(server: Server) -> tuple[int, int]:
    """(postings, outstanding liability) read straight from the file."""
    with closing(connect(server.db)) as conn:
        return conn.execute("SELECT COUNT(*), SUM(points) FROM postings").fetchone()


def assert_still_serving(server: Server) -> None:
    assert server.proc.poll() is None
    assert requests.get(server.url("/readyz"), timeout=10).status_code == 200


def test_audit_verify_beside_the_server(serving):
    server, _ = serving
    done = loyalty("audit", "verify", "--config", str(server.config))
    assert done.returncode == 0, done.stdout + done.stderr
    postings, liability = ledger(server)
    assert done.stdout.startswith(f"ok: {postings} postings,"), done.stdout
    assert "7 receipts checked, 3 members" in done.stdout
    # 3 x 1000 seed points + 3 x 100 welcome points - 500 spent + those earned.
    assert 2800 < liability < 3300
    assert f"outstanding liability: {liability} points" in done.stdout
    assert_still_serving(server)


def test_export_ledger_beside_the_server(serving, tmp_path):
    server, _ = serving
    out = tmp_path / "ledger.jsonl"
    done = loyalty("export", "ledger", "--format", "jsonl", "--config", str(server.config), "--out", str(out))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    postings, liability = ledger(server)
    assert [row["id"] for row in rows] == list(range(1, postings + 1))
    assert sum(row["points"] for row in rows) == liability
    assert f"{postings} postings exported" in done.stderr
    assert_still_serving(server)


def test_export_receipts_beside_the_server(serving, tmp_path):
    server, _ = serving
    out = tmp_path / "receipts.jsonl"
    done = loyalty("export", "receipts", "--config", str(server.config), "--out", str(out))
    assert done.returncode == 0, done.stderr
    receipts = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["receipt_id"] for r in receipts) == sorted([f"b-{n}" for n in range(6)] + ["b-99"])
    assert not any(r.get("card") in CARDS for r in receipts)      # card numbers are not in the database
    assert_still_serving(server)


def test_partners_settle_beside_the_server(serving, tmp_path):
    server, issued = serving
    done = loyalty("partners", "settle", "--period", "2026-11", "--config", str(server.config),
                   "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "settlement-2026-11.json").read_text())
    assert [(r["partner"], r["issued_points"], r["redeemed_points"]) for r in rows] == [("fuelco", issued, 200)]
    assert f"issued at its stores: {issued} points" in done.stdout
    assert_still_serving(server)


def test_jobs_run_beside_the_server_then_the_server_writes_on(serving):
    server, _ = serving
    # A year on: every lot of these receipts has expired.
    done = loyalty("jobs", "run", "--config", str(server.config), "--now", "2028-01-01T03:00:00+02:00", "--force")
    assert done.returncode == 0, done.stderr
    counts = dict(part.split(": ") for part in done.stdout.strip().split(", "))
    assert int(counts["expired_lots"]) > 0, done.stdout
    # The server sees the expiry the job wrote, and its own writes go on after it.
    member = requests.get(server.url("/v1/members/card-1?at=2028-01-02"),
                          headers={"Authorization": f"Bearer {KEYS['manager']}"}, timeout=10).json()
    assert member["balance"]["available"] == 0
    post(server, "/v1/receipts", receipt(200, "S001", CARDS[1]), "register")
    audit = loyalty("audit", "verify", "--config", str(server.config))
    assert audit.returncode == 0, audit.stdout



@pytest.mark.sqlite_only(reason="watches one SQLite read transaction's statements (set_trace_callback)")
def test_audit_verify_sees_one_moment_while_the_server_commits(serving):
    """The server commits a receipt in the middle of the audit (after it summed the members'
    postings, before the counter accounts'): the audit still sums to zero, because all its
    checks read one snapshot. Read one after another, they reported
    'accounts do not sum to zero' beside a server under load."""
    server, _ = serving
    posted = []

    def commit_in_the_middle(statement: str) -> None:
        if statement.startswith("SELECT COUNT(*) FROM members") and not posted:
            posted.append(post(server, "/v1/receipts", receipt(300 + len(posted), "S001", CARDS[2]), "register"))

    with closing(connect(server.db)) as conn:
        conn.set_trace_callback(commit_in_the_middle)
        report = verify(conn)
    assert posted and posted[0]["accrued"]["points"] > 0
    assert report.problems == []
    assert report.liability + sum(report.accounts.values()) == 0
    assert report.liability < ledger(server)[1]          # the receipt came after the audit's moment
