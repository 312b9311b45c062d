"""/openapi.json tells the truth: every answer the app gives, a success or a refusal, is
valid against the schema the document declares for its path, method and status.

The answers are checked strictly: the test closes every object schema of the document
(`additionalProperties: false`), so a key the server sends and the document does not
declare fails as surely as a missing one. jsonschema_rs (already pinned for schemathesis)
validates, as JSON Schema 2020-12: the document is OpenAPI 3.1, whose schemas are that
draft's, and it is itself checked against OpenAPI 3.1's own schema (as schemathesis ships
it)."""
from __future__ import annotations

import json
import re
import shutil
from datetime import date
from decimal import Decimal
from pathlib import Path

import jsonschema_rs
import pytest
from schemathesis.specs.openapi.definitions import OPENAPI_31

from conftest import KEYS, MARKET, Api, line, receipt, test_config
from server import cvm
from server.app import create_app
from server.report_campaign import CampaignRule
from server.keys import DATABASE
from storage import coupons, ledger
from storage.segments import SegmentDefinition

NOW = "2026-11-24T12:00:05+02:00"
CARD = "7000000000001"
DRIVEN: set[tuple[str, str, int]] = set()
DRIVERS = {"receipts", "members", "admin", "care", "cvm"}
RAN: set[str] = set()


