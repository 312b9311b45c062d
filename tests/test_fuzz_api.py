"""Generated requests against the running app: never a 5xx, every 4xx in the one error shape.

schemathesis generates requests for every operation of /openapi.json (valid ones and ones
that break the schema); hypothesis generates receipts around the edges of the schema.
FUZZ_EXAMPLES sets the examples per operation and mode (default 20, a few seconds);
`FUZZ_EXAMPLES=2000 make fuzz` is the long run.
"""
from __future__ import annotations

import json
import os
import shutil
from collections import Counter

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from hypothesis import strategies as st
from schemathesis import GenerationMode

from conftest import KEYS, MARKET, test_config
from live import LiveApp
from test_error_shape import assert_plain

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "20"))
NOW = "2026-11-24T12:00:05+02:00"
FUZZ_SETTINGS = dict(deadline=None, database=None, derandomize=not os.environ.get("FUZZ_RANDOM"),
                     suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.shrink])
SENT: Counter = Counter()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    # A copy: a generated deploy or roll-back writes into the program folder.
    program = shutil.copytree(MARKET, folder / "program")
    config = test_config(folder, NOW, program,
                         limits={"requests_per_second_per_key": 1_000_000, "burst": 1_000_000})
    with LiveApp(config) as app:
        session = requests.Session()
        for card in ("7000000000001", "1", "0"):
            session.post(app.url("/v1/members"), json={"card": card},
                         headers={"Authorization": f"Bearer {KEYS['manager']}"})
        yield app
    print(f"\nfuzz: {sum(SENT.values())} generated requests; by status: {dict(sorted(SENT.items()))}")


def check_answer(resp, what: str) -> None:
    SENT[resp.status_code] += 1
    assert resp.status_code < 500, f"{what} -> {resp.status_code} {resp.text[:500]}"
    if resp.status_code >= 400:
        body = resp.json()
        assert set(body) == {"error"}, (what, body)
        err = body["error"]
        assert set(err) == {"code", "message", "details"} and isinstance(err["code"], str) and err["code"]
        assert isinstance(err["message"], str) and isinstance(err["details"], list)
        assert all(set(d) == {"path", "message"} for d in err["details"]), body
        if err["code"] == "validation_error":
            assert_plain(err)


def roles_of(operation) -> list[str | None]:
    description = operation.definition.raw.get("description", "")
    roles = [r.strip() for r in description.removeprefix("Roles: ").split(",")] if description else []
    keys = {"register": ["register", "register2"], "manager": ["manager"], "monitor": ["monitor"]}
    # Mostly a key that may call the operation, sometimes a wrong one or none.
    return [k for r in roles for k in keys.get(r, [])] * 4 + ["manager", "register", None]


def operations(live):
    schema = schemathesis.openapi.from_url(live.url("/openapi.json"))
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_openapi_operations_never_answer_5xx(live, mode):
    session = requests.Session()
    for operation in operations(live):
        if operation.path == "/v1/admin/rules/reload":
            continue            # reloads the program from disk: not an input-handling path
        roles = roles_of(operation)

        @settings(max_examples=EXAMPLES, **FUZZ_SETTINGS)
        @given(case=operation.as_strategy(generation_mode=mode), role=st.sampled_from(roles))
        def run(case, role):
            headers = {"Authorization": f"Bearer {KEYS[role]}"} if role else {}
            resp = case.call(base_url=live.url(), session=session, headers=headers, timeout=30)
            check_answer(resp, f"{case.method} {case.formatted_path} as {role}: {str(case.body)[:300]}")
        try:
            run()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE     # nothing in it can be made invalid (GET /healthz)


# ------------------------------------------------------------------ receipts around the schema's edges

def edge_ints():
    return st.one_of(st.integers(-10, 10**6), st.sampled_from([0, -1, 2**31, 2**63 - 1, 2**63, 2**64, 10**12,
                                                             10**12 + 1, -(2**63), 10**40]))


def qty():
    return st.one_of(st.integers(-5, 10**10), st.decimals(allow_nan=False, allow_infinity=False, places=8),
                     st.sampled_from(["1", "NaN", "sNaN", "Infinity", "-0", "1e999999999", "1e-999999999",
                                      "0.0000001", 1e308, -1e308, 1.5, "abc", None, [], {}]))


def text():
    return st.one_of(st.text(max_size=80), st.sampled_from(["", "S001", "K01", "a/b", " ", "\u0000",
                                                           "x" * 65, "\ud7ff", "🙂" * 20]))


def lines():
    line = st.fixed_dictionaries(
        {"line_no": edge_ints(), "sku": text(), "qty": qty(), "price": edge_ints(), "amount": edge_ints()},
        optional={"category": st.one_of(text(), st.sampled_from(["dairy", "tobacco", "alcohol"])),
                  "brand": text(), "flags": st.lists(text(), max_size=3), "surprise": st.integers()})
    return st.lists(line, min_size=0, max_size=6)


def receipts():
    return st.fixed_dictionaries(
        {"receipt_id": text(), "store_id": st.sampled_from(["S001", "S002", "X"]), "register_id": text(),
         "ts": st.one_of(st.sampled_from(["2026-11-24T12:00:00+02:00", "2026-11-24T12:00:00", "2099-01-01T00:00:00Z",
                                          "1900-01-01T00:00:00Z", "not a date", "2026-02-30T00:00:00Z"]), text()),
         "lines": lines(), "total": edge_ints()},
        optional={"card": st.sampled_from(["7000000000001", "1", "0", "nobody", "", "a/b"]),
                  "redeem_points": edge_ints(), "channel": text()})


def keep_total(receipt):
    """Half the time make the total add up, so generation gets past that check too."""
    try:
        receipt["total"] = sum(int(x["amount"]) for x in receipt["lines"])
    except (TypeError, ValueError, KeyError):
        pass
    return receipt


@pytest.mark.parametrize("path", ["/v1/receipts/calculate", "/v1/receipts"])
def test_generated_receipts_never_answer_5xx(live, path):
    session = requests.Session()
    headers = {"Authorization": f"Bearer {KEYS['register']}", "Content-Type": "application/json"}

    @settings(max_examples=EXAMPLES * 10, **FUZZ_SETTINGS)
    @given(receipt=st.one_of(receipts(), receipts().map(keep_total)))
    def run(receipt):
        body = json.dumps(receipt, allow_nan=True, default=str).encode("utf-8", "surrogatepass")
        resp = session.post(live.url(path), data=body, headers=headers, timeout=30)
        check_answer(resp, body[:500])
    run()


def test_generated_bytes_never_answer_5xx(live):
    session = requests.Session()
    headers = {"Authorization": f"Bearer {KEYS['register']}", "Content-Type": "application/json"}

    @settings(max_examples=EXAMPLES * 5, **FUZZ_SETTINGS)
    @given(body=st.one_of(st.binary(min_size=1, max_size=300),
                          st.text(min_size=1).map(lambda t: t.encode("utf-8", "surrogatepass"))))
    def run(body):
        resp = session.post(live.url("/v1/receipts"), data=body, headers=headers, timeout=30)
        check_answer(resp, body[:200])
    run()
