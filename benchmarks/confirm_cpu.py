"""CPU per confirmed receipt of two revisions, side by side, without HTTP or a load driver.

    PYTHONPATH=. python benchmarks/confirm_cpu.py BEFORE AFTER [--rounds 5] [--receipts 2000] [--concurrent 32]
    PYTHONPATH=. python benchmarks/confirm_cpu.py BEFORE AFTER --callgrind --members 50 --receipts 200 --concurrent 10
    PYTHONPATH=. python benchmarks/confirm_cpu.py BEFORE AFTER --callgrind --http --members 50 --receipts 200 --concurrent 10

Each revision's tree (exported as benchmarks/ab.py does) runs in a process of its own that
enrolls members on a fresh database and confirms receipts through server/ops/receipts.py,
`--concurrent` at a time so that they share commits as under load; the processes alternate
(before, after, before, ...). Prints each process's CPU per receipt (all its threads, and
the event loop's thread alone) and the medians. Both revisions need server/ops (2ec7a2b
and later).

On a machine whose cores other processes share, CPU time per receipt still moves by 20 %
from run to run. `--callgrind` counts instructions instead (valgrind, about 40 times
slower): each side runs twice, with 20 receipts and with `--receipts` more, and the
difference of the two counts over `--receipts` is the instructions per confirmed receipt,
the same on every run whatever else the machine does. `--callgrind --http` counts the real
server instead (`loyalty serve` under valgrind, the receipts sent over HTTP by this
process): the receipt path plus aiohttp, the middlewares, decoding and the answer.

`--history H` has every member confirm H receipts before the measured ones, so that each
holds a lot per receipt as a regular customer does (one per shopping day): what a receipt
costs as its member's history grows.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.ab import export  # noqa: E402
from benchmarks.run import VENV_BIN  # noqa: E402

CATEGORIES = ("dairy", "bakery", "grocery", "dairy", "fuel", "grocery", "alcohol", "dairy", "bakery", "grocery")

# The ten lines of a benchmark receipt, as the child scripts (this file's, wal_pages.py's) define them.
RECEIPT_LINES = r'''
CATEGORIES = %r

def receipt_lines(n):
    """Ten lines (JSON text) over CATEGORIES, their amounts varied by n, and their total."""
    amounts = [500 + (n * 7919 + i * 104729) %% 20000 for i in range(10)]
    lines = ", ".join(
        f'{{"line_no": {i + 1}, "sku": "s{i}", "category": "{CATEGORIES[(n + i) %% 10]}", "qty": 1, '
        f'"price": {amount}, "amount": {amount}}}' for i, amount in enumerate(amounts))
    return lines, sum(amounts)
''' % (CATEGORIES,)

# Runs inside the revision's tree: prints {"process_us": ..., "loop_us": ...} per receipt.
CHILD = r"""
import asyncio, json, sys, tempfile, time
from pathlib import Path
from server import schema
from server.app import create_app
from server.auth import Principal
from server.config import config_from_dict
from server.keys import OPS
from server.ops import members as member_ops, receipts as receipt_ops

members, count, concurrent = (int(a) for a in sys.argv[1:4])
history = int(sys.argv[4]) if len(sys.argv) > 4 else 0   # receipts each member had before, a lot each
REGISTER = Principal("bench", "register", frozenset({"S001"}))
MANAGER = Principal("bench-manager", "manager", frozenset())
%s

def receipt(n):
    lines, total = receipt_lines(n)
    return schema.decode(
        f'{{"receipt_id": "b{n}", "store_id": "S001", "register_id": "K01", "ts": "2026-11-24T12:00:00+02:00", '
        f'"card": "card-{n %% members}", "lines": [{lines}], "total": {total}}}'.encode(), schema.Receipt)

async def confirm_all(deps, bodies):
    for at in range(0, len(bodies), concurrent):
        done = await asyncio.gather(*(receipt_ops.confirm(deps, b, REGISTER) for b in bodies[at:at + concurrent]))
        assert all(answered[0] == 201 for answered in done), done