def closed(node):
    """Every object schema with declared properties admits no other key."""
    if isinstance(node, dict):
        out = {k: closed(v) for k, v in node.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [closed(v) for v in node]
    return node


class Checked:
    """Api calls whose every answer is validated against the document; DRIVEN collects
    (method, path template, status) so a test can tell that each route was driven."""

    def __init__(self, api, doc: dict):
        self.api, self.doc = api, doc
        self.components = closed(doc["components"])
        self.templates = [(re.compile("^" + re.sub(r"{\w+}", "[^/]+", p) + "$"), p) for p in doc["paths"]]

    async def call(self, method: str, path: str, body=None, as_="manager", expect: int | None = None):
        status, data = await self.api.call(method, path, body, as_)
        if expect is not None:
            assert status == expect, (method, path, status, data)
        self.check(method, path.split("?")[0], status, data)
        self.check_query(method, path)
        return status, data

    def check_query(self, method: str, path: str) -> None:
        """A query parameter the server reads is one the document declares for the route."""
        path, _, query = path.partition("?")
        template = next(t for rx, t in self.templates if rx.match(path))
        declared = {p["name"] for p in self.doc["paths"][template][method.lower()].get("parameters", [])
                    if p["in"] == "query"}
        sent = {pair.split("=", 1)[0] for pair in query.split("&") if pair}
        assert sent <= declared, f"{method} {template} reads {sorted(sent - declared)}, which the document does not list"

    def check(self, method: str, path: str, status: int, data) -> None:
        template = next(t for rx, t in self.templates if rx.match(path))
        responses = self.doc["paths"][template][method.lower()]["responses"]
        assert str(status) in responses, f"{method} {template} answered {status}, which the document does not list"
        content = responses[str(status)]["content"]
        assert "application/json" in content, (method, template, status)
        schema = {**content["application/json"]["schema"], "components": self.components}
        validator = jsonschema_rs.Draft202012Validator(schema)
        errors = [f"{e.instance_path}: {e.message}" for e in validator.iter_errors(data)]
        assert not errors, (method, template, status, errors[:5], data)
        DRIVEN.add((method, template, status))


async def checking(api) -> Checked:
    status, doc = await api.get("/openapi.json", as_=None)
    assert status == 200
    return Checked(api, doc)


@pytest.fixture
async def checked(make_api, tmp_path):
    folder = tmp_path / "program"
    shutil.copytree(MARKET, folder)
    return await checking(await make_api(now=NOW, program_dir=folder))


# A list segment, a coupon campaign, a personal rule and a rule with a control group.
CVM = cvm.Definitions(
    segments=[SegmentDefinition("staff", list=True)],
    coupons={"xmas": coupons.Campaign("xmas", 1, date(2026, 12, 20), date(2026, 12, 31))},
    personal={"comeback": True},
    rules={"dairy-x2": CampaignRule("dairy-x2", Decimal("0.5"), date(2026, 11, 20), date(2026, 11, 30),
                                    in_scope=lambda line: line.get("category") == "dairy")})


@pytest.fixture
async def cvm_checked(aiohttp_client, tmp_path):
    app = create_app(test_config(tmp_path, NOW))
    app[cvm.DEFINITIONS] = lambda program: CVM
    return await checking(Api(await aiohttp_client(app)))


async def test_receipt_answers_match_the_document(checked):
    c = checked
    await c.call("POST", "/v1/members", {"card": CARD, "phone": "+380501234567"}, expect=201)
    await c.call("POST", "/v1/receipts/calculate", receipt("anon", [line(1, "dairy", 9100)]), "register", 200)
    await c.call("POST", "/v1/receipts/calculate", receipt("c1", [line(1, "dairy", 9100)], card="7999"),
                 "register", 422)
    # A number and a decimal string are both quantities the API takes, as the document says.
    first = receipt("r1", [line(1, "dairy", 9100, qty=2), line(2, "bakery", 3000, qty="0.5")], card=CARD)
    await c.call("POST", "/v1/receipts", first, "register", 201)
    await c.call("POST", "/v1/receipts", first, "register", 200)
    await c.call("POST", "/v1/receipts", {**first, "total": 1}, "register", 422)
    await c.call("POST", "/v1/receipts", {**first, "lines": [line(1, "dairy", 12100)]}, "register", 409)
    await c.call("POST", "/v1/receipts", first, "register2", 403)
    await c.call("POST", "/v1/receipts", first, None, 401)

    ret = {"return_id": "ret1", "store_id": "S001", "register_id": "K01",
           "receipt": {"store_id": "S001", "register_id": "K01", "receipt_id": "r1"},
           "lines": [{"line_no": 2, "qty": "0.5"}]}
    await c.call("POST", "/v1/returns", ret, "register", 201)
    await c.call("POST", "/v1/returns", ret, "register", 200)
    await c.call("POST", "/v1/returns", {**ret, "return_id": "ret2", "receipt": {**ret["receipt"], "receipt_id": "x"}},
                 "register", 422)

    await c.call("POST", "/v1/receipts/S001/K01/r1/cancel", None, "register", 200)
    _, again = await c.call("POST", "/v1/receipts/S001/K01/r1/cancel", None, "register", 200)
    assert again["already"] is True
    _, replay = await c.call("POST", "/v1/receipts", first, "register", 200)
    assert replay["cancelled"] is True
    _, nothing = await c.call("POST", "/v1/receipts/S001/K01/none/cancel", None, "register", 200)
    assert nothing["status"] == "nothing_to_cancel"
    await c.call("POST", "/v1/receipts/S001/K01/r1/cancel", None, "register2", 403)

    await c.call("POST", "/v1/admin/adjustments", {"card": CARD, "points": 500, "reason": "care",
                                                   "adjustment_id": "a1"}, expect=201)
    await c.call("POST", "/v1/receipts/calculate", receipt("h1", [line(1, "bakery", 10000)], card=CARD, redeem=100),
                 "register", 200)
    _, released = await c.call("POST", "/v1/receipts/S001/K01/h1/cancel", None, "register", 200)
    assert released["status"] == "hold_released" and released["released_points"] > 0
    RAN.add("receipts")


async def test_member_answers_match_the_document(checked):
    c = checked
    await c.call("POST", "/v1/members", {"card": CARD, "birthday": "1990-05-01", "tags": ["staff"]}, expect=201)
    await c.call("POST", "/v1/members", {"card": CARD}, expect=409)
    await c.call("POST", "/v1/members", {"card": "7000000000002", "tags": "staff"}, "register", 422)   # tags: a list
    await c.call("GET", f"/v1/members/{CARD}", as_="register", expect=200)
    await c.call("GET", f"/v1/members/{CARD}?at=2026-11-24", expect=200)
    await c.call("GET", "/v1/members/7999", expect=404)
    await c.call("PATCH", f"/v1/members/{CARD}", {"phone": "+380501234567"}, expect=200)
    await c.call("PATCH", f"/v1/members/{CARD}", {"phone": "1"}, expect=422)
    adjustment = {"card": CARD, "points": 300, "reason": "goodwill", "adjustment_id": "a1"}
    await c.call("POST", "/v1/admin/adjustments", adjustment, expect=201)
    await c.call("POST", "/v1/admin/adjustments", adjustment, expect=200)
    await c.call("POST", "/v1/admin/adjustments", {**adjustment, "adjustment_id": "a2", "points": -10**6}, expect=422)
    await c.call("POST", "/v1/receipts", receipt("r1", [line(1, "dairy", 9100)], card=CARD), "register", 201)
    _, statement = await c.call("GET", f"/v1/members/{CARD}/statement?limit=50", expect=200)
    assert {p["kind"] for p in statement["postings"]} >= {"adjustment", "accrual"}
    await c.call("GET", "/v1/members/7999/statement", expect=404)
    _, member = await c.call("PUT", f"/v1/admin/members/{CARD}/tier", {"tier": "gold", "until": "2027-01-31"},
                             expect=200)
    assert member["tier"]["manual"] is True and member["tier"]["until"] == "2027-01-31"
    await c.call("PUT", f"/v1/admin/members/{CARD}/tier", {"tier": "platinum", "until": "2027-01-31"}, expect=422)
    RAN.add("members")


async def test_admin_and_operations_answers_match_the_document(checked, tmp_path):
    c = checked
    _, info = await c.call("GET", "/v1/admin/rules", expect=200)
    await c.call("GET", "/v1/admin/rules", as_="register", expect=403)
    await c.call("POST", "/v1/admin/rules/reload", expect=200)
    files = {p.relative_to(MARKET).as_posix(): p.read_text() for p in MARKET.rglob("*.yaml")}
    await c.call("POST", "/v1/admin/rules/check", {"files": files}, expect=200)
    _, broken = await c.call("POST", "/v1/admin/rules/check", {"files": {"program.yaml": "tiers: ["}}, expect=200)
    assert broken["ok"] is False
    await c.call("POST", "/v1/admin/rules/check", {"files": []}, expect=422)
    changed = {**files, "program.yaml": files["program.yaml"].replace("max_share: 0.5", "max_share: 0.4")}
    _, done = await c.call("POST", "/v1/admin/rules/deploy", {"files": changed, "reason": "less redemption"},
                           expect=200)
    assert done["changed"] is True
    await c.call("POST", "/v1/admin/rules/deploy", {"files": {"program.yaml": "id: ["}, "reason": "typo"},
                 expect=422)
    await c.call("GET", "/v1/admin/rules/versions?limit=5", expect=200)
    await c.call("GET", "/v1/admin/rules/versions?limit=0", expect=422)
    await c.call("GET", f"/v1/admin/rules/versions/{info['version']}", expect=200)
    await c.call("GET", "/v1/admin/rules/versions/sha256:0000", expect=404)
    _, back = await c.call("POST", "/v1/admin/rules/rollback", {"version": info["version"], "reason": "back"},
                           expect=200)
    assert back["last_reload"]["recorded"]["source"] == "rollback"
    await c.call("POST", "/v1/admin/rules/rollback", {"version": "sha256:" + "0" * 64, "reason": "back"}, expect=404)
    await c.call("GET", "/healthz", as_=None, expect=200)
    await c.call("GET", "/readyz", as_=None, expect=200)
    await c.call("GET", "/openapi.json", as_=None, expect=200)
    await c.call("GET", "/metrics", as_="register", expect=403)
    status, text = await c.api.get("/metrics", as_="monitor")
    assert status == 200 and "text/plain" in c.doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "loyalty_ready" in text
    RAN.add("admin")


async def test_member_care_and_events_answers_match_the_document(checked):
    c = checked
    _, first = await c.call("POST", "/v1/members", {"card": CARD, "phone": "+380501234567"}, expect=201)
    _, second = await c.call("POST", "/v1/members", {"card": "7000000000002", "phone": "+380501234567"},
                             expect=201)
    _, member = await c.call("PATCH", f"/v1/members/{CARD}", {"crm_id": "CRM-1", "consent": {"sms": True}},
                             expect=200)
    assert member["crm_id"] == "CRM-1" and member["consent"]["sms"] is True
    await c.call("POST", "/v1/receipts", receipt("r1", [line(1, "dairy", 9100)], card="7000000000002"),
                 "register", 201)
    _, found = await c.call("POST", "/v1/admin/members/search", {"phone": "+380501234567"}, expect=200)
    assert [m["member_id"] for m in found["members"]] == [first["member_id"], second["member_id"]]
    await c.call("POST", "/v1/admin/members/search", {"phone": "1"}, expect=422)

    replace = f"/v1/admin/members/{first['member_id']}/replace-card"
    _, replaced = await c.call("POST", replace, {"new_card": "7000000000003", "reason": "lost"}, expect=201)
    assert replaced["replaced_card_last4"] == "0001"
    await c.call("POST", replace, {"new_card": "7000000000003", "reason": "lost"}, expect=200)
    await c.call("POST", replace, {"new_card": "7000000000002"}, expect=409)

    merge = {"merge_id": "MG-1", "from_member_id": second["member_id"], "into_member_id": first["member_id"],
             "reason": "one person"}
    _, merged = await c.call("POST", "/v1/admin/members/merge", merge, expect=201)
    assert merged["points_moved"] > 0 and merged["cards_retired_last4"] == ["0002"]
    _, again = await c.call("POST", "/v1/admin/members/merge", merge, expect=200)
    assert again == {**merged, "replayed": True}
    await c.call("POST", "/v1/admin/members/merge", {**merge, "reason": "other"}, expect=409)

    erase = f"/v1/admin/members/{first['member_id']}/erase"
    _, erased = await c.call("POST", erase, {"reason": "asked to be forgotten"}, expect=200)
    assert erased["replayed"] is False and erased["cards_removed"] >= 1
    await c.call("POST", erase, {"reason": "asked to be forgotten"}, expect=200)

    _, page = await c.call("GET", "/v1/admin/events?limit=50", expect=200)
    assert {"member.enrolled", "receipt.confirmed"} <= {e["type"] for e in page["events"]}
    await c.call("GET", "/v1/admin/events?limit=0", expect=422)
    RAN.add("care")


async def test_segment_offer_coupon_and_report_answers_match_the_document(cvm_checked):
    c = cvm_checked
    for i in range(1, 5):
        await c.call("POST", "/v1/members", {"card": f"c{i}"}, expect=201)
        await c.call("POST", "/v1/receipts", receipt(f"R{i}", [line(1, "dairy", 1000 * i)], card=f"c{i}",
                                                     ts="2026-11-22T12:00:00+02:00"), "register", 201)
    segment = "/v1/admin/segments/staff/members"
    _, size = await c.call("PUT", segment, {"cards": ["c1", "c2"]}, expect=200)
    assert size == {"segment": "staff", "members": 2}
    await c.call("DELETE", segment, {"cards": ["c1"]}, expect=200)
    await c.call("PUT", "/v1/admin/segments/nope/members", {"cards": ["c1"]}, expect=404)
    await c.call("PUT", segment, {"cards": ["c1", "nobody"]}, expect=422)

    offer = {"offer_id": "o-1", "rule": "comeback", "segment": "staff", "from": "2026-12-01", "to": "2026-12-31"}
    await c.call("POST", "/v1/admin/offers", offer, expect=201)
    await c.call("POST", "/v1/admin/offers", offer, expect=200)
    await c.call("POST", "/v1/admin/offers", {**offer, "points": 600}, expect=409)

    _, made = await c.call("POST", "/v1/admin/coupons/xmas/codes", {"count": 2}, expect=201)
    assert len(set(made["codes"])) == 2
    await c.call("POST", "/v1/admin/coupons/nope/codes", {"count": 2}, expect=404)

    _, report = await c.call("GET", "/v1/admin/reports/campaigns/dairy-x2?from=2026-11-20&to=2026-11-30",
                             expect=200)
    assert report["treated"]["members"] + report["control"]["members"] == 4 and report["uplift"] is not None
    await c.call("GET", "/v1/admin/reports/campaigns/nope", expect=404)
    await c.call("GET", "/v1/admin/reports/campaigns/dairy-x2?from=yesterday", expect=422)
    RAN.add("cvm")


async def test_replays_answer_the_declared_keys_even_of_answers_stored_by_an_older_server(checked):
    """A replay is the stored answer decoded into its answer type: a key an older server
    stored and the document no longer declares is not sent again."""
    c = checked
    await c.call("POST", "/v1/members", {"card": CARD}, expect=201)
    first = receipt("r1", [line(1, "dairy", 9100, qty=2)], card=CARD)
    await c.call("POST", "/v1/receipts", first, "register", 201)
    ret = {"return_id": "ret1", "store_id": "S001", "register_id": "K01",
           "receipt": {"store_id": "S001", "register_id": "K01", "receipt_id": "r1"},
           "lines": [{"line_no": 1, "qty": 1}]}
    await c.call("POST", "/v1/returns", ret, "register", 201)
    adjustment = {"card": CARD, "points": 300, "reason": "goodwill", "adjustment_id": "a1"}
    await c.call("POST", "/v1/admin/adjustments", adjustment, expect=201)

    def older(conn) -> None:
        for table in ("receipts", "returns", "adjustments"):
            for (result,) in conn.execute(f"SELECT result FROM {table}").fetchall():
                kept = {**json.loads(ledger.unpack(result)), "detail": {"lines": {}}}
                conn.execute(f"UPDATE {table} SET result = ? WHERE result = ?", (json.dumps(kept).encode(), result))
    await c.api.client.server.app[DATABASE].write(older)
    for method, path, body, as_ in [("POST", "/v1/receipts", first, "register"),
                                    ("POST", "/v1/returns", ret, "register"),
                                    ("POST", "/v1/admin/adjustments", adjustment, "manager")]:
        _, again = await c.call(method, path, body, as_, 200)
        assert again["replayed"] is True and "detail" not in again


def test_every_route_is_driven_to_each_success_it_declares(checked):
    """Fails when a route is added to the table and the tests above do not check its answers."""
    if DRIVERS - RAN:
        pytest.skip(f"needs the answers of {sorted(DRIVERS - RAN)} (run the whole file)")
    declared = {(method.upper(), path, int(status)) for path, methods in checked.doc["paths"].items()
                for method, op in methods.items() for status in op["responses"] if status.startswith("2")}
    declared.discard(("GET", "/metrics", 200))   # text, checked on its own
    assert declared - DRIVEN == set()


def test_the_document_is_openapi_3_1_with_2020_12_schemas(checked):
    doc = checked.doc
    assert (doc["openapi"], doc["jsonSchemaDialect"]) == ("3.1.0", "https://spec.openapis.org/oas/3.1/dialect/base")
    validator = jsonschema_rs.Draft202012Validator(OPENAPI_31)
    errors = [f"{e.instance_path}: {e.message}" for e in validator.iter_errors(doc)]
    assert not errors, errors[:5]
    for name, schema in doc["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name
    # 3.0's way of saying null is not 3.1's: none of it may be left
    assert '"nullable"' not in json.dumps(doc)
    nullable = [name for name, schema in doc["components"]["schemas"].items() if '"null"' in json.dumps(schema)]
    assert "ConfirmAnswer" in nullable


def test_every_status_of_the_integrators_error_table_is_declared(checked):
    """A client generated from the document knows every refusal docs/integrators.md lists."""
    doc_text = (Path(__file__).parent.parent / "docs" / "integrators.md").read_text()
    table = doc_text[doc_text.index("| status | code |"):]
    table = table[:table.index("\n\n")]
    statuses = {s for row in table.splitlines()[2:] for s in re.findall(r"\d{3}", row.split("|")[1])}
    statuses.discard("405")     # a method the path does not have: no operation to declare it on
    assert {"408", "500"} <= statuses
    for path, methods in checked.doc["paths"].items():
        for method, op in methods.items():
            assert statuses <= set(op["responses"]), (method, path, sorted(statuses - set(op["responses"])))


def test_no_response_schema_is_a_bare_object(checked):
    doc, schemas = checked.doc, checked.doc["components"]["schemas"]
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            for status, response in op["responses"].items():
                for media, content in response["content"].items():
                    schema = content["schema"]
                    if media == "text/plain":
                        assert schema == {"type": "string"}
                        continue
                    assert set(schema) == {"$ref"}, (method, path, status, schema)
                    named = schemas[schema["$ref"].rsplit("/", 1)[1]]
                    assert named.get("properties"), (method, path, status, named)
                    if not status.startswith("2"):
                        assert schema["$ref"] == "#/components/schemas/Error", (method, path, status)
    error = schemas["ErrorBody"]
    assert error["required"] == ["code", "message", "details"]


def test_qty_is_a_number_or_a_decimal_string(checked):
    schemas = checked.doc["components"]["schemas"]
    for name in ("Line", "ReturnLine"):
        kinds = {alt["type"] for alt in schemas[name]["properties"]["qty"]["anyOf"]}
        assert kinds == {"number", "string"}, name
    receipt_schema = {"$ref": "#/components/schemas/Receipt", "components": checked.doc["components"]}
    validator = jsonschema_rs.validator_for(receipt_schema)
    assert validator.is_valid(receipt("r", [line(1, "dairy", 100, qty=2), line(2, "dairy", 100, qty="0.125")]))
    assert not validator.is_valid(receipt("r", [line(1, "dairy", 100, qty=[1])]))


async def test_a_refusal_to_wait_declares_and_carries_retry_after(make_api):
    """A client generated from the document knows how long to wait after a 429 or 503."""
    api = await make_api(now=NOW, limits={"requests_per_second_per_key": 1, "burst": 1})
    _, doc = await api.get("/openapi.json", as_=None)
    for status in ("429", "503"):
        declared = doc["paths"]["/v1/receipts"]["post"]["responses"][status]["headers"]["Retry-After"]
        assert declared["schema"]["type"] == "integer"
    answers = [await api.client.get(f"/v1/members/{CARD}", headers={"Authorization": f"Bearer {KEYS['manager']}"})
               for _ in range(2)]
    assert [a.status for a in answers] == [404, 429]
    assert int(answers[1].headers["Retry-After"]) >= 1
