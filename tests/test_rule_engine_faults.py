"""A failing rule engine costs one answer, never a receipt: 503 rules_unavailable, nothing
written, and the same receipt (and every later one) goes through afterwards."""
from __future__ import annotations

import pytest

from conftest import line, receipt
from rules import RuleEngineError
from rules.engine import Engine
from server.keys import DATABASE
from test_error_shape import assert_error_shape

NOW = "2026-11-24T12:00:05+02:00"
CARD = "7000000000001"


def fail_once(monkeypatch):
    real = Engine.match
    calls = {"n": 0}

    def match(self, fact):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuleEngineError("engine failed (test)")
        return real(self, fact)
    monkeypatch.setattr(Engine, "match", match)
    return calls


async def count(api, sql):
    return await api.client.server.app[DATABASE].read(lambda c: c.execute(sql).fetchone()[0])


@pytest.mark.parametrize("path", ["/v1/receipts", "/v1/receipts/calculate"])
async def test_engine_failure_answers_503_and_writes_nothing(make_api, monkeypatch, path):
    api = await make_api(now=NOW)
    assert (await api.post("/v1/members", {"card": CARD}))[0] == 201
    postings = await count(api, "SELECT COUNT(*) FROM postings")
    calls = fail_once(monkeypatch)
    body = receipt("RE-1", [line(1, "dairy", 10000), line(2, "bakery", 3000)], card=CARD)
    resp = await api.client.post(path, json=body, headers={"Authorization": "Bearer test-register-s001"})
    assert resp.status == 503
    data = await resp.json()
    assert_error_shape(data)
    assert data["error"]["code"] == "rules_unavailable"
    assert resp.headers["Retry-After"] == "1"
    assert calls["n"] == 1
    assert await count(api, "SELECT COUNT(*) FROM receipts") == 0
    assert await count(api, "SELECT COUNT(*) FROM postings") == postings

    # The same receipt again, and the next one: both succeed.
    status, first = await api.post(path, body, as_="register")
    assert status in (200, 201) and first["accrued"]["points"] > 0
    status, second = await api.post(path, receipt("RE-2", [line(1, "dairy", 5000)], card=CARD), as_="register")
    assert status in (200, 201) and second["accrued"]["points"] > 0
    if path == "/v1/receipts":
        assert await count(api, "SELECT COUNT(*) FROM receipts") == 2
