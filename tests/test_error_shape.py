"""Every error, from every endpoint, has the one shape."""
import pytest

from conftest import line, receipt

NOW = "2026-11-24T12:00:05+02:00"


def assert_error_shape(body):
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"code", "message", "details"}
    assert isinstance(err["code"], str) and err["code"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["details"], list)
    for d in err["details"]:
        assert set(d) == {"path", "message"}


@pytest.mark.parametrize("method,path,body,as_,raw,status", [
    ("POST", "/v1/receipts", None, "register", b"{not json", 400),
    ("POST", "/v1/receipts", {"receipt_id": "x"}, "register", None, 422),
    ("POST", "/v1/receipts", None, None, b"{}", 401),
    ("POST", "/v1/receipts", None, "manager", b"{}", 403),
    ("GET", "/v1/admin/rules", None, "register", None, 403),
    ("GET", "/v1/members/nobody", None, "manager", None, 404),
    ("GET", "/v1/nowhere", None, "manager", None, 404),
    ("DELETE", "/v1/receipts", None, "register", None, 405),
    ("GET", "/metrics", None, "register", None, 403),
])
async def test_errors_have_one_shape(make_api, method, path, body, as_, raw, status):
    api = await make_api(now=NOW)
    got, data = await api.call(method, path, body, as_, raw=raw)
    assert got == status, data
    assert_error_shape(data)


async def test_a_wrong_path_or_method_says_so_apart_from_an_unknown_card(make_api):
    api = await make_api(now=NOW)
    got, data = await api.get("/v1/member/7000000000001", as_="register")
    assert got == 404 and data["error"] == {"code": "not_found", "details": [],
                                            "message": "no such path; /openapi.json lists the API's paths"}
    got, data = await api.call("GET", "/v1/receipts", as_="register")
    assert got == 405 and data["error"]["message"] == "GET is not a method of this path; it takes POST"


async def test_schema_error_names_the_field(make_api):
    api = await make_api(now=NOW)
    body = receipt("E-1", [line(1, "dairy", 100)])
    body["lines"][0]["line_no"] = 0
    status, data = await api.post("/v1/receipts", body, as_="register")
    assert status == 422
    assert_error_shape(data)
    assert data["error"]["details"] == [{"path": "lines[0].line_no", "message": "must be at least 1"}]


async def test_unknown_field_is_refused(make_api):
    api = await make_api(now=NOW)
    body = receipt("E-2", [line(1, "dairy", 100)], surprise=1)
    status, data = await api.post("/v1/receipts", body, as_="register")
    assert status == 422 and data["error"]["details"][0]["path"] == "surprise"


async def test_body_over_limit_is_413(make_api):
    api = await make_api(now=NOW, server={"max_body_bytes": 1000})
    status, data = await api.post("/v1/receipts", as_="register", raw=b"[" + b"1," * 2000 + b"1]")
    assert status == 413
    assert_error_shape(data)


async def test_register_key_limited_to_its_store(make_api):
    api = await make_api(now=NOW)
    status, data = await api.post("/v1/receipts", receipt("S-1", [line(1, "dairy", 100)], store="S002"),
                                  as_="register")
    assert status == 403
    assert_error_shape(data)


# ------------------------------------------------------------ 422 in plain words, every problem listed

import re  # noqa: E402

import msgspec  # noqa: E402

from server import schema  # noqa: E402
from server.config import ConfigError, config_from_dict  # noqa: E402
from server.routes import ROUTES  # noqa: E402

CARD = "7000000000001"
# What an integrator must never be shown: the server language's type names, msgspec's wording,
# regular expressions.
LEAK = re.compile(r"`|\^|\\[sdwS]|\{\d+,|\[A-Za-z|\b(?:str|int|float|bool|dict|Decimal|decimal|datetime|date_|"
                  r"NoneType|regex|Expected|Object|Struct|msgspec)\b")