async def main():
    folder = Path(tempfile.mkdtemp(prefix="confirm-cpu-"))
    app = create_app(config_from_dict({
        "database": {"path": str(folder / "bench.db")}, "rules": {"dir": "rules/programs/market", "watch": False},
        "clock": {"start": "2026-11-24T12:00:05+02:00"}, "jobs": {"enabled": False},
        "privacy": {"hmac_key": "bench-hmac-key-0123456789"}}))
    app.freeze()
    await app.startup()         # start-up and clean-up without a listener
    try:
        deps = app[OPS]
        for m in range(members):
            await member_ops.enroll(deps, schema.Enrollment(card=f"card-{m}"), MANAGER)
        await confirm_all(deps, [receipt(n) for n in range(members * (1 + history))])    # history, warm-up
        first = members * (1 + history)
        bodies = [receipt(n) for n in range(first, first + count)]
        cpu, loop = time.process_time(), time.thread_time()
        await confirm_all(deps, bodies)
        print(json.dumps({"process_us": (time.process_time() - cpu) / count * 1e6,
                          "loop_us": (time.thread_time() - loop) / count * 1e6}))
    finally:
        await app.cleanup()

asyncio.run(main())
""" % (RECEIPT_LINES,)


def run(tree: Path, members: int, count: int, concurrent: int, child: str = CHILD,
        timeout_seconds: int = 900, history: int = 0) -> dict:
    """The last line `child` (this file's CHILD unless given) prints, as JSON, run in `tree`."""
    out = subprocess.run([str(VENV_BIN / "python"), "-c", child, str(members), str(count), str(concurrent),
                          str(history)],
                         cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=timeout_seconds)
    if out.returncode != 0:
        raise SystemExit(f"{tree.name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def instructions(tree: Path, members: int, count: int, concurrent: int, history: int = 0) -> float:
    """Instructions per confirmed receipt: two runs under callgrind, 20 and 20 + count receipts,
    so that start-up and the warm-up cancel out."""
    # Compiled first: the first run in a freshly exported tree would otherwise count the
    # compiling of every module, which the second does not repeat.
    subprocess.run([str(VENV_BIN / "python"), "-m", "compileall", "-q", str(tree)], check=True,
                   capture_output=True)
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "child.py"
        script.write_text(CHILD)
        totals = [callgrind_total(tree, [str(VENV_BIN / "python"), str(script), str(members), str(receipts),
                                         str(concurrent), str(history)]) for receipts in (20, 20 + count)]
    return (totals[1] - totals[0]) / count


def callgrind_total(tree: Path, argv: list[str]) -> int:
    """The instructions `argv` runs in `tree`, counted by callgrind (hash seed fixed)."""
    with tempfile.TemporaryDirectory() as folder:
        out = subprocess.run(["valgrind", "--tool=callgrind", "--cache-sim=no", "--branch-sim=no",
                              f"--callgrind-out-file={folder}/callgrind.out", *argv],
                             cwd=tree, env={**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"},
                             capture_output=True, text=True, timeout=1800)
    found = re.findall(r"Collected : (\d+)", out.stderr)
    if out.returncode != 0 or len(found) != 1:
        raise SystemExit(f"{tree.name} under valgrind failed:\n{out.stderr[-3000:]}")
    return int(found[0])


def http_instructions(tree: Path, members: int, count: int, concurrent: int) -> float:
    """Instructions per confirmed receipt of `loyalty serve` itself, HTTP included: two runs
    under callgrind as instructions() does, the receipts sent over `concurrent` keep-alive
    connections by this process (not counted)."""
    subprocess.run([str(VENV_BIN / "python"), "-m", "compileall", "-q", str(tree)], check=True,
                   capture_output=True)
    totals = []
    for receipts in (20, 20 + count):
        with tempfile.TemporaryDirectory() as folder:
            totals.append(_served(tree, Path(folder), members, receipts, concurrent))
    return (totals[1] - totals[0]) / count


def _served(tree: Path, folder: Path, members: int, receipts: int, concurrent: int) -> int:
    port = free_port()
    sha = lambda key: hashlib.sha256(key.encode()).hexdigest()  # noqa: E731
    config = folder / "config.yaml"
    config.write_text(json.dumps({     # JSON is YAML
        "server": {"host": "127.0.0.1", "port": port},
        "database": {"path": str(folder / "bench.db")},
        "rules": {"dir": str(tree.resolve() / "rules/programs/market"), "watch": False},
        "clock": {"start": "2026-11-24T12:00:05+02:00"}, "jobs": {"enabled": False},
        "privacy": {"hmac_key": "bench-hmac-key-0123456789"},
        "limits": {"requests_per_second_per_key": 1_000_000, "burst": 10_000_000},
        "auth": {"keys": [{"id": "bench", "sha256": sha("bench-register"), "role": "register", "stores": ["S001"]},
                          {"id": "bench-manager", "sha256": sha("bench-manager"), "role": "manager"}]}}))
    server = subprocess.Popen(["valgrind", "--tool=callgrind", "--cache-sim=no", "--branch-sim=no",
                               f"--callgrind-out-file={folder}/callgrind.out", str(VENV_BIN / "python"), "-m",
                               "server.cli", "serve", "--config", str(config)],
                              cwd=tree, env={**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_ready(port, server)
        send(port, "bench-manager", [("/v1/members", {"card": f"card-{m}"}) for m in range(members)], 1)
        send(port, "bench-register", [("/v1/receipts", _receipt(n, members)) for n in range(members)], concurrent)
        send(port, "bench-register", [("/v1/receipts", _receipt(n, members))
                                       for n in range(members, members + receipts)], concurrent)
    finally:
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=600)
    found = re.findall(r"Collected : (\d+)", err)
    if len(found) != 1:
        raise SystemExit(f"{tree.name} served under valgrind failed:\n{err[-3000:]}")
    return int(found[0])


def _receipt(n: int, members: int) -> dict:
    amounts = [500 + (n * 7919 + i * 104729) % 20000 for i in range(10)]
    return {"receipt_id": f"b{n}", "store_id": "S001", "register_id": "K01", "ts": "2026-11-24T12:00:00+02:00",
            "card": f"card-{n % members}", "total": sum(amounts),
            "lines": [{"line_no": i + 1, "sku": f"s{i}", "category": CATEGORIES[(n + i) % 10], "qty": 1,
                       "price": amount, "amount": amount} for i, amount in enumerate(amounts)]}


def _wait_ready(port: int, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited: {server.stderr.read()[-3000:]}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/readyz")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit("the server was not ready within 600 s")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def send(port: int, key: str, requests: list[tuple[str, dict | bytes]], connections: int) -> None:
    """POSTs each (path, body: a dict, or JSON already encoded) with `key`, on `connections`
    keep-alive connections, each sending its share one after another; answers checked (2xx)."""
    def share_of(share: list[tuple[str, dict | bytes]]) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        for path, body in share:
            encoded = body if isinstance(body, bytes) else json.dumps(body)
            connection.request("POST", path, encoded, {"Authorization": f"Bearer {key}",
                                                       "Content-Type": "application/json"})
            answer = connection.getresponse()
            text = answer.read()
            if answer.status >= 300:
                raise RuntimeError(f"{path} answered {answer.status}: {text[:300]!r}")
        connection.close()
    with concurrent.futures.ThreadPoolExecutor(connections) as pool:
        list(pool.map(share_of, [requests[at::connections] for at in range(connections)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--receipts", type=int, default=2000)
    parser.add_argument("--concurrent", type=int, default=32)
    parser.add_argument("--callgrind", action="store_true", help="instructions per receipt (needs valgrind)")
    parser.add_argument("--http", action="store_true", help="with --callgrind: of `loyalty serve`, HTTP included")
    parser.add_argument("--history", type=int, default=0,
                        help="receipts each member confirmed before the measured ones (a lot each); not with --http")
    args = parser.parse_args()
    trees = {"before": export(args.before), "after": export(args.after)}
    if args.callgrind:
        if args.http:
            counted = {side: http_instructions(tree, args.members, args.receipts, args.concurrent)
                       for side, tree in trees.items()}
        else:
            counted = {side: instructions(tree, args.members, args.receipts, args.concurrent, args.history)
                       for side, tree in trees.items()}
        print(f"instructions per confirmed receipt: before {counted['before'] / 1e6:.3f} M, "
              f"after {counted['after'] / 1e6:.3f} M ({counted['after'] / counted['before'] - 1:+.1%})")
        return
    results: dict[str, list[dict]] = {"before": [], "after": []}
    for round_no in range(args.rounds):
        for side, tree in trees.items():
            result = run(tree, args.members, args.receipts, args.concurrent, history=args.history)
            results[side].append(result)
            print(f"round {round_no + 1} {side} ({tree.name}): {result['process_us']:,.0f} us CPU/receipt, "
                  f"event loop thread {result['loop_us']:,.0f}", flush=True)
    for key, name in (("process_us", "us CPU/receipt"), ("loop_us", "us CPU/receipt, loop thread")):
        b = statistics.median(r[key] for r in results["before"])
        a = statistics.median(r[key] for r in results["after"])
        print(f"median {name}: before {b:,.0f}, after {a:,.0f} ({a / b - 1:+.1%})")


if __name__ == "__main__":
    main()
