"""server.workers: 2 — the real server as worker processes in front of one core: the same
answers as one process, a killed worker is replaced, SIGTERM stops every process."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import KEYS
from server.config import ConfigError, config_from_dict, load_config
from test_crash_safety import NOW, Server


def children(pid: int) -> set[int]:
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.add(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def start(tmp_path, workers: int = 2) -> Server:
    server = Server(tmp_path, server={"workers": workers})
    server.start()
    deadline = time.monotonic() + 10      # the port opens with the first worker; wait for all
    while "worker processes" not in server.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    return server


def call(server: Server, method: str, path: str, body=None, as_: str | None = "register", raw: bool = False):
    headers = {"Content-Type": "application/json"}
    if as_:
        headers["Authorization"] = f"Bearer {KEYS[as_]}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.url(path), data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            data = answer.read()
            return answer.status, data.decode() if raw else json.loads(data)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def receipt(rid: str, card: str = "card-1", amount: int = 12_000) -> dict:
    return {"receipt_id": rid, "store_id": "S001", "register_id": "K01", "ts": NOW, "card": card,
            "lines": [{"line_no": 1, "sku": "milk", "category": "dairy", "qty": 2, "price": amount // 2,
                       "amount": amount}], "total": amount}


def assert_error(answer, status: int, code: str) -> None:
    assert answer[0] == status, answer
    assert set(answer[1]) == {"error"} and answer[1]["error"]["code"] == code, answer
    assert set(answer[1]["error"]) == {"code", "message", "details"}, answer


def wait_for_workers(core: int, count: int, not_in: set[int] = frozenset(), seconds: float = 10) -> set[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pids = {p for p in children(core) if alive(p)}
        if len(pids) == count and not pids & not_in:
            return pids
        time.sleep(0.05)
    raise AssertionError(f"workers of {core}: {children(core)}")


def test_two_workers_answer_like_one_process_and_survive_a_killed_worker(tmp_path):
    server = start(tmp_path)
    try:
        core = server.proc.pid
        workers = wait_for_workers(core, 2)
        assert call(server, "GET", "/readyz", as_=None)[0] == 200
        assert call(server, "POST", "/v1/members", {"card": "card-1"}, as_="manager")[0] == 201

        first = call(server, "POST", "/v1/receipts", receipt("w-1"))
        assert first[0] == 201 and first[1]["replayed"] is False, first
        again = call(server, "POST", "/v1/receipts", receipt("w-1"))
        assert again[0] == 200 and again[1]["replayed"] is True
        assert again[1]["accrued"] == first[1]["accrued"]
        assert_error(call(server, "POST", "/v1/receipts", receipt("w-1", amount=13_000)), 409, "idempotency_conflict")
        assert_error(call(server, "POST", "/v1/receipts", receipt("w-2", card="nobody")), 422, "unknown_card")
        assert_error(call(server, "POST", "/v1/receipts", receipt("w-3"), as_=None), 401, "unauthorized")
        assert_error(call(server, "POST", "/v1/receipts", {"receipt_id": "w-4"}), 422, "validation_error")
        returned = call(server, "POST", "/v1/returns", {
            "return_id": "ret-1", "store_id": "S001", "register_id": "K01",
            "receipt": {"store_id": "S001", "register_id": "K01", "receipt_id": "w-1"},
            "lines": [{"line_no": 1, "qty": 1}]})
        assert returned[0] == 201, returned
        member = call(server, "GET", "/v1/members/card-1")
        assert member[0] == 200 and member[1]["tier"]["value"] == 6_000, member
        assert call(server, "GET", "/v1/admin/rules", as_="manager")[0] == 200
        assert_error(call(server, "GET", "/v1/admin/rules"), 403, "forbidden")
        assert call(server, "GET", "/openapi.json", as_=None)[0] == 200
        metrics = call(server, "GET", "/metrics", as_="manager", raw=True)[1]
        assert 'loyalty_receipts_total{endpoint="confirm",outcome="ok"} 1.0' in metrics      # counted once
        assert 'loyalty_receipts_total{endpoint="confirm",outcome="replayed"} 1.0' in metrics

        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        # Connections the kernel queued on the victim's socket before it closed are reset (a
        # client retries those); once it is gone the other worker takes every new connection.
        deadline = time.monotonic() + 5
        while alive(victim) and time.monotonic() < deadline:
            time.sleep(0.01)
        for n in range(8):
            assert call(server, "POST", "/v1/receipts", receipt(f"k-{n}"))[0] == 201
        replaced = wait_for_workers(core, 2, not_in={victim})
        while "listens again" not in server.log.read_text() and time.monotonic() < deadline + 10:
            time.sleep(0.02)
        for n in range(8, 16):
            assert call(server, "POST", "/v1/receipts", receipt(f"k-{n}"))[0] == 201

        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(15) == 0, server.log.read_text()[-3000:]
        deadline = time.monotonic() + 5
        while any(alive(p) for p in replaced) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(p) for p in replaced | {core})
    finally:
        server.kill()
    log = server.log.read_text()
    assert "died (killed by signal 9)" in log and "listens again" in log
    conn = sqlite3.connect(server.db)
    audited = conn.execute("SELECT key_id, path, status FROM audit_log ORDER BY id").fetchall()
    conn.close()
    assert audited == [("manager", "/v1/admin/rules", 200), ("register-S001", "/v1/admin/rules", 403)]
    assert "stopped with" not in log        # every worker exited 0
    assert "stopped: every answered request is committed" in log


def test_workers_exit_when_the_core_is_killed(tmp_path):
    server = start(tmp_path)
    try:
        workers = wait_for_workers(server.proc.pid, 2)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(p) for p in workers), "orphaned worker processes"
    finally:
        server.kill()
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_workers_setting(tmp_path):
    assert config_from_dict({}).server.workers == 1
    assert config_from_dict({"server": {"workers": 4}}).server.workers == 4
    for bad in (0, 65):
        with pytest.raises(ConfigError, match="server.workers"):
            config_from_dict({"server": {"workers": bad}})
    path = tmp_path / "config.yaml"
    path.write_text("server: {port: 9000}\n")
    assert load_config(path, environ={"LOYALTY_SERVER__WORKERS": "3"}).server.workers == 3

