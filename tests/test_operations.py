"""Health, readiness, metrics, OpenAPI, and the rules admin endpoints."""
import shutil

from conftest import MARKET, line, receipt

NOW = "2026-11-24T12:00:05+02:00"


async def test_health_and_ready_need_no_key(make_api):
    api = await make_api(now=NOW)
    assert (await api.get("/healthz", as_=None))[0] == 200
    status, ready = await api.get("/readyz", as_=None)
    assert status == 200 and ready["rules_version"].startswith("sha256:")


async def test_metrics_count_receipts_and_points(make_api):
    api = await make_api(now=NOW)
    await api.post("/v1/members", {"card": "1"})
    await api.post("/v1/receipts", receipt("R-1", [line(1, "dairy", 10000)], card="1"), as_="register")
    status, text = await api.get("/metrics", as_="monitor")
    assert status == 200
    assert 'loyalty_receipts_total{endpoint="confirm",outcome="ok"} 1.0' in text
    assert 'loyalty_points_accrued_total{rule="base"} 2.0' in text
    assert "loyalty_ledger_commit_batch_size_bucket" in text
    assert "loyalty_rules_evaluation_seconds_count" in text
    assert 'loyalty_rules_info{program="market"' in text


async def test_points_by_rule_add_up_over_receipts_as_a_counter_shows_them(make_api):
    api = await make_api(now=NOW)
    await api.post("/v1/members", {"card": "1"})
    _, before = await api.get("/metrics", as_="monitor")
    assert "loyalty_points_accrued_total{" not in before     # no series before a rule paid
    assert "# TYPE loyalty_points_accrued_total counter" in before
    await api.post("/v1/receipts", receipt("R-1", [line(1, "dairy", 10000)], card="1"), as_="register")
    await api.post("/v1/receipts", receipt("R-2", [line(1, "dairy", 100000), line(2, "bread", 50000)], card="1"),
                   as_="register")
    _, text = await api.get("/metrics", as_="monitor")
    series = {line.split(" ")[0]: line.split(" ")[1] for line in text.splitlines()
              if line.startswith("loyalty_points_accrued")}
    # base: 2 + 30 (1 % floored per receipt), dairy-x2: 2 + 20, big-basket: 50 once
    assert series['loyalty_points_accrued_total{rule="base"}'] == "32.0"
    assert series['loyalty_points_accrued_total{rule="dairy-x2"}'] == "22.0"
    assert series['loyalty_points_accrued_total{rule="big-basket"}'] == "50.0"
    assert {name.split("{")[0] for name in series} == {"loyalty_points_accrued_total", "loyalty_points_accrued_created"}
    assert len([name for name in series if name.startswith("loyalty_points_accrued_created")]) == 3
    assert "# HELP loyalty_points_accrued_total Points accrued by rule" in text


async def test_openapi_lists_every_route_with_schemas(make_api):
    api = await make_api(now=NOW)
    status, doc = await api.get("/openapi.json", as_=None)
    assert status == 200 and doc["openapi"].startswith("3.")
    assert "/v1/receipts" in doc["paths"] and "post" in doc["paths"]["/v1/receipts"]
    assert "Receipt" in doc["components"]["schemas"]
    assert "qty" in doc["components"]["schemas"]["Line"]["properties"]


async def test_rules_endpoint_and_refused_reload(make_api, tmp_path):
    program = tmp_path / "program"
    shutil.copytree(MARKET, program)
    api = await make_api(now=NOW, program_dir=program)
    status, info = await api.get("/v1/admin/rules")
    assert status == 200 and info["program"]["id"] == "market"
    assert any(r["id"] == "dairy-x2" for r in info["rules"])
    version = info["version"]

    broken = next(program.rglob("promos.yaml"))
    broken.write_text(broken.read_text().replace("reward:", "rewrad:", 1))
    status, err = await api.post("/v1/admin/rules/reload")
    assert status == 422 and err["error"]["code"] == "rules_invalid"
    assert any("rewrad" in d["message"] and d["path"].count(":") == 2 for d in err["error"]["details"])
    status, info = await api.get("/v1/admin/rules")
    assert info["version"] == version and info["last_reload"]["ok"] is False
    _, metrics = await api.get("/metrics")
    assert "loyalty_rules_last_reload_ok 0.0" in metrics

    broken.write_text(broken.read_text().replace("rewrad:", "reward:", 1).replace("by: 2", "by: 3"))
    status, ok = await api.post("/v1/admin/rules/reload")
    assert status == 200 and ok["version"] != version


async def test_rules_check_endpoint(make_api):
    api = await make_api(now=NOW)
    files = {"program.yaml": (MARKET / "program.yaml").read_text(),
             "rules.yaml": "rules:\n  - id: x\n    rewrad: {points: 1}\n"}
    status, res = await api.post("/v1/admin/rules/check", {"files": files})
    assert status == 200 and res["ok"] is False
    assert any(p.startswith("rules.yaml:3:5:") for p in res["problems"]), res


async def test_rules_endpoint_lists_personal_and_held_out_rules_as_written(make_api, tmp_path):
    program = tmp_path / "program"
    shutil.copytree(MARKET, program)
    (program / "campaigns" / "cvm.yaml").write_text(
        "rules:\n"
        "  - {id: comeback, personal: true, reward: {points: 300}}\n"
        "  - {id: coffee-test, scope: {categories: [coffee]}, reward: {percent: 10}, holdout: 0.1}\n")
    api = await make_api(now=NOW, program_dir=program)
    status, info = await api.get("/v1/admin/rules")
    assert status == 200, info
    rules = {r["id"]: r for r in info["rules"]}
    assert rules["comeback"]["personal"] is True
    assert rules["coffee-test"]["holdout"] == "0.1"
    assert "personal" not in rules["base"] and "holdout" not in rules["base"]
