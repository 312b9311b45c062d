"""The support role: member look-up, statement, profile changes and adjustments up to
auth.support_adjustment_max_points; nothing about the program, keys or reports."""
from __future__ import annotations

import pytest

from conftest import KEYS, _h
from server.config import ConfigError, config_from_dict
from server.keys import DATABASE
from server.routes import ROUTES
from storage import admin_audit
from test_error_shape import assert_error_shape

NOW = "2026-11-24T12:00:05+02:00"
CARD = "7000000000001"
SUPPORT_KEY = "test-support-desk"
CAP = 300


async def support_api(make_api, **auth):
    keys = [{"id": "manager", "sha256": _h(KEYS["manager"]), "role": "manager", "name": "Head office"},
            {"id": "register-S001", "sha256": _h(KEYS["register"]), "role": "register", "stores": ["S001"]},
            {"id": "desk-1", "sha256": _h(SUPPORT_KEY), "role": "support", "name": "Iryna Support"}]
    api = await make_api(now=NOW, auth={"keys": keys, "support_adjustment_max_points": CAP, **auth})
    assert (await api.post("/v1/members", {"card": CARD}))[0] == 201
    return api


async def as_support(api, method, path, body=None):
    return await api.call(method, path, body, as_=None, headers={"Authorization": f"Bearer {SUPPORT_KEY}"})


def adjustment(points: int, n: int) -> dict:
    return {"card": CARD, "points": points, "reason": "customer called", "adjustment_id": f"SUP-{n}"}


async def test_support_looks_up_changes_profiles_and_adjusts_within_the_cap(make_api):
    api = await support_api(make_api)
    status, member = await as_support(api, "GET", f"/v1/members/{CARD}")
    assert status == 200 and member["balance"]["available"] == 100
    status, patched = await as_support(api, "PATCH", f"/v1/members/{CARD}", {"birthday": "1990-05-17"})
    assert status == 200 and patched["profile"]["birthday"] == "1990-05-17"

    status, added = await as_support(api, "POST", "/v1/admin/adjustments", adjustment(CAP, 1))
    assert status == 201, added
    assert (added["key_id"], added["key_name"], added["balance"]["available"]) == ("desk-1", "Iryna Support", 400)
    status, taken = await as_support(api, "POST", "/v1/admin/adjustments", adjustment(-CAP, 2))
    assert status == 201 and taken["balance"]["available"] == 100

    status, statement = await as_support(api, "GET", f"/v1/members/{CARD}/statement")
    assert status == 200
    adjustments = [p for p in statement["postings"] if p["kind"] == "adjustment"]
    assert sum(p["points"] for p in adjustments) == 0 and {p["points"] for p in adjustments} >= {CAP}
    assert {(p["key_id"], p["key_name"]) for p in adjustments} == {("desk-1", "Iryna Support")}


@pytest.mark.parametrize("points", [CAP + 1, -(CAP + 1), 1_000_000])
async def test_a_support_adjustment_beyond_the_cap_is_403_and_writes_nothing(make_api, points):
    api = await support_api(make_api)
    status, body = await as_support(api, "POST", "/v1/admin/adjustments", adjustment(points, 9))
    assert status == 403, body
    assert_error_shape(body)
    assert body["error"]["code"] == "forbidden"
    assert f"at most {CAP} points" in body["error"]["message"] and "manager" in body["error"]["message"]
    assert body["error"]["details"] == [
        {"path": "points", "message": f"must be from -{CAP} to {CAP} for a support key"}]
    _, member = await api.get(f"/v1/members/{CARD}")
    assert member["balance"]["available"] == 100
    # The same adjustment id is still free: a manager may make it.
    status, done = await api.post("/v1/admin/adjustments", adjustment(abs(points), 9))
    assert status == 201 and done["key_name"] == "Head office"


ALLOWED = {("GET", "/v1/members/{card}"), ("PATCH", "/v1/members/{card}"),
           ("GET", "/v1/members/{card}/statement"), ("POST", "/v1/admin/adjustments"),
           ("POST", "/v1/admin/members/search"), ("POST", "/v1/admin/members/{member_id}/replace-card")}
NO_KEY = {r.path for r in ROUTES if r.roles is None}


@pytest.mark.parametrize("route", [r for r in ROUTES if (r.method, r.path) not in ALLOWED and r.path not in NO_KEY],
                         ids=lambda r: f"{r.method} {r.path}")
async def test_support_gets_403_everywhere_else(make_api, route):
    api = await support_api(make_api)
    path = (route.path.replace("{card}", CARD).replace("{store_id}", "S001").replace("{register_id}", "K01")
            .replace("{receipt_id}", "R-1").replace("{version}", "sha256:" + "0" * 64)
            .replace("{member_id}", "m_1").replace("{id}", "staff").replace("{campaign}", "xmas")
            .replace("{rule}", "base"))
    status, body = await as_support(api, route.method, path, {} if route.body else None)
    assert status == 403, body
    assert_error_shape(body)
    assert body["error"]["message"] == "a support key may not use this endpoint"


async def test_the_audit_log_names_the_support_person(make_api):
    api = await support_api(make_api)
    await as_support(api, "POST", "/v1/admin/adjustments", adjustment(10, 1))
    await as_support(api, "POST", "/v1/admin/adjustments", adjustment(CAP + 1, 2))
    await as_support(api, "GET", "/v1/admin/rules")
    assert (await api.post("/v1/admin/adjustments", adjustment(5_000, 3)))[0] == 201
    db = api.client.server.app[DATABASE]
    rows = list(reversed(await db.read(admin_audit.rows)))
    assert [(r["key_id"], r["key_name"], r["path"], r["status"]) for r in rows] == [
        ("desk-1", "Iryna Support", "/v1/admin/adjustments", 201),
        ("desk-1", "Iryna Support", "/v1/admin/adjustments", 403),
        ("desk-1", "Iryna Support", "/v1/admin/rules", 403),
        ("manager", "Head office", "/v1/admin/adjustments", 201)]
    assert (await db.read(admin_audit.verify)).ok
    recorded = await db.read(lambda c: c.execute(
        "SELECT adjustment_id, key_id, key_name FROM adjustments ORDER BY created_at, adjustment_id").fetchall())
    assert [tuple(r) for r in recorded] == [("SUP-1", "desk-1", "Iryna Support"), ("SUP-3", "manager", "Head office")]


def test_the_cap_is_a_positive_whole_number_of_points():
    assert config_from_dict({}).auth.support_adjustment_max_points == 1_000
    for bad in (0, -5, 1.5, "lots"):
        with pytest.raises(ConfigError) as e:
            config_from_dict({"auth": {"support_adjustment_max_points": bad}})
        assert e.value.key == "auth.support_adjustment_max_points"
