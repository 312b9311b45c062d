"""`loyalty export ledger ... | head` and every other command whose standard output stops
being read: the command stops writing and exits 141 (as if killed by SIGPIPE), with no
traceback and no "Exception ignored" at interpreter exit."""
import asyncio
import json
import os
import subprocess
import sys

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from conftest import MARKET, ROOT, TEST_HMAC_KEY, Api, connect, database_section, line, receipt, test_config
from server.app import create_app
from server.cli_output import BROKEN_PIPE_STATUS

NOW = "2026-11-24T12:00:05+02:00"
RECEIPTS = 400          # ~800 postings: both exports are several times a pipe's 64 KiB buffer
CONCURRENT = 100        # written in group commits, so building the database stays quick
PIPE_BUFFER_BYTES = 64 * 1024
EXIT_TIMEOUT_S = 120


async def _fill(config) -> None:
    async with TestClient(TestServer(create_app(config), host="127.0.0.1")) as client:
        api = Api(client)
        assert (await api.post("/v1/members", {"card": "1"}))[0] == 201
        for start in range(0, RECEIPTS, CONCURRENT):
            sent = await asyncio.gather(*(
                api.post("/v1/receipts", receipt(f"R-{n:04d}", [line(1, "dairy", 12000), line(2, "grocery", 8000),
                                                               line(3, "bakery", 3000)], card="1"), as_="register")
                for n in range(start, start + CONCURRENT)))
            assert all(status == 201 for status, _ in sent)


@pytest.fixture(scope="module")
def loyalty(tmp_path_factory):
    """A config on a database full of receipts, and how to run the real CLI on it."""
    where = tmp_path_factory.mktemp("broken_pipe")
    asyncio.run(_fill(test_config(where, NOW)))
    config = where / "cli.yaml"
    # The server's HMAC key: the commands use the keys the database's hashes were made with.
    config.write_text(yaml.safe_dump({"database": database_section(where / "loyalty.db"),
                                      "rules": {"dir": str(MARKET), "watch": False}, "clock": {"start": NOW},
                                      "privacy": {"hmac_key": TEST_HMAC_KEY}}))

    def argv(*args: str) -> list[str]:
        return [sys.executable, "-m", "server.cli", *(str(a) for a in args)]
    return where, str(config), argv


def assert_quiet_exit(proc: subprocess.Popen) -> None:
    assert proc.wait(timeout=EXIT_TIMEOUT_S) == BROKEN_PIPE_STATUS
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert "Traceback" not in err and "Exception ignored" not in err and "BrokenPipeError" not in err, err


@pytest.mark.parametrize("command", [["export", "ledger", "--format", "csv"], ["export", "ledger", "--format", "jsonl"],
                                     ["export", "receipts"]])
def test_export_into_a_reader_that_stops_early(loyalty, command):
    _, config, argv = loyalty
    proc = subprocess.Popen(argv(*command, "--config", config), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout.read(1)      # `head -c 1`: one byte read, then the pipe is closed
    proc.stdout.close()
    assert_quiet_exit(proc)


def test_export_read_to_the_end_is_whole(loyalty):
    where, config, argv = loyalty
    done = subprocess.run(argv("export", "ledger", "--format", "jsonl", "--config", config), cwd=ROOT,
                          capture_output=True, timeout=EXIT_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout) > 2 * PIPE_BUFFER_BYTES
    with connect(where / "loyalty.db") as conn:
        postings = conn.execute("SELECT COUNT(*) FROM postings").fetchone()[0]
    assert [json.loads(row)["id"] for row in done.stdout.splitlines()] == list(range(1, postings + 1))


@pytest.mark.parametrize("command", ["audit verify", "partners settle", "rules diff", "rules check",
                                     "rules explain"])
def test_commands_writing_to_a_closed_pipe(loyalty, command):
    where, config, argv = loyalty
    receipts = where / "receipts.jsonl"
    if not receipts.exists():
        subprocess.run(argv("export", "receipts", "--config", config, "--out", receipts), cwd=ROOT, check=True,
                       timeout=EXIT_TIMEOUT_S, capture_output=True)
    one = where / "receipt.json"
    one.write_text(json.dumps(receipt("E-1", [line(1, "dairy", 12000)], card="1")))
    args = {"audit verify": ["--config", config],
            "partners settle": ["--period", "2026-11", "--config", config, "--out", where / "reports"],
            "rules diff": [MARKET, ROOT / "tests" / "programs" / "cafe", "--receipts", receipts],
            "rules check": [MARKET],
            "rules explain": [one, "--config", config]}[command]
    read_end, write_end = os.pipe()
    os.close(read_end)              # nobody will ever read: the first write fails
    try:
        proc = subprocess.Popen(argv(*command.split(), *args), cwd=ROOT, stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    assert_quiet_exit(proc)
