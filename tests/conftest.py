"""Test fixtures: the app built from its factory with a test config and a temporary database."""
from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest
import yaml

from server.app import create_app
from server.config import config_from_dict
from server.privacy import rotate_key_command

from pg_cluster import Cluster, ReplicatedPair, bins_or_skip, running
# database_section / connect: the test's database on the backend LOYALTY_TEST_BACKEND names.
from backend import (POSTGRESQL, SESSION, add_members, connect, database_section, migrated_connection,  # noqa: E402,F401
                     storage_database, tamper)

ROOT = Path(__file__).resolve().parent.parent
# The tests' own copies of the shipped programs: a manager who edits rules/programs/ does
# not change what the tests expect.
PROGRAMS = ROOT / "tests" / "programs"
MARKET = PROGRAMS / "market"

TEST_HMAC_KEY = "tests-hmac-key-0123456789"
KEYS = {
    "register": "test-register-s001",
    "register2": "test-register-s002",
    "fuel": "test-register-f001",
    "manager": "test-manager",
    "monitor": "test-monitor",
}


# The throwaway PostgreSQL clusters of tests/pg_cluster.py, skipping with the reason when
# PostgreSQL is absent.

@pytest.fixture
def pg_pair():
    """A primary with a synchronous streaming standby, for failover tests."""
    with running(ReplicatedPair(bins_or_skip())) as pair:
        yield pair


@pytest.fixture(scope="session")
def pg_cluster():
    """The session's cluster, started at the first test that needs it."""
    with running(Cluster(bins_or_skip())) as cluster:
        yield cluster


@pytest.fixture
def pg_url(pg_cluster) -> str:
    """A fresh, empty database of the session's cluster, as a `database.url`."""
    return pg_cluster.url(pg_cluster.createdb())


@pytest.fixture
def pg_database(pg_url):
    """That database opened (migrated) as the server opens it, with two connections."""
    from storage.pg.database import PgDatabase
    db = PgDatabase(pg_url, connections=2)
    db.open()
    yield db
    db.close()


# The PostgreSQL pass (LOYALTY_TEST_BACKEND=postgresql) leaves out what would only repeat
# the SQLite pass or cannot mean anything there:
# - no_database: a test file that opens no database (the rule language, config parsing);
# - sqlite_only(reason): a test whose point is SQLite's file, skipped with its reason;
# - test_pg_*.py and tests taking pg_url, pg_cluster or pg_pair: start clusters of their own
#   and run on PostgreSQL in every pass.
OWN_CLUSTER = {"pg_url", "pg_cluster", "pg_pair"}
MARKERS = ("no_database: opens no database; run in the SQLite pass only",
           "sqlite_only(reason): about SQLite's file; skipped in the PostgreSQL pass with the reason")


def pytest_configure(config):
    for marker in MARKERS:
        config.addinivalue_line("markers", marker)


def pytest_collection_modifyitems(config, items):
    if not POSTGRESQL:
        return
    absent = SESSION.absent_reason()
    kept, left_out = [], []
    for item in items:
        if item.get_closest_marker("no_database") or item.path.name.startswith("test_pg_") \
                or OWN_CLUSTER.intersection(getattr(item, "fixturenames", ())):
            left_out.append(item)
            continue
        sqlite_only = item.get_closest_marker("sqlite_only")
        if sqlite_only:
            item.add_marker(pytest.mark.skip(reason="SQLite only: " + sqlite_only.kwargs.get(
                "reason", sqlite_only.args[0] if sqlite_only.args else "")))
        elif absent:
            item.add_marker(pytest.mark.skip(reason=absent))
        kept.append(item)
    config.hook.pytest_deselected(items=left_out)
    items[:] = kept


@pytest.fixture(autouse=True)
def _test_databases():
    """On PostgreSQL, the databases a test made are dropped at its end."""
    if not POSTGRESQL:
        yield
        return
    SESSION.test_started()
    try:
        yield
    finally:
        SESSION.test_ended()


def pytest_sessionfinish(session):
    SESSION.stop()


def _h(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def test_config(tmp_path: Path, now: str | None = None, program_dir: Path = MARKET, **overrides):
    raw = {
        "server": {"host": "127.0.0.1", "port": 0},
        "database": database_section(tmp_path / "loyalty.db"),
        "rules": {"dir": str(program_dir), "watch": False},
        "privacy": {"hmac_key": TEST_HMAC_KEY},
        # The lifecycle jobs run at start and then each minute: on a loaded machine their first
        # round can come after a test has written its members and receipts and act on them
        # (a birthday paid, lots expired, segments scored). A test of what they do turns them
        # on, or runs them itself.
        "jobs": {"enabled": False},
        "auth": {"keys": [
            {"id": "register-S001", "sha256": _h(KEYS["register"]), "role": "register", "stores": ["S001"]},
            {"id": "register-S002", "sha256": _h(KEYS["register2"]), "role": "register", "stores": ["S002"]},
            {"id": "register-F001", "sha256": _h(KEYS["fuel"]), "role": "register", "stores": ["F001"]},
            {"id": "manager", "sha256": _h(KEYS["manager"]), "role": "manager"},
            {"id": "prometheus", "sha256": _h(KEYS["monitor"]), "role": "monitor"},
        ]},
    }
    if now:
        raw["clock"] = {"start": now}
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw)


