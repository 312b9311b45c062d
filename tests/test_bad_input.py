"""Bad input, case by case: each answers a clear 4xx in the one error shape, never a 5xx."""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import msgspec
import pytest

from conftest import MARKET, line, receipt
from server import schema, validation
from test_error_shape import assert_error_shape

NOW = "2026-11-24T12:00:05+02:00"


def raw_receipt(**changes) -> dict:
    body = receipt("B-1", [line(1, "dairy", 1000), line(2, "bakery", 500)])
    body.update(changes)
    return body


def encode(body: dict) -> bytes:
    return json.dumps(body).encode()


CASES = [
    ("malformed UTF-8 in a string", b'{"receipt_id": "\xff\xfe", "store_id": "S001"}', 400, "malformed_json", None),
    ("a lone surrogate escaped", b'{"receipt_id": "\\ud800"}', 400, "malformed_json", None),
    ("not JSON", b"{receipt", 400, "malformed_json", None),
    ("huge total", encode(raw_receipt(total=10**40)), 422, "validation_error", "total"),
    ("huge line number", encode(raw_receipt(lines=[{**line(1, "dairy", 1), "line_no": 2**70}], total=1)), 422,
     "validation_error", "lines[0].line_no"),
    ("huge quantity", encode(raw_receipt(lines=[line(1, "dairy", 1, qty="1e999999999")], total=1)), 422,
     "validation_error", "lines[0].qty"),
    ("huge quantity as a number", encode(raw_receipt(lines=[line(1, "dairy", 1, qty=7)], total=1))
     .replace(b'"qty": 7', b'"qty": 1e999999999'), 422, "validation_error", "lines[0].qty"),
    ("quantity NaN", encode(raw_receipt(lines=[line(1, "dairy", 1, qty="NaN")], total=1)), 422,
     "validation_error", "lines[0].qty"),
    ("too many decimals", encode(raw_receipt(lines=[line(1, "dairy", 1, qty="0.0000001")], total=1)), 422,
     "validation_error", "lines[0].qty"),
    ("negative quantity", encode(raw_receipt(lines=[line(1, "dairy", 1, qty=-2)], total=1)), 422,
     "validation_error", "lines[0].qty"),
    ("negative amount", encode(raw_receipt(lines=[line(1, "dairy", -100)], total=-100)), 422,
     "validation_error", "lines[0].price"),
    ("duplicate line numbers", encode(raw_receipt(lines=[line(1, "dairy", 100), line(1, "bakery", 100)], total=200)),
     422, "validation_error", "lines[1].line_no"),
    ("line number a list", encode(raw_receipt(lines=[{**line(1, "dairy", 1000), "line_no": [1]},
                                                      {**line(2, "bakery", 500), "line_no": {"a": 1}}])), 422,
     "validation_error", "lines[0].line_no"),
    ("total does not add up", encode(raw_receipt(total=1501)), 422, "validation_error", "total"),
    ("float money", encode(raw_receipt(lines=[line(1, "dairy", 1.5)], total=1.5)), 422, "validation_error",
     "lines[0].price"),
    ("deeply nested array", b"[" * 100_000 + b"]" * 100_000, 422, "validation_error", "$"),
    ("deeply nested field", b'{"receipt_id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 422,
     "validation_error", "receipt_id"),
    ("deeply nested object", b'{"a":' * 50_000 + b"1" + b"}" * 50_000, 422, "validation_error", "a"),
]


@pytest.mark.parametrize("name,raw,status,code,path", CASES, ids=[c[0] for c in CASES])
async def test_bad_receipts_answer_a_clear_4xx(make_api, name, raw, status, code, path):
    api = await make_api(now=NOW)
    got, data = await api.post("/v1/receipts", as_="register", raw=raw)
    assert got == status, data
    assert_error_shape(data)
    if code:
        assert data["error"]["code"] == code
    if path:
        assert data["error"]["details"][0]["path"] == path, data


# Days at the ends of what a date can be: as a moment of the program's day they leave the
# representable instants, and a window or an expiry counted from them leaves the years.
EDGE_MOMENTS = ["0001-01-01", "0001-01-01T00:00:00+02:00", "9999-12-31T23:59:59-12:00"]


