"""`loyalty serve` says what is wrong with its program the way `loyalty rules check` does:
`file:line:column: [warning: ]message`, one a line. A program with only warnings is served
and each warning is a log line of its own; a refused one stops the start with its errors
and its warnings on standard error and exit code 2."""
from __future__ import annotations

import asyncio
import shutil

import aiohttp
import pytest

from conftest import MARKET
from test_crash_safety import Server

IGNORED = "warning: ignored: only .yaml and .yml files are part of the program"
UNKNOWN_STORE = "campaigns/zz-typo.yaml:2:36: warning: unknown store 'S0001', did you mean 'S001'?"


@pytest.fixture
def program(tmp_path):
    folder = tmp_path / "program"
    shutil.copytree(MARKET, folder)
    (folder / "notes.txt").write_text("not part of the program\n")
    (folder / "campaigns" / "zz-typo.yaml").write_text(
        "rules:\n  - {id: typo-store, when: {store: S0001}, reward: {points: 1}}\n")
    return folder


def test_a_program_with_warnings_is_served_and_each_warning_logged_on_its_own_line(tmp_path, program):
    server = Server(tmp_path, rules={"dir": str(program)})
    server.start()
    try:
        async def health():
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
                async with session.get(server.url("/healthz")) as resp:
                    return resp.status
        assert asyncio.run(health()) == 200
    finally:
        server.kill()
    lines = server.log.read_text().splitlines()
    warned = [line.split(" WARNING loyalty.rules: ", 1)[1] for line in lines if " WARNING loyalty.rules: " in line]
    assert warned[1:] == [UNKNOWN_STORE, f"notes.txt:1:1: {IGNORED}"], lines
    assert warned[0].endswith("(startup): 2 warning(s):"), lines


def test_a_refused_program_prints_its_errors_and_warnings_one_a_line_and_exits_2(tmp_path, program):
    (program / "campaigns" / "broken.yaml").write_text("rules:\n  - id: broken\n    rewrad: {points: 1}\n")
    server = Server(tmp_path, rules={"dir": str(program)})
    with pytest.raises(RuntimeError):
        server.start()
    assert server.proc.wait(30) == 2
    printed = [line for line in server.log.read_text().splitlines()
               if " WARNING " not in line and " INFO " not in line]
    assert printed == [
        "campaigns/broken.yaml:2:5: missing required key 'reward'",
        "campaigns/broken.yaml:3:5: unknown key 'rewrad', did you mean 'reward'?",
        UNKNOWN_STORE,
        f"notes.txt:1:1: {IGNORED}",
        f"the program in {program} does not load (2 problem(s), 2 warning(s)); not starting"], printed
    assert "Traceback" not in server.log.read_text()
