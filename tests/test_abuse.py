"""Nobody in who does not belong: rate limits per key, stores per register key, admin for
managers only, and an audit log of every admin request that cannot be quietly edited."""
from __future__ import annotations

import asyncio
import hashlib

import pytest

from conftest import line, migrated_connection, receipt, tamper
from server.keys import DATABASE
from server.routes import ROUTES
from storage import admin_audit
from storage.sql import integrity_errors
from test_error_shape import assert_error_shape

NOW = "2026-11-24T12:00:05+02:00"


def db_of(api):
    return api.client.server.app[DATABASE]


async def test_one_registers_flood_is_refused_and_never_refuses_another(make_api):
    api = await make_api(now=NOW, limits={"requests_per_second_per_key": 20, "burst": 10})

    async def flood(n):
        return await api.post("/v1/receipts/calculate", receipt(f"F-{n}", [line(1, "dairy", 100)]),
                              as_="register")

    async def paced_other():
        out = []
        for n in range(8):           # interleaved with the flood, inside S002's own budget
            out.append(await api.post("/v1/receipts/calculate",
                                      receipt(f"O-{n}", [line(1, "dairy", 100)], store="S002"), as_="register2"))
            await asyncio.sleep(0.05)
        return out

    flooded, others = await asyncio.gather(asyncio.gather(*(flood(n) for n in range(200))), paced_other())
    statuses = [s for s, _ in flooded]
    assert set(statuses) == {200, 429} and statuses.count(429) >= 150, statuses
    for status, body in flooded:
        if status == 429:
            assert_error_shape(body)
            assert body["error"]["code"] == "rate_limited"
        else:                        # what got through is answered in full
            assert body["receipt"]["receipt_id"].startswith("F-") and body["accrued"]["points"] == 0
    # The other register's key has a budget of its own: each request answered, in full.
    assert [s for s, _ in others] == [200] * 8
    assert [body["receipt"]["receipt_id"] for _, body in others] == [f"O-{n}" for n in range(8)]


async def test_429_carries_retry_after(make_api):
    api = await make_api(now=NOW, limits={"requests_per_second_per_key": 0.5, "burst": 1})
    assert (await api.get("/v1/admin/rules"))[0] == 200
    resp = await api.client.get("/v1/admin/rules", headers={"Authorization": "Bearer test-manager"})
    assert resp.status == 429
    assert int(resp.headers["Retry-After"]) >= 1
    assert_error_shape(await resp.json())


async def test_the_bucket_refills():
    from server.guards import TokenBuckets
    now = [0.0]
    buckets = TokenBuckets(rate=2, burst=2, clock=lambda: now[0])
    assert [buckets.take("k") for _ in range(2)] == [0, 0]
    assert buckets.take("k") == pytest.approx(0.5)
    assert buckets.take("other") == 0
    now[0] += 0.5
    assert buckets.take("k") == 0


REGISTER_CALLS = [
    ("POST", "/v1/receipts/calculate", receipt("X-1", [line(1, "dairy", 100)], store="S002")),
    ("POST", "/v1/receipts", receipt("X-2", [line(1, "dairy", 100)], store="S002")),
    ("POST", "/v1/receipts/S002/K01/X-3/cancel", None),
    ("POST", "/v1/returns", {"return_id": "R-1", "store_id": "S002", "register_id": "K01",
                             "receipt": {"store_id": "S002", "register_id": "K01", "receipt_id": "X-2"},
                             "lines": [{"line_no": 1, "qty": 1}]}),
    ("POST", "/v1/members", {"card": "7000000000099", "store_id": "S002"}),
]


def test_every_store_bound_register_route_is_covered():
    covered = {path for _, path, _ in REGISTER_CALLS}
    register_posts = {r.path for r in ROUTES if r.roles and "register" in r.roles and r.method == "POST"}
    assert {p.replace("{store_id}/{register_id}/{receipt_id}", "S002/K01/X-3") for p in register_posts} == covered


@pytest.mark.parametrize("method,path,body", REGISTER_CALLS)
async def test_register_key_is_limited_to_its_stores(make_api, method, path, body):
    api = await make_api(now=NOW)
    status, data = await api.call(method, path, body, as_="register")
    assert status == 403, data
    assert_error_shape(data)
    assert data["error"]["code"] == "forbidden"


ADMIN = [r for r in ROUTES if r.path.startswith("/v1/admin/")]


