"""deploy/: the Grafana dashboard and the alert rules query only metrics the server exports
and parse as PromQL; the alerts pass their unit tests; the systemd unit verifies.

promtool (Debian: `apt-get install prometheus`) and systemd-analyze are not Python
packages: the tests that need them skip, saying so, when they are absent; `.ci/run`
installs promtool."""
from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import line, receipt

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "loyalty-dashboard.json"
ALERTS = DEPLOY / "prometheus" / "loyalty-alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "loyalty-alerts.test.yml"
UNIT = DEPLOY / "systemd" / "loyalty.service"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian: apt-get install prometheus; .ci/run installs it)")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")

# Series Prometheus adds to every scrape itself: not in /metrics, always there.
PROMETHEUS_OWN = {"up"}
# What Grafana puts in place of its variables before it sends a query.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$instance": ".*"}
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
                "group_left", "group_right", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not its functions, labels or keywords)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for word in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        if text[word.end():].lstrip().startswith("(") or word.group().lower() in PROMQL_WORDS:
            continue
        if word.start() > 0 and (text[word.start() - 1].isdigit() or text[word.start() - 1] in ".$"):
            continue      # 1e3, 0.5e-3
        names.add(word.group())
    return names


def test_metric_names_are_found_in_promql():
    expr = ('histogram_quantile(0.99, sum by (route, le) (rate(a_bucket{route="/v1/x", s=~"4xx|5xx"}[5m])))'
            ' / on (instance) group_left sum without (mode) (b_total offset 5m) > 512 * 1024 unless max(c) == bool 1')
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, expression) for every query of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        queries += [(panel["title"], target["expr"]) for target in panel["targets"]]
    return queries


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def grafana_expanded(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
    return expr


async def exported_metric_names(api) -> set[str]:
    """Every sample name /metrics shows once receipts, a return, a cancel and a reload have
    been served and the WAL checkpointed."""
    await api.post("/v1/members", {"card": "7000000000001"})
    for n in range(3):
        status, _ = await api.post("/v1/receipts", receipt(f"K-{n}", [line(1, "dairy", 9100), line(2, "bakery", 3000)],
                                                           card="7000000000001"), as_="register")
        assert status == 201
    await api.post("/v1/receipts", receipt("K-9", [line(1, "dairy", 100)], card="0000000000000"), as_="register")
    await api.post("/v1/returns", {"return_id": "RT-1", "store_id": "S001", "register_id": "K01",
                                   "receipt": {"store_id": "S001", "register_id": "K01", "receipt_id": "K-0"},
                                   "lines": [{"line_no": 1, "qty": 1}]}, as_="register")
    await api.post("/v1/receipts/S001/K01/K-1/cancel", as_="register")
    assert (await api.post("/v1/admin/rules/reload"))[0] == 200
    for _ in range(100):      # the checkpoint thread runs every second
        status, text = await api.get("/metrics", as_="monitor")
        assert status == 200
        names = {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}
        if "loyalty_wal_checkpoints_total" in names:
            return names
        await asyncio.sleep(0.2)
    raise AssertionError("no WAL checkpoint counted within 20 s")


@pytest.mark.sqlite_only(reason="waits for a checkpoint of SQLite's WAL, whose metric the dashboard shows")
async def test_dashboard_and_alerts_use_only_exported_metrics(make_api):
    exported = await exported_metric_names(await make_api(now="2026-11-24T12:00:00+02:00"))
    assert {"loyalty_request_duration_seconds_bucket", "loyalty_ledger_commit_batch_size_count",
            "loyalty_rules_info", "loyalty_ready"} <= exported
    used = [(f"panel {title!r}", expr) for title, expr in panel_queries()]
    used += [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]
    for variable in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        used.append((f"variable {variable['name']}", re.sub(r"label_values\((\w+),.*", r"\1",
                                                           variable["definition"])))
    for where, expr in used:
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr}"
        assert names <= exported | PROMETHEUS_OWN, f"{where}: {sorted(names - exported)} not exported by /metrics"


def test_every_alert_has_a_unit_test():
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"]}
    firing = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case.get("exp_alerts")}
    alerts = {rule["alert"] for rule in alert_rules()}
    assert tested == alerts and firing == alerts


@needs_promtool
def test_dashboard_queries_parse_as_promql(tmp_path):
    # promtool parses every expression of a rules file: each query becomes a recording rule.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{n}", "expr": grafana_expanded(expr)}
        for n, (_, expr) in enumerate(panel_queries())]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alert_rules_check_and_pass_their_unit_tests():
    checked = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([PROMTOOL, "test", "rules", ALERT_TESTS.name], capture_output=True, text=True,
                            timeout=120, cwd=ALERT_TESTS.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr


HARDENING = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
             "PrivateDevices": "yes", "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
             "CapabilityBoundingSet": "", "MemoryDenyWriteExecute": "yes", "SystemCallArchitectures": "native"}


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        if "=" in raw and not raw.startswith("#"):
            key, _, value = raw.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_unit_has_the_hardening_options():
    settings = unit_settings()
    for key, value in HARDENING.items():
        assert settings.get(key) == [value], f"{key}={value} is missing"
    assert "/var/lib/loyalty" in settings["ReadWritePaths"][0].split()
    assert int(settings["LimitNOFILE"][0]) >= 4096
    assert settings["RestartPreventExitStatus"] == ["2"]     # a refused start-up is not retried


@needs_systemd_analyze
def test_systemd_unit_verifies_and_is_well_confined(tmp_path):
    loyalty = ROOT / ".venv" / "bin" / "loyalty"
    if not loyalty.exists():
        pytest.skip(f"{loyalty} is not installed (make test installs it)")
    # The unit as installed, with this checkout's command in place of /opt/loyalty's.
    unit = tmp_path / "loyalty.service"
    unit.write_text(UNIT.read_text().replace("/opt/loyalty/.venv/bin/loyalty", str(loyalty)))
    verified = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0 and not verified.stderr.strip(), verified.stderr
    # Exposure 0 (confined) to 10 (not at all); 2.0 and below is systemd's "OK".
    security = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=yes", "--threshold=20", str(unit)],
                              capture_output=True, text=True, timeout=60)
    assert security.returncode == 0, security.stdout[-3000:] + security.stderr


def test_a_postgresql_that_does_not_answer_at_start_is_restarted_by_systemd(tmp_path):
    # A host that boots before its database, or a failover under way: systemd must try again,
    # which it does not for RestartPreventExitStatus (a refused config, a missing program).
    pytest.importorskip("psycopg")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"port": 1},
        "database": {"url": f"postgresql://loyalty@/loyalty?host={tmp_path / 'no-socket-here'}&port=5432"},
        "rules": {"dir": str(ROOT / "rules" / "programs" / "market")},
        "privacy": {"hmac_key": "a-key-of-sixteen-chars"}}))
    done = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.stderr.startswith("not starting: cannot open the PostgreSQL database: cannot connect"), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.returncode == 75
    settings = unit_settings()
    assert settings["Restart"] == ["on-failure"]
    assert str(done.returncode) not in settings["RestartPreventExitStatus"][0].split()
    # Failing at once, it would hit systemd's default start limit (5 in 10 s) and stay down.
    assert settings["StartLimitIntervalSec"] == ["0"]
