"""Receipt requests are counted once each, after their transaction, whatever refused them:
a 409 once, a 400/422 from decoding under its endpoint; the latency histogram carries the
status class."""
import re

from conftest import line, receipt

NOW = "2026-11-24T12:00:05+02:00"


def sample(text: str, name: str, **labels) -> float:
    """The value of one sample; 0 when absent."""
    for row in text.splitlines():
        m = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", row)
        if m and dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or "")) == labels:
            return float(m.group(2))
    return 0.0


async def test_each_refusal_is_counted_once_under_its_endpoint_and_code(make_api):
    api = await make_api(now=NOW)
    await api.post("/v1/members", {"card": "1"})
    body = receipt("R-1", [line(1, "dairy", 10000)], card="1")
    assert (await api.post("/v1/receipts", body, as_="register"))[0] == 201
    assert (await api.post("/v1/receipts", body, as_="register"))[0] == 200
    changed = {**body, "lines": [line(1, "dairy", 20000)], "total": 20000}
    assert (await api.post("/v1/receipts", changed, as_="register"))[0] == 409
    assert (await api.post("/v1/receipts", raw=b"{not json", as_="register"))[0] == 400
    assert (await api.post("/v1/receipts", {**body, "receipt_id": 5}, as_="register"))[0] == 422
    assert (await api.post("/v1/receipts/calculate", {"lines": []}, as_="register"))[0] == 422
    assert (await api.post("/v1/receipts", body, as_="register2"))[0] == 403
    assert (await api.post("/v1/receipts/calculate", body, as_="register"))[0] == 200    # confirmed: replayed
    anonymous = receipt("R-2", [line(1, "dairy", 10000)])
    assert (await api.post("/v1/receipts", anonymous, as_="register"))[0] == 201
    assert (await api.post("/v1/receipts/calculate", anonymous, as_="register"))[0] == 200

    _, text = await api.get("/metrics", as_="monitor")
    counted = {m.group(1): float(m.group(2)) for m in
               re.finditer(r'^loyalty_receipts_total\{endpoint="confirm",outcome="([^"]+)"\} (\S+)$', text, re.M)}
    assert counted == {"ok": 2.0, "replayed": 1.0, "idempotency_conflict": 1.0, "malformed_json": 1.0,
                       "validation_error": 1.0, "forbidden": 1.0}
    assert sample(text, "loyalty_receipts_total", endpoint="calculate", outcome="validation_error") == 1.0
    assert sample(text, "loyalty_receipts_total", endpoint="calculate", outcome="replayed") == 2.0

    duration = "loyalty_request_duration_seconds_count"
    assert sample(text, duration, route="/v1/receipts", method="POST", status="2xx") == 3.0
    assert sample(text, duration, route="/v1/receipts", method="POST", status="4xx") == 4.0
    assert sample(text, duration, route="/v1/members", method="POST", status="2xx") == 1.0
    assert sample(text, "loyalty_rules_evaluation_seconds_count") == 2.0     # replays and refusals evaluate nothing