LINE = {"line_no": 1, "sku": "x", "qty": 1, "price": 100, "amount": 100}
REF = {"store_id": "S001", "register_id": "K01", "receipt_id": "B-1"}
BAD_BODIES = {
    schema.Receipt: [
        {"receipt_id": "a b", "store_id": "S/1", "register_id": "x" * 65, "ts": "yesterday", "total": -1,
         "lines": [], "card": "1 2", "channel": "", "redeem_points": 1.5},
        {"receipt_id": 1, "store_id": None, "register_id": [], "ts": "2026-11-24", "total": "100",
         "lines": [{**LINE, "line_no": 0, "sku": "", "qty": "two", "price": 10**13, "amount": True,
                    "category": 5, "brand": "b" * 65, "flags": [""] * 33, "colour": "red"}]},
        {"lines": "none", "note": 1},
        [LINE],
    ],
    schema.ReturnRequest: [
        {"return_id": "", "store_id": "S001", "register_id": "K01", "receipt": {"store_id": 1},
         "lines": [{"line_no": -1, "qty": "a lot"}]},
        {"return_id": "R 1", "store_id": "S001", "register_id": "K01", "receipt": REF, "lines": [{}] * 2001},
    ],
    schema.Enrollment: [
        {"card": "", "phone": "1", "birthday": "1990-02-30", "tags": "vip", "referred_by": "a/b", "store_id": 7},
        {"card": "1" * 65, "tags": ["x" * 65] * 65},
    ],
    schema.MemberPatch: [{"phone": 123, "birthday": "tomorrow", "tags": [1], "card": "2"}],
    schema.Adjustment: [
        {"card": "a b", "points": 10**13, "reason": "", "adjustment_id": "x/y"},
        {"card": CARD, "points": "10", "reason": "r" * 501},
    ],
    schema.TierAssignment: [{"tier": "", "until": "2026-11-24T12:00:00+02:00"}, {"tier": "gold", "until": 20261124}],
    schema.RulesCheck: [
        {"files": {"../a.yaml": "x", "a.txt": "", "x" * 401 + ".yaml": "", "b.yaml": 5}},
        {"files": {}},
        {"files": {f"f{i}.yaml": "" for i in range(201)}},
        {"files": "program.yaml"},
    ],
    schema.RulesDeploy: [
        {"files": {"../a.yaml": "x"}, "reason": ""},
        {"files": {"program.yaml": "x"}},
        {"files": {"program.yaml": "x"}, "reason": "r" * 501},
    ],
    schema.RulesRollback: [
        {"version": "latest", "reason": "r"},
        {"version": "sha256:" + "A" * 64, "reason": ""},
        {"reason": "r"},
    ],
    schema.PhoneSearch: [{"phone": "1"}, {}, {"phone": "1" * 33}],
    schema.CardReplacement: [{"new_card": "1 2", "old_card_last4": "12345"}, {"reason": ""}],
    schema.MemberMerge: [
        {"merge_id": "a b", "from_member_id": "12", "into_member_id": "m_0", "reason": ""},
        {"merge_id": "M-1", "from_member_id": "m_1"},
    ],
    schema.Erasure: [{"reason": ""}, {}],
    schema.SegmentCards: [{"cards": []}, {"cards": ["a b", 7]}, {"cards": ["1"] * 10_001}],
    schema.OfferAssignment: [
        {"offer_id": "", "rule": "a/b", "from": "2026-02-30", "to": "soon", "cards": "c1", "points": 0},
        {"offer_id": "o", "rule": "r", "from": "2026-12-01", "segment": 5},
    ],
    schema.CouponRequest: [{"count": 0}, {"count": 10_001, "card": ""}, {"card": CARD}],
}


def request_of(route, body) -> tuple[str, str, dict, str]:
    path = (route.path.replace("{card}", CARD).replace("{member_id}", "m_1").replace("{id}", "staff")
            .replace("{campaign}", "xmas"))
    return route.method, path, body, "manager" if "manager" in route.roles else "register"


def assert_plain(error: dict) -> None:
    """The server's own words: paths and quoted keys repeat what the client sent."""
    message = error["message"]
    for d in error["details"]:
        message = message.replace(d["path"], "", 1)
    for text in [message] + [d["message"] for d in error["details"]]:
        assert not LEAK.search(re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)), text


def wrong_kind_body(t: type) -> dict:
    """Every field of `t` with a value of the wrong kind, and one field `t` does not have."""
    body = {"not_a_field": 1}
    for field in msgspec.inspect.type_info(t).fields:
        kind = field.type.type if isinstance(field.type, msgspec.inspect.Metadata) else field.type
        if isinstance(kind, msgspec.inspect.UnionType):
            kind = kind.types[0]
            kind = kind.type if isinstance(kind, msgspec.inspect.Metadata) else kind
        stringy = isinstance(kind, (msgspec.inspect.StrType, msgspec.inspect.DateType, msgspec.inspect.DateTimeType))
        body[field.encode_name] = 5 if stringy else "x"
    return body


