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