@pytest.mark.parametrize("moment", EDGE_MOMENTS)
async def test_moments_at_the_ends_of_the_calendar_are_refused_clearly(make_api, moment):
    api = await make_api(now=NOW)
    assert (await api.post("/v1/members", {"card": "7000000000001"}))[0] == 201
    for path, name in [(f"/v1/members/7000000000001?at={moment}", "at"),
                       (f"/v1/members/7000000000001/statement?from={moment}", "from"),
                       (f"/v1/members/7000000000001/statement?to={moment}", "to")]:
        got, data = await api.get(path.replace("+", "%2B"))
        assert got == 422, (path, data)
        assert_error_shape(data)
        assert data["error"]["details"][0]["path"] == name, data
    got, data = await api.post("/v1/receipts", receipt("B-1", [line(1, "dairy", 1000)], card="7000000000001",
                                                       ts="0001-01-01T12:00:00Z"), as_="register")
    assert got == 422 and data["error"]["details"][0]["path"] == "ts", data
    _, member = await api.get("/v1/members/7000000000001")
    assert member["balance"] == {"available": 100, "pending": 0, "held": 0}


async def test_a_10_mb_body_is_413(make_api):
    api = await make_api(now=NOW)
    got, data = await api.post("/v1/receipts", as_="register", raw=b" " * (10 * 1024 * 1024))
    assert got == 413
    assert_error_shape(data)
    assert data["error"]["code"] == "body_too_large"


def many_lines(n: int) -> bytes:
    return encode(receipt("B-10k", [line(i, "dairy", 1) for i in range(1, n + 1)]))


async def test_a_10000_line_receipt_is_refused_clearly(make_api):
    body = many_lines(10_000)
    api = await make_api(now=NOW)                  # fits the default body limit; the schema caps lines
    got, data = await api.post("/v1/receipts", as_="register", raw=body)
    assert got == 422
    assert data["error"]["details"] == [{"path": "lines", "message": "must have 1 to 2000 items"}]
    api = await make_api(now=NOW, server={"max_body_bytes": len(body) // 2})
    got, data = await api.post("/v1/receipts", as_="register", raw=body)
    assert got == 413 and data["error"]["code"] == "body_too_large"
    assert data["error"]["message"] == (f"the body is larger than the limit of {len(body) // 2} bytes "
                                        "(server.max_body_bytes)")


@pytest.mark.parametrize("qty", ["1e999999999", "1E+30", "0.0000001", "NaN", "-1"])
async def test_return_quantities_are_bounded_like_receipt_quantities(make_api, qty):
    api = await make_api(now=NOW)
    assert (await api.post("/v1/receipts", raw_receipt(), as_="register"))[0] == 201
    body = {"return_id": "R-1", "store_id": "S001", "register_id": "K01",
            "receipt": {"store_id": "S001", "register_id": "K01", "receipt_id": "B-1"},
            "lines": [{"line_no": 1, "qty": qty}]}
    got, data = await api.post("/v1/returns", body, as_="register")
    assert got == 422, data
    assert data["error"]["details"][0]["path"] == "lines[0].qty"


@pytest.mark.parametrize("name", ["a\x00.yaml", "../a.yaml", "/etc/a.yaml", "x" * 300 + ".yaml", ".yaml",
                                  "a/" * 9 + "b.yaml", "a.yaml/", "a.txt"])
async def test_rules_check_refuses_unsafe_file_names(make_api, name):
    api = await make_api(now=NOW)
    got, data = await api.post("/v1/admin/rules/check", {"files": {name: "rules: []"}})
    assert got == 422, data
    assert_error_shape(data)
    assert data["error"]["details"][0]["path"] == "files"


@pytest.mark.parametrize("path", ["/v1/admin/rules/check", "/v1/admin/rules/deploy"])
async def test_a_file_named_as_the_folder_of_another_is_refused_and_nothing_changes(make_api, tmp_path, path):
    folder = tmp_path / "program"
    shutil.copytree(MARKET, folder)
    before = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))
    api = await make_api(now=NOW, program_dir=folder)
    files = {p.relative_to(folder).as_posix(): p.read_text() for p in folder.rglob("*.yaml")}
    files.update({"campaigns/x.yaml": "rules: []\n", "campaigns/x.yaml/y.yaml": "rules: []\n"})
    body = {"files": files, "reason": "two at once"} if path.endswith("deploy") else {"files": files}
    got, data = await api.post(path, body)
    assert got == 422, data
    assert_error_shape(data)
    assert data["error"]["details"] == [{"path": "files.campaigns/x.yaml/y.yaml",
                                         "message": "is inside campaigns/x.yaml, which is a file of the program too"}]
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == before


# ------------------------------------------------------------ every problem at once

CARD = "7000000000001"
INTEGRATORS = Path(__file__).resolve().parent.parent / "docs" / "integrators.md"


def documented_answers() -> list:
    return [json.loads(block) for block in re.findall(r"<!-- answer -->\n```json\n(.*?)```", INTEGRATORS.read_text(), re.S)]


