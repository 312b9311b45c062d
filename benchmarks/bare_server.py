"""The ceiling: a bare aiohttp handler that reads the same receipt JSON, decodes it with
the server's msgspec types and answers a small JSON; no auth, rules, or database.

    PYTHONPATH=. python benchmarks/bare_server.py PORT            # the ceiling
    PYTHONPATH=. python benchmarks/bare_server.py PORT --trivial  # the load driver's ceiling

--trivial is not HTTP-framework code at all: an asyncio protocol that finds the end of
each request by its Content-Length and writes a fixed answer. It costs the server far
less per request than any real handler, so what wrk reaches against it is the most the
driver (wrk plus benchmarks/load.lua building each body) can send on this machine.
"""
from __future__ import annotations

import asyncio
import sys

import msgspec
from aiohttp import web

from server import schema

ANSWER = msgspec.json.Encoder()


async def receipt(request: web.Request) -> web.Response:
    body = schema.decode(await request.read(), schema.Receipt)
    return web.Response(body=ANSWER.encode({"receipt": {"store_id": body.store_id, "register_id": body.register_id,
                                                        "receipt_id": body.receipt_id}, "accrued": {"points": 0}}),
                        status=201, content_type="application/json")


async def return_items(request: web.Request) -> web.Response:
    body = schema.decode(await request.read(), schema.ReturnRequest)
    return web.Response(body=ANSWER.encode({"return": {"return_id": body.return_id}}), status=201,
                        content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


def bare(port: int) -> None:
    app = web.Application()
    app.router.add_post("/v1/receipts", receipt)
    app.router.add_post("/v1/returns", return_items)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


_BODY = b'{"receipt":{"trivial":true}}'
FIXED = b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(_BODY), _BODY)


class Trivial(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buffer = transport, bytearray()

    def data_received(self, data):
        buffer = self.buffer
        buffer += data
        answers = 0
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = bytes(buffer[:end]).lower()
            at = head.find(b"content-length:")
            length = int(head[at + 15:head.find(b"\r\n", at) if head.find(b"\r\n", at) > 0 else None]) if at >= 0 else 0
            if len(buffer) < end + 4 + length:
                break
            del buffer[:end + 4 + length]
            answers += 1
        if answers:
            self.transport.write(FIXED * answers)


def trivial(port: int) -> None:
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(Trivial, "127.0.0.1", port, backlog=1024))
    try:
        loop.run_forever()
    finally:
        server.close()


if __name__ == "__main__":
    (trivial if "--trivial" in sys.argv else bare)(int(sys.argv[1]))
