"""psycopg is imported only when a PostgreSQL database is opened: serving SQLite (writes,
reads, /metrics) and the commands on it never load the driver, so they do not pay its
import at every start. Each check runs in a fresh interpreter and reads its sys.modules."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import KEYS
from test_crash_safety import NOW, Server

pytestmark = pytest.mark.sqlite_only(reason="that serving SQLite leaves PostgreSQL's driver unloaded")

ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 120     # generous: the machine is shared

SERVE_SQLITE = """
import asyncio, json, sys
from aiohttp.test_utils import TestClient, TestServer
from server.app import create_app
from server.config import load_config

config_path, keys, now = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
manager = {"Authorization": "Bearer " + keys["manager"]}
register = {"Authorization": "Bearer " + keys["register"]}
receipt = {"receipt_id": "R-1", "store_id": "S001", "register_id": "K01", "ts": now, "card": "7000000000001",
           "lines": [{"line_no": 1, "sku": "x", "category": "dairy", "qty": 1, "price": 9100, "amount": 9100}],
           "total": 9100}

async def serve():
    async with TestClient(TestServer(create_app(load_config(config_path)))) as client:
        statuses = []
        for method, path, body, headers in [
                ("POST", "/v1/members", {"card": "7000000000001"}, manager),
                ("POST", "/v1/receipts", receipt, register),
                ("GET", "/v1/members/7000000000001", None, manager),
                ("GET", "/metrics", None, manager)]:
            async with client.request(method, path, json=body, headers=headers) as resp:
                statuses.append(resp.status)
        return statuses

statuses = asyncio.run(serve())
print(json.dumps({"statuses": statuses, "psycopg": sorted(m for m in sys.modules if m.startswith("psycopg"))}))
"""

COMMAND = """
import json, sys
from server.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps({"psycopg": sorted(m for m in sys.modules if m.startswith("psycopg"))}))
"""


def run(script: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(autouse=True)
def psycopg_installed():
    # Otherwise its absence from sys.modules would prove nothing.
    assert importlib.util.find_spec("psycopg") is not None


def test_serving_sqlite_never_imports_psycopg(tmp_path):
    config = Server(tmp_path).config
    seen = run(SERVE_SQLITE, str(config), json.dumps(KEYS), NOW)
    assert seen["statuses"] == [201, 201, 200, 200]
    assert seen["psycopg"] == []


@pytest.mark.parametrize("argv", [["--help"], ["rules", "--help"], ["keys", "list", "--config", "CONFIG"]])
def test_commands_on_sqlite_never_import_psycopg(tmp_path, argv):
    config = Server(tmp_path).config
    assert run(COMMAND, *[str(config) if a == "CONFIG" else a for a in argv])["psycopg"] == []