async def test_a_receipt_with_three_problems_gets_one_422_listing_them(make_api):
    api = await make_api(now=NOW)
    assert (await api.post("/v1/members", {"card": CARD}))[0] == 201
    good = receipt("B-3", [line(1, "dairy", 1000), line(2, "bakery", 500), line(3, "dairy", 200)], card=CARD)
    bad = json.loads(json.dumps(good))
    bad["store_id"] = ""
    bad["lines"][1]["qty"] = "two"
    del bad["lines"][2]["sku"]
    got, data = await api.post("/v1/receipts", bad, as_="register")
    assert got == 422, data
    assert_error_shape(data)
    assert data["error"]["code"] == "validation_error"
    assert data["error"]["details"] == [
        {"path": "store_id", "message": "must be 1 to 64 characters"},
        {"path": "lines[1].qty", "message": "must be a number, like 2 or 0.75"},
        {"path": "lines[2].sku", "message": "is required"},
    ]
    assert data["error"]["message"] == "store_id must be 1 to 64 characters; and 2 more problems"
    assert data in documented_answers(), "docs/integrators.md shows this answer"
    status, member = await api.get(f"/v1/members/{CARD}")
    assert status == 200 and member["balance"] == {"available": 100, "pending": 0, "held": 0}
    status, data = await api.post("/v1/receipts", good, as_="register")   # the identity was not taken
    assert status == 201 and data["replayed"] is False, data


async def test_quantities_line_numbers_and_total_are_listed_with_every_other_problem(make_api):
    api = await make_api(now=NOW)
    assert (await api.post("/v1/members", {"card": CARD}))[0] == 201
    lines = [line(1, "dairy", 1000, qty=0), line(1, "bakery", 500, qty=-1), line(3, "dairy", 200)]
    wrong = {"path": "lines[0].qty", "message": "must be > 0"}, \
        {"path": "lines[1].line_no", "message": "repeats line_no 1"}, \
        {"path": "lines[1].qty", "message": "must be > 0"}, \
        {"path": "total", "message": "must equal the sum of line amounts (1700)"}
    well_typed = receipt("B-4", lines, card=CARD, total=1600)
    got, data = await api.post("/v1/receipts", well_typed, as_="register")
    assert got == 422 and data["error"]["code"] == "validation_error", data
    assert sorted(data["error"]["details"], key=str) == sorted(wrong, key=str)
    mistyped = dict(well_typed, redeem_points="ten")
    got, data = await api.post("/v1/receipts/calculate", mistyped, as_="register")
    assert got == 422 and data["error"]["code"] == "validation_error", data
    assert data["error"]["details"][0] == {"path": "redeem_points", "message": "must be a whole number"}
    assert sorted(data["error"]["details"][1:], key=str) == sorted(wrong, key=str)
    status, member = await api.get(f"/v1/members/{CARD}")
    assert status == 200 and member["balance"] == {"available": 100, "pending": 0, "held": 0}


@pytest.mark.parametrize("bad_lines,more", [(600, "599"), (2000, "at least 999")])
async def test_problems_beyond_the_listed_ones_are_counted(make_api, bad_lines, more):
    """Details list the first 50; the walk counts up to 1,000 problems, then says "at least"."""
    api = await make_api(now=NOW)
    lines = [line(i, "dairy", 1, qty="x") for i in range(1, bad_lines + 1)]
    got, data = await api.post("/v1/receipts", receipt("B-many", lines), as_="register")
    assert got == 422, data
    details = data["error"]["details"]
    assert len(details) == 50 and details[49] == {"path": "lines[49].qty", "message": "must be a number, like 2 or 0.75"}
    assert data["error"]["message"] == (f"lines[0].qty must be a number, like 2 or 0.75; "
                                        f"and {more} more problems (details lists the first 50)")


async def test_a_body_that_stops_being_json_after_its_first_problem_is_malformed(make_api):
    api = await make_api(now=NOW)
    got, data = await api.post("/v1/receipts", as_="register", raw=b'{"receipt_id": 5, "store_id": ')
    assert got == 400 and data["error"]["code"] == "malformed_json", data


# ------------------------------------------------------------ the walk agrees with msgspec

ODD_VALUES = [None, True, 0, -1, 1, 10**12 + 1, 10**40, 1.5, 1.0, "", "x", "a b", "a/b", "2026-11-24",
              "2026-11-24T12:00:00", "NaN", "1e5", "x" * 65, [], [1], {}, {"a": 1}]
