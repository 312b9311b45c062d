"""The access log against the real server: off by default; Combined Log Format or JSON
lines naming the key id, never a card number or a key; a rotated file is reopened. A
destination slower than the requests loses lines, counted, instead of holding them up."""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import KEYS
from server.access_log import AccessLogWriter
from server.config import ConfigError, config_from_dict
from test_crash_safety import NOW, Server

CARD = "7000000000001"
# host ident user [time] "request" status bytes "referer" "user agent"
COMBINED = re.compile(r'^(\S+) - (\S+) \[(\d{2}/\w{3}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4})\] '
                      r'"(\S+) (\S+) HTTP/1\.1" (\d{3}) (\d+|-) "([^"]*)" "([^"]*)"$')


def traffic(server: Server) -> None:
    """Requests carrying the card in a path, a body, a query and a path no route has."""
    manager = {"Authorization": f"Bearer {KEYS['manager']}"}
    register = {"Authorization": f"Bearer {KEYS['register']}", "User-Agent": 'till "K01"'}
    assert requests.post(server.url("/v1/members"), json={"card": CARD}, headers=manager).status_code == 201
    body = {"receipt_id": "al-1", "store_id": "S001", "register_id": "K01", "ts": NOW, "card": CARD,
            "lines": [{"line_no": 1, "sku": "x", "category": "dairy", "qty": 1, "price": 9000, "amount": 9000}],
            "total": 9000}
    assert requests.post(server.url("/v1/receipts"), json=body, headers=register).status_code == 201
    assert requests.get(server.url(f"/v1/members/{CARD}?at=2026-11-25"), headers=register).status_code == 200
    assert requests.get(server.url(f"/v1/members/{CARD}"), headers={"Authorization": "Bearer wrong"}).status_code \
        == 401
    assert requests.get(server.url(f"/v1/member/{CARD}"), headers=register).status_code == 404
    assert requests.get(server.url(f"/v1/members/{CARD}/statement?card={CARD}"),
                        headers=manager).status_code == 200


def wait_for_lines(path: Path, count: int) -> list[str]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            return lines
        time.sleep(0.05)
    raise AssertionError(f"{path}: fewer than {count} lines: {lines}")


def no_secrets(text: str) -> None:
    assert CARD not in text
    for key in KEYS.values():
        assert key not in text
    assert "Bearer" not in text


@pytest.fixture
def server_with(tmp_path):
    started = []

    def start(**server_section) -> Server:
        server = Server(tmp_path, server=server_section)
        started.append(server)
        server.start()
        return server
    yield start
    for server in started:
        server.kill()


def test_json_lines_name_the_key_and_mask_the_card(server_with, tmp_path):
    log = tmp_path / "access.log"
    server = server_with(access_log="json", access_log_path=str(log))
    traffic(server)
    lines = [json.loads(line) for line in wait_for_lines(log, 6)]
    no_secrets(log.read_text())
    by_path = {(line["method"], line["path"]): line for line in lines}
    receipt = by_path[("POST", "/v1/receipts")]
    assert receipt["key_id"] == "register-S001" and receipt["status"] == 201
    assert receipt["route"] == "/v1/receipts" and receipt["user_agent"] == 'till "K01"'
    assert receipt["bytes"] > 0 and receipt["duration_ms"] >= 0 and receipt["remote"] == "127.0.0.1"
    member = by_path[("GET", "/v1/members/*********0001?at=2026-11-25")]
    assert member["route"] == "/v1/members/{card}" and member["key_id"] == "register-S001"
    refused = [line for line in lines if line["status"] == 401]
    assert len(refused) == 1 and refused[0]["key_id"] is None
    unrouted = by_path[("GET", "/v1/member/*********0001")]
    assert unrouted["status"] == 404 and unrouted["route"] is None
    assert ("GET", "/v1/members/*********0001/statement?card=*********0001") in by_path


def test_combined_log_format_on_standard_output(server_with, tmp_path):
    server = server_with(access_log="combined")
    traffic(server)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [line for line in server.log.read_text().splitlines() if COMBINED.match(line)]
        if len(lines) >= 6:
            break
        time.sleep(0.05)
    no_secrets(server.log.read_text())
    fields = [COMBINED.match(line).groups() for line in lines]
    receipt = next(f for f in fields if f[3] == "POST" and f[4] == "/v1/receipts")
    assert receipt[0] == "127.0.0.1" and receipt[1] == "register-S001" and receipt[5] == "201"
    assert receipt[8] == 'till \\x22K01\\x22'
    refused = next(f for f in fields if f[5] == "401")
    assert refused[1] == "-" and refused[4] == "/v1/members/*********0001"


def test_off_by_default(server_with):
    server = server_with()
    traffic(server)
    requests.get(server.url("/healthz"))
    time.sleep(0.3)
    text = server.log.read_text()
    assert "/healthz" not in text and "/v1/receipts" not in text
    no_secrets(text)


def test_a_rotated_file_is_reopened(server_with, tmp_path):
    log = tmp_path / "access.log"
    server = server_with(access_log="json", access_log_path=str(log))
    requests.get(server.url("/healthz"))
    wait_for_lines(log, 1)
    log.rename(tmp_path / "access.log.1")     # what logrotate does before it signals nobody
    requests.get(server.url("/openapi.json"))
    assert json.loads(wait_for_lines(log, 1)[0])["path"] == "/openapi.json"


def test_an_unknown_format_stops_start_up():
    with pytest.raises(ConfigError) as refused:
        config_from_dict({"server": {"access_log": "apache"}})
    assert refused.value.key == "server.access_log"


def test_off_written_plainly_in_the_config_is_off(tmp_path):
    """YAML reads a bare `off` as false: the config says off, so it is off, not a type error."""
    from server.config import load_config
    path = tmp_path / "config.yaml"
    path.write_text("server:\n  access_log: off\n")
    assert load_config(path, environ={}).server.access_log == "off"
    path.write_text("server: {}\n")
    assert load_config(path, environ={"LOYALTY_SERVER__ACCESS_LOG": "off"}).server.access_log == "off"
    path.write_text("server:\n  access_log: on\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path, environ={})
    assert refused.value.key == "server.access_log" and "combined" in refused.value.reason


class SlowDestination(logging.Handler):
    """Holds the writer in its first line until let go."""

    def __init__(self):
        super().__init__()
        self.entered, self.go_on, self.lines = threading.Event(), threading.Event(), []

    def emit(self, record):
        self.entered.set()
        self.go_on.wait(10)
        self.lines.append(record.getMessage())


def test_a_slow_destination_drops_lines_and_says_how_many(caplog):
    destination = SlowDestination()
    writer = AccessLogWriter(destination, lines_max=2)
    writer.start()
    writer.put("line 1")
    assert destination.entered.wait(10)      # the writer holds line 1; the queue holds two more
    for n in range(2, 6):
        writer.put(f"line {n}")               # returns at once, full or not
    with caplog.at_level(logging.WARNING, logger="loyalty.server"):
        destination.go_on.set()
        writer.stop()
    assert destination.lines == ["line 1", "line 2", "line 3"]
    assert "access log: 2 line(s) dropped" in caplog.text