def test_every_request_type_has_bad_bodies_in_the_table():
    assert {r.body for r in ROUTES if r.body is not None} == set(BAD_BODIES)


@pytest.mark.parametrize("route", [r for r in ROUTES if r.body is not None], ids=lambda r: f"{r.method} {r.path}")
async def test_schema_errors_list_every_problem_in_plain_words(make_api, route):
    api = await make_api(now=NOW)
    for body in BAD_BODIES[route.body] + [wrong_kind_body(route.body)]:
        method, path, body, as_ = request_of(route, body)
        status, data = await api.call(method, path, body, as_)
        assert status == 422, (path, body, data)
        assert_error_shape(data)
        error = data["error"]
        assert error["code"] == "validation_error"
        assert_plain(error)
        more = len(error["details"]) - 1
        if more < 49:
            assert error["message"].endswith(f"; and {more} more problem{'s' if more > 1 else ''}" if more else ""), error
        else:
            assert error["message"].endswith(" (details lists the first 50)"), error
    fields = [f.encode_name for f in msgspec.inspect.type_info(route.body).fields]
    status, data = await api.call(*request_of(route, wrong_kind_body(route.body)))
    assert sorted(d["path"] for d in data["error"]["details"]) == sorted(fields + ["not_a_field"]), data


async def test_schema_error_paths_count_from_zero(make_api):
    api = await make_api(now=NOW)
    body = receipt("E-3", [line(1, "dairy", 100), line(2, "dairy", 100), line(3, "dairy", 100)])
    body["lines"][2]["qty"] = None
    status, data = await api.post("/v1/receipts", body, as_="register")
    assert status == 422
    assert data["error"]["details"] == [{"path": "lines[2].qty", "message": "must be a number, like 2 or 0.75"}]


def test_every_pattern_of_a_request_type_is_described():
    """A value refused by a pattern is told what it must be from the pattern's description."""
    def walk(info, described=False):
        if isinstance(info, msgspec.inspect.Metadata):
            yield from walk(info.type, bool((info.extra_json_schema or {}).get("description")))
        elif isinstance(info, msgspec.inspect.StrType):
            yield info.pattern is None or described, info.pattern
        elif isinstance(info, msgspec.inspect.StructType):
            for f in info.fields:
                yield from walk(f.type)
        elif isinstance(info, msgspec.inspect.UnionType):
            for t in info.types:
                yield from walk(t)
        elif isinstance(info, msgspec.inspect.ListType):
            yield from walk(info.item_type)
        elif isinstance(info, msgspec.inspect.DictType):
            yield from walk(info.key_type)
            yield from walk(info.value_type)
    for t in BAD_BODIES:
        undescribed = [pattern for ok, pattern in walk(msgspec.inspect.type_info(t)) if not ok]
        assert not undescribed, (t.__name__, undescribed)


def test_a_valid_body_is_decoded_in_one_pass(monkeypatch):
    """The second pass only runs for a refused body: the receipt path pays for msgspec's decode alone."""
    def never(*_):
        raise AssertionError("the problem walk ran for a valid body")
    monkeypatch.setattr(schema.validation, "find", never)
    body = receipt("E-4", [line(i, "dairy", 100) for i in range(1, 21)], card=CARD)
    raw = msgspec.json.encode(body)
    assert schema.decode(raw, schema.Receipt) == msgspec.json.decode(raw, type=schema.Receipt)


@pytest.mark.parametrize("raw,key,reason", [
    ({"server": {"port": "http"}}, "server.port", "must be a whole number"),
    ({"server": {"port": 70_000}}, "server.port", "must be at most 65535"),
    ({"auth": {"keys": [{"id": "a", "sha256": "ABC", "role": "register"}]}}, "auth.keys[0].sha256",
     "must be 64 lowercase hexadecimal digits"),
    ({"auth": {"keys": [{"id": "a", "sha256": "a" * 64, "role": "boss"}]}}, "auth.keys[0].role",
     "must be one of: manager, monitor, register, support"),
    ({"server": {"prot": 1}}, "server.prot", "unknown key 'prot', did you mean 'port'?"),
])
def test_config_errors_name_one_key_in_the_same_words(raw, key, reason):
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw, source="config.yaml")
    assert (e.value.source, e.value.key, e.value.reason) == ("config.yaml", key, reason)