VALID = {
    schema.Receipt: receipt("B-1", [line(1, "dairy", 100, flags=["a"]), line(2, "bakery", 50, qty="0.5")],
                            card="7000000000001"),
    schema.ReturnRequest: {"return_id": "R", "store_id": "S", "register_id": "K", "lines": [{"line_no": 1, "qty": "1"}],
                           "receipt": {"store_id": "S", "register_id": "K", "receipt_id": "B"}},
    schema.Enrollment: {"card": "1", "phone": "123", "birthday": "1990-01-01", "tags": ["a"], "referred_by": "2"},
    schema.Adjustment: {"card": "1", "points": -5, "reason": "r", "adjustment_id": "A"},
    schema.RulesCheck: {"files": {"a.yaml": "x", "b/c.yml": ""}},
}


def spots(value, at=()):
    yield at
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield from spots(child, at + (key,))


def mutated(rng: random.Random, body):
    """The body with one to three values replaced by odd ones, or removed."""
    for _ in range(rng.randint(1, 3)):
        at = rng.choice(list(spots(body)))
        if not at:
            return rng.choice(ODD_VALUES)
        parent = body
        for key in at[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and rng.random() < 0.1:
            del parent[at[-1]]
        else:
            parent[at[-1]] = json.loads(json.dumps(rng.choice(ODD_VALUES)))
    return body


def test_the_walk_finds_a_problem_exactly_when_msgspec_does_and_the_same_first_one():
    rng = random.Random(14)
    for _ in range(3_000):
        t = rng.choice(list(VALID))
        raw = json.dumps(mutated(rng, json.loads(json.dumps(VALID[t])))).encode()
        found = validation.find(schema._PLAIN.decode(raw), t)
        try:
            schema.DECODERS[t].decode(raw)
        except msgspec.ValidationError as e:
            first = validation.from_error(e, t).listed[0]
            assert found.count, (raw, str(e))
            if "[...]" not in str(e):       # msgspec does not say which mapping value it was
                assert found.listed[0][0] == first[0], (raw, str(e))
            if "[...]" not in str(e) and "`key`" not in str(e):    # nor which key
                assert found.listed[0][1] == first[1], (raw, str(e))
        else:
            assert not found.count, (raw, found.listed)


async def test_a_nul_character_in_any_text_is_refused_naming_each_and_writes_nothing(make_api):
    """PostgreSQL's text cannot hold NUL (the insert failed: 500); SQLite kept ids and cards
    no register can type. Refused on both, in a body or in the path."""
    api = await make_api(now=NOW)
    assert (await api.post("/v1/members", {"card": CARD}))[0] == 201
    body = receipt("B-\u0000", [{**line(1, "dairy", 1000), "sku": "a\u0000", "flags": ["\u0000"]}], card=CARD)
    for path in ("/v1/receipts/calculate", "/v1/receipts"):
        got, data = await api.post(path, body, as_="register")
        assert got == 422, data
        assert_error_shape(data)
        assert [d["path"] for d in data["error"]["details"]] == ["receipt_id", "lines[0].sku", "lines[0].flags[0]"]
        assert data["error"]["details"][0]["message"] == "must not contain the NUL character (\\u0000)"
    got, data = await api.post("/v1/members", {"card": "7000\u00009", "tags": ["vip\u0000"]})
    assert got == 422 and [d["path"] for d in data["error"]["details"]] == ["card", "tags[0]"], data
    got, data = await api.post("/v1/admin/adjustments", {"card": CARD, "points": 5, "reason": "\u0000",
                                                         "adjustment_id": "A-1"})
    assert got == 422 and data["error"]["details"][0]["path"] == "reason", data
    got, data = await api.post("/v1/receipts/S001/K01/B-%00/cancel", None, as_="register")
    assert got == 422 and data["error"]["details"][0]["path"] == "receipt_id", data
    # A backslash before u0000 is text like any other.
    got, data = await api.post("/v1/receipts", receipt("B-2", [line(1, "dairy", 100000, sku="a\\u0000")], card=CARD),
                               as_="register")
    assert got == 201, data
    status, statement = await api.get(f"/v1/members/{CARD}/statement")
    assert status == 200
    assert {p["receipt"]["receipt_id"] for p in statement["postings"] if p.get("receipt")} == {"B-2"}, statement


async def test_a_ts_without_its_time_says_a_time_is_wanted(make_api):
    api = await make_api(now=NOW)
    got, data = await api.post("/v1/receipts", receipt("T-1", [line(1, "dairy", 100)], ts="2026-11-24"),
                               as_="register")
    assert got == 422 and data["error"]["details"] == [
        {"path": "ts", "message": "must be a date and time like 2026-11-24T12:00:00+02:00"}]