test_config.__test__ = False  # a helper, not a test


class Api:
    """Calls the app as a given role and returns (status, decoded JSON)."""

    def __init__(self, client):
        self.client = client

    async def call(self, method: str, path: str, body=None, as_: str = "manager", raw: bytes | None = None,
                   headers: dict | None = None):
        h = {"Authorization": f"Bearer {KEYS[as_]}"} if as_ else {}
        h.update(headers or {})
        kwargs = {"json": body} if body is not None else {}
        if raw is not None:
            kwargs = {"data": raw}
            h.setdefault("Content-Type", "application/json")
        resp = await self.client.request(method, path, headers=h, **kwargs)
        text = await resp.text()
        try:
            import json
            data = json.loads(text) if text else None
        except ValueError:
            data = text
        return resp.status, data

    async def post(self, path, body=None, as_="manager", **kw):
        return await self.call("POST", path, body, as_, **kw)

    async def get(self, path, as_="manager", **kw):
        return await self.call("GET", path, None, as_, **kw)

    async def put(self, path, body, as_="manager"):
        return await self.call("PUT", path, body, as_)

    async def patch(self, path, body, as_="manager"):
        return await self.call("PATCH", path, body, as_)


# Two privacy sections for tests of `privacy rotate-key`: the first key alone, then with k2 in force.
FIRST_PRIVACY = {"hmac_key": "the-first-key-of-these-tests"}
ROTATED_PRIVACY = {**FIRST_PRIVACY, "hmac_key_rotations": [{"id": "k2", "key": "the-second-key-of-these-tests"}]}


async def serve_program(aiohttp_client, tmp_path: Path, now: str, program_yaml: str, privacy: dict | None = None,
                        **overrides) -> Api:
    """An Api on tmp_path's database with the program tmp_path/program, written from
    program_yaml the first time; a later call serves the same database again. Its app is
    `api.app`; overrides are test_config's."""
    program = tmp_path / "program"
    if not program.exists():
        program.mkdir()
        (program / "program.yaml").write_text(program_yaml)
    if privacy is not None:
        overrides["privacy"] = privacy
    app = create_app(test_config(tmp_path, now, program_dir=program, **overrides))
    api = Api(await aiohttp_client(app))
    api.app = app
    return api


async def rotate_keys(tmp_path: Path, now: str, *args) -> int:
    """`privacy rotate-key` up to ROTATED_PRIVACY on serve_program's database (args: the
    command's after the config path), its blocking calls off the test's event loop as from
    a shell."""
    config = tmp_path / "rotated.yaml"
    config.write_text(yaml.safe_dump({"database": database_section(tmp_path / "loyalty.db"),
                                      "rules": {"dir": str(tmp_path / "program"), "watch": False},
                                      "clock": {"start": now}, "privacy": ROTATED_PRIVACY}))
    return await asyncio.to_thread(rotate_key_command, str(config), *args)


@pytest.fixture
def make_api(aiohttp_client, tmp_path):
    """make_api(now="2026-11-24T12:00:05+02:00", program_dir=...) -> Api on a fresh database."""
    async def make(now: str | None = None, program_dir: Path = MARKET, **overrides) -> Api:
        app = create_app(test_config(tmp_path, now, program_dir, **overrides))
        return Api(await aiohttp_client(app))
    return make


def receipt(receipt_id: str, lines: list[dict], card: str | None = None, ts: str = "2026-11-24T12:00:00+02:00",
            store: str = "S001", register: str = "K01", redeem: int = 0, **extra) -> dict:
    body = {"receipt_id": receipt_id, "store_id": store, "register_id": register, "ts": ts, "lines": lines,
            "total": sum(line["amount"] for line in lines)}
    if card:
        body["card"] = card
    if redeem:
        body["redeem_points"] = redeem
    body.update(extra)
    return body


def line(no: int, category: str, amount: int, qty=1, sku: str | None = None, **extra) -> dict:
    return {"line_no": no, "sku": sku or f"sku-{category}-{no}", "category": category, "qty": qty,
            "price": amount, "amount": amount, **extra}
