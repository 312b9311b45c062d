"""`make bench`'s PostgreSQL rows, their plumbing only: the comparison runs end to end on a
few hundred members for a second a shape and prints one row per shape with receipts
confirmed and CPU counted where it should be. No timing is asserted (the machine is shared);
skipped without PostgreSQL, wrk or taskset (`make bench` installs the last two)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pg_cluster import bins_or_skip

ROOT = Path(__file__).resolve().parent.parent
# Generating the members, copying them into PostgreSQL, three servers started and warmed up:
# well under a minute on an idle machine.
RUN_TIMEOUT_S = 300


def three_free_ports() -> int:
    """The first of three consecutive ports nothing listens on (the benchmark's three servers)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + 2 > 65535:
            continue
        try:
            for port in (first + 1, first + 2):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    pytest.skip("no three consecutive free ports on 127.0.0.1")


def row(out: str, name: str) -> list[str]:
    lines = [line for line in out.splitlines() if line.startswith(f"| {name} ")]
    assert len(lines) == 1, out
    return [cell.strip() for cell in lines[0].strip("|").split("|")]


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


def test_bench_compares_postgresql_with_one_and_two_processes_beside_sqlite(tmp_path):
    bins_or_skip()
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (`make bench` installs it)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_DATA": str(tmp_path), "BENCH_PORT": str(three_free_ports())}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--pg-only", "--duration", "1",
                           "--pg-rounds", "1", "--pg-members", "300"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "## PostgreSQL beside SQLite" in out

    # shape, confirmed/s, lowest/highest, p50/p99, each server's CPU, PostgreSQL's, in all, errors
    sqlite = row(out, "SQLite, one process")
    assert number(sqlite[1]) > 0 and number(sqlite[4]) > 0
    assert sqlite[5] == "-"                      # no cluster behind SQLite
    one = row(out, "PostgreSQL, one process")
    assert number(one[1]) > 0 and number(one[4]) > 0 and number(one[5]) > 0
    assert number(one[6]) == pytest.approx(number(one[4]) + number(one[5]), abs=2)
    two = row(out, "PostgreSQL, two processes")
    per_process = [number(us) for us in two[4].split(" + ")]
    assert len(per_process) == 2 and all(us > 0 for us in per_process)
    assert number(two[1]) > 0 and number(two[5]) > 0
    assert [sqlite[7], one[7], two[7]] == ["0", "0", "0"], [line for line in out.splitlines()
                                                            if line.startswith("Failed requests")]
