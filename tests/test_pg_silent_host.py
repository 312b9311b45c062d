"""A PostgreSQL host that stops answering (gone from the network: no reset, no answer) holds
up the requests that wait for it, not the server: the event loop keeps answering /healthz
and /metrics while a request's connect waits out libpq's timeout, against a real `loyalty
serve` whose database.url reaches the test's cluster through a TCP relay on 127.0.0.1."""
from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

from test_crash_safety import Server
from test_pg_serving import on_postgresql
from test_storage_faults import get, session_for_tests

from conftest import KEYS

CARD = "7000000000003"
MANAGER = {"Authorization": f"Bearer {KEYS['manager']}"}
# Generous: the machine is shared. The relay holds a connect for libpq's whole timeout.
WAIT_S = 30


class SilentHost:
    """127.0.0.1:port relaying to the cluster's socket until silence(); then it cuts every
    relayed connection and takes new ones without ever answering, which libpq waits out
    for its connect timeout as it would a host gone from the network."""

    def __init__(self, target: Path):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.silent, self.connect_held = threading.Event(), threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return          # closed
            self._sockets.append(client)
            if self.silent.is_set():
                self.connect_held.set()         # held open, never read or answered
                continue
            database = socket.socket(socket.AF_UNIX)
            database.connect(str(self.target))
            self._sockets.append(database)
            for a, b in ((client, database), (database, client)):
                threading.Thread(target=_relay, args=(a, b), daemon=True).start()

    def silence(self) -> None:
        self.silent.set()
        for s in list(self._sockets):
            _close(s)

    def close(self) -> None:
        self.listener.close()
        for s in list(self._sockets):
            _close(s)


def _relay(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65_536):
            dst.sendall(data)
    except OSError:
        pass            # cut by silence() or close()
    finally:
        _close(dst)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass            # not connected any more
    s.close()


async def member(session, server: Server) -> tuple[int, dict]:
    async with session.get(server.url(f"/v1/members/{CARD}"), headers=MANAGER) as resp:
        return resp.status, await resp.json()


async def answers_while_silent(server: Server, host: SilentHost) -> None:
    async with session_for_tests() as session:
        async with session.post(server.url("/v1/members"), json={"card": CARD}, headers=MANAGER) as resp:
            assert resp.status == 201, await resp.text()
        assert (await member(session, server))[0] == 200

        host.silence()
        lookup = asyncio.create_task(member(session, server))
        assert await asyncio.to_thread(host.connect_held.wait, WAIT_S), "no connect reached the silent host"
        for path in ("/healthz", "/metrics"):
            status, text = await get(session, server, path)
            assert status == 200, text
            assert not lookup.done(), f"{path} was answered only after the lookup gave up on the host"
        status, body = await asyncio.wait_for(lookup, WAIT_S)
        assert status == 503 and body["error"]["code"] == "storage_unavailable", body


def test_the_server_answers_while_the_database_host_is_silent(tmp_path, pg_cluster):
    host = SilentHost(pg_cluster.sock / f".s.PGSQL.{pg_cluster.port}")
    url = f"postgresql://postgres@127.0.0.1:{host.port}/{pg_cluster.createdb()}"
    server = on_postgresql(Server(tmp_path), url)
    try:
        server.start()
        asyncio.run(answers_while_silent(server, host))
    finally:
        server.kill()
        host.close()