@pytest.mark.parametrize("route", ADMIN, ids=lambda r: f"{r.method} {r.path}")
@pytest.mark.parametrize("role", ["register", "monitor"])
async def test_only_managers_reach_admin_paths(make_api, route, role):
    api = await make_api(now=NOW)
    path = (route.path.replace("{card}", "7000000000001").replace("{version}", "sha256:" + "0" * 64)
            .replace("{member_id}", "m_1").replace("{id}", "staff").replace("{campaign}", "xmas")
            .replace("{rule}", "base"))
    status, data = await api.call(route.method, path, {} if route.body else None, as_=role)
    assert status == 403, data
    assert_error_shape(data)
    rows = await db_of(api).read(lambda c: admin_audit.rows(c))
    assert [(r["key_id"], r["method"], r["status"]) for r in rows] == \
        [({"register": "register-S001", "monitor": "prometheus"}[role], route.method, 403)]


@pytest.mark.parametrize("method,path", [("PATCH", "/v1/members/7000000000001"),
                                         ("GET", "/v1/members/7000000000001/statement")])
async def test_member_management_is_for_managers(make_api, method, path):
    api = await make_api(now=NOW)
    status, data = await api.call(method, path, {"tags": ["x"]} if method == "PATCH" else None, as_="register")
    assert status == 403
    assert_error_shape(data)


async def test_every_admin_action_is_audited_in_a_hash_chain(make_api):
    api = await make_api(now=NOW)
    card = "7000000000001"
    assert (await api.post("/v1/members", {"card": card}))[0] == 201
    body = {"card": card, "points": 50, "reason": "goodwill", "adjustment_id": "A-1"}
    assert (await api.post("/v1/admin/adjustments", body))[0] == 201
    assert (await api.put(f"/v1/admin/members/{card}/tier", {"tier": "gold", "until": "2026-12-31"}))[0] == 200
    assert (await api.get("/v1/admin/rules"))[0] == 200
    assert (await api.post("/v1/admin/rules/check", {"files": {"a.yaml": "rules: ["}}))[0] == 200
    assert (await api.post("/v1/admin/adjustments", {"card": card}))[0] == 422
    db = db_of(api)
    rows = list(reversed(await db.read(lambda c: admin_audit.rows(c))))
    assert [(r["key_id"], r["method"], r["status"]) for r in rows] == [
        ("manager", "POST", 201), ("manager", "PUT", 200), ("manager", "GET", 200),
        ("manager", "POST", 200), ("manager", "POST", 422)]
    assert rows[0]["path"] == "/v1/admin/adjustments"
    assert rows[1]["path"].startswith("/v1/admin/members/hmac-") and card not in rows[1]["path"]
    # The digest is keyed: a body with a card number in it cannot be confirmed by guessing.
    plain = hashlib.sha256(api_body(body)).hexdigest()
    assert rows[0]["body_digest"] != plain and len(rows[0]["body_digest"]) == 64
    assert all(r["at"] for r in rows)
    check = await db.read(admin_audit.verify)
    assert check.ok and check.rows == 5

    # Append-only: the triggers refuse changes.
    def edit(conn):
        conn.execute("UPDATE audit_log SET key_id = 'someone' WHERE id = 1")
    with pytest.raises(integrity_errors(), match="append-only"):
        await db.write(edit)

    def remove(conn):
        conn.execute("DELETE FROM audit_log WHERE id = 2")
    with pytest.raises(integrity_errors(), match="append-only"):
        await db.write(remove)


@pytest.mark.parametrize("role,status", [("manager", 422), ("register", 403)])
async def test_a_deeply_nested_admin_body_is_answered_and_audited(make_api, role, status):
    """The audit row keeps a refused body's reason: a body too deep to read has none, and
    still gets its answer and its row."""
    api = await make_api(now=NOW)
    raw = b'{"reason": "x", "merge_id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    got, data = await api.call("POST", "/v1/admin/members/merge", as_=role, raw=raw)
    assert got == status, data
    assert_error_shape(data)
    rows = await db_of(api).read(lambda c: admin_audit.rows(c))
    assert [(r["path"], r["status"], r["detail"]) for r in rows] == [("/v1/admin/members/merge", status, None)]


def api_body(body: dict) -> bytes:
    import json
    return json.dumps(body).encode()


def test_verify_finds_the_first_changed_row(tmp_path):
    conn = migrated_connection(tmp_path / "a.db")
    for i in range(5):
        admin_audit.append(conn, at=f"2026-11-24T10:00:0{i}.000000Z", key_id="manager", key_name="Manager",
                           method="POST", path="/v1/admin/rules/reload", body_digest="0" * 64, status=200)
    assert admin_audit.verify(conn).ok
    # Someone with write access gets past the guard and edits a row: the chain shows where.
    tamper(conn, "audit_log", "UPDATE audit_log SET key_id = 'intruder' WHERE id = 3")
    result = admin_audit.verify(conn)
    assert not result.ok and result.first_bad_id == 3
    tamper(conn, "audit_log", "UPDATE audit_log SET key_id = 'manager' WHERE id = 3")
    tamper(conn, "audit_log", "DELETE FROM audit_log WHERE id = 2")
    result = admin_audit.verify(conn)
    assert not result.ok and result.first_bad_id == 3
