"""The Authorization header: the Bearer scheme in any case (RFC 7235), otherwise 401 in the one error shape."""
import asyncio
import json

import pytest

from conftest import KEYS

NOW = "2026-11-24T12:00:05+02:00"
CARD = "7000000000001"


@pytest.mark.parametrize("header", [
    f"Bearer {KEYS['manager']}",
    f"bearer {KEYS['manager']}",
    f"BEARER {KEYS['manager']}",
    f"bEaReR   {KEYS['manager']}",
    f"  Bearer {KEYS['manager']}\t",
])
async def test_any_case_of_the_scheme_is_accepted(make_api, header):
    api = await make_api(now=NOW)
    status, body = await api.post("/v1/members", {"card": CARD}, as_=None, headers={"Authorization": header})
    assert status == 201, body
    status, member = await api.get(f"/v1/members/{CARD}", as_=None, headers={"Authorization": header})
    assert status == 200 and member["member_id"] == body["member_id"]


@pytest.mark.parametrize("header", [
    None,
    "",
    KEYS["manager"],
    f"Basic {KEYS['manager']}",
    f"Bearer{KEYS['manager']}",
    f"Bearer\t{KEYS['manager']}",
    f"Bearer {KEYS['manager']} extra",
    f"Token {KEYS['manager']}",
    "Bearer ",
    "bearer wrong-key",
])
async def test_other_schemes_and_keys_get_401(make_api, header):
    api = await make_api(now=NOW)
    headers = {} if header is None else {"Authorization": header}
    status, body = await api.post("/v1/members", {"card": CARD}, as_=None, headers=headers)
    assert status == 401
    assert body["error"]["code"] == "unauthorized" and set(body["error"]) == {"code", "message", "details"}
    status, _ = await api.get(f"/v1/members/{CARD}", as_="manager")
    assert status == 404   # nothing was enrolled


async def test_a_key_that_is_not_utf8_gets_401(make_api):
    api = await make_api(now=NOW)
    server = api.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(b"GET /v1/admin/rules HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n"
                 b"Connection: close\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 ")
    assert json.loads(body)["error"]["code"] == "unauthorized"
