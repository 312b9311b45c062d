"""One process serves. `server.workers` stays a key so a config stating `workers: 1` still
starts; any other value stops start-up with one line saying why, before the database is
touched."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import requests

from conftest import KEYS
from test_crash_safety import Server
from test_startup_errors import start_fails

ROOT = Path(__file__).resolve().parent.parent
RECEIPT = {"receipt_id": "one-process-1", "store_id": "S001", "register_id": "K01", "ts": "2026-11-24T12:00:00+02:00",
           "lines": [{"line_no": 1, "sku": "x", "category": "dairy", "qty": 1, "price": 5000, "amount": 5000}],
           "total": 5000}


def hint_is_right(line: str) -> None:
    assert "server.workers: must be 1: one process serves" in line, line
    assert "single writer is the limit" in line and "on a PostgreSQL database (database.url)" in line, line


def test_workers_above_one_stops_start_up_with_the_reason(tmp_path):
    server = Server(tmp_path, server={"workers": 2})
    line = start_fails(server)
    assert line.startswith(f"config error: {server.config}: server.workers: "), line
    hint_is_right(line)
    assert not server.db.exists()


def test_workers_from_the_environment_is_refused_the_same_way(tmp_path):
    server = Server(tmp_path)
    done = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--config", str(server.config)],
                          env={**os.environ, "LOYALTY_SERVER__WORKERS": "4"}, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = done.stderr.splitlines()
    hint_is_right(line)


def test_a_config_stating_workers_1_serves_from_one_process(tmp_path):
    server = Server(tmp_path, server={"workers": 1})
    server.start()
    try:
        resp = requests.post(server.url("/v1/receipts"), json=RECEIPT,
                             headers={"Authorization": f"Bearer {KEYS['register']}"}, timeout=10)
        assert resp.status_code == 201, resp.text
        assert requests.get(server.url("/readyz"), timeout=10).status_code == 200
        children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children")
        if children.exists():           # Linux with CONFIG_PROC_CHILDREN
            assert children.read_text().split() == [], "the server started other processes"
    finally:
        server.kill()
