"""WAL frames and bytes a confirmed receipt writes, by the table or index each page belongs to.

    PYTHONPATH=. python benchmarks/wal_pages.py BEFORE AFTER [--members 10000] [--receipts 500] [--concurrent 1 10]

A COMMIT writes one WAL frame (a 4 KiB page and its 24-byte header) for every page the
transaction changed, so what a receipt costs the disk is the pages it touches, shared by
the receipts of its commit. Each revision's tree (exported as benchmarks/ab.py does) runs
in a process of its own: it enrolls the members, confirms a receipt for each of them
(warm-up: every member has a lot and a receipt), then confirms `--receipts` more,
`--concurrent` at a time (so that many share a commit; from 16 registers in turn), with
checkpoints held off; the frames the WAL gained meanwhile are read from the file and
attributed to their page's owner with SQLite's dbstat. Prints frames per receipt by owner,
and WAL bytes per receipt.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.ab import export  # noqa: E402
from benchmarks import confirm_cpu  # noqa: E402
from benchmarks.confirm_cpu import RECEIPT_LINES  # noqa: E402

# Runs inside the revision's tree: prints {"frames": {owner: n}, "bytes": n, "commits": n}.
CHILD = r"""
import asyncio, collections, json, os, sqlite3, struct, sys, tempfile
from pathlib import Path
import storage.db
storage.db.CHECKPOINT_INTERVAL_S = 1e9      # the WAL only grows while measured
from server import schema
from server.app import create_app
from server.auth import Principal
from server.config import config_from_dict
from server.keys import OPS
from server.ops import members as member_ops, receipts as receipt_ops

members, count, concurrent = (int(a) for a in sys.argv[1:4])
REGISTER = Principal("bench", "register", frozenset({"S001"}))
MANAGER = Principal("bench-manager", "manager", frozenset())
%s
# Receipts come from this many registers in turn, each numbering its own: the indexes keyed
# by a receipt's identity take them at as many places, as a store's tills do. Their members
# follow no order (7919 is prime to any member count that is not a multiple of it), so the
# indexes keyed by member take each receipt at a place of its own, as in a shop.
REGISTERS = 16

def receipt(n):
    lines, total = receipt_lines(n)
    return schema.decode(
        f'{{"receipt_id": "{n // REGISTERS:06d}", "store_id": "S001", "register_id": "K{n %% REGISTERS:02d}", '
        f'"ts": "2026-11-24T12:00:00+02:00", '
        f'"card": "card-{n * 7919 %% members}", "lines": [{lines}], "total": {total}}}'.encode(), schema.Receipt)

async def in_groups(calls, size):
    for at in range(0, len(calls), size):
        await asyncio.gather(*(call() for call in calls[at:at + size]))

async def confirm_all(numbers, size):
    async def confirm(n):
        answered = await receipt_ops.confirm(deps, receipt(n), REGISTER)
        assert answered[0] == 201, answered
    await in_groups([lambda n=n: confirm(n) for n in numbers], size)

def frames(wal, start):
    with open(wal, "rb") as f:
        f.seek(start)
        data = f.read()
    page = 4096 + 24
    out = []
    for at in range(0, len(data) - page + 1, page):
        number, commit = struct.unpack(">II", data[at:at + 8])
        out.append((number, commit))
    return out

async def main():
    folder = Path(tempfile.mkdtemp(prefix="wal-pages-"))
    path = folder / "bench.db"
    app = create_app(config_from_dict({
        "database": {"path": str(path), "wal_checkpoint_mib": 4096, "cache_mib": 256},
        "rules": {"dir": "rules/programs/market", "watch": False},
        "clock": {"start": "2026-11-24T12:00:05+02:00"}, "jobs": {"enabled": False},
        "privacy": {"hmac_key": "bench-hmac-key-0123456789"}}))
    app.freeze()
    await app.startup()
    global deps
    try:
        deps = app[OPS]
        await in_groups([lambda m=m: member_ops.enroll(deps, schema.Enrollment(card=f"card-{m}"), MANAGER)
                         for m in range(members)], 200)
        await confirm_all(range(members), 50)
        wal = str(path) + "-wal"
        start = os.path.getsize(wal)
        await confirm_all(range(members, members + count), concurrent)
        written = frames(wal, start)
        reader = sqlite3.connect(path)
        owner = dict(reader.execute("SELECT pageno, name FROM dbstat"))
        by_owner = collections.Counter(owner.get(number, "(free list)") for number, _ in written)
        print(json.dumps({"frames": by_owner, "bytes": len(written) * (4096 + 24),
                          "commits": sum(1 for _, commit in written if commit)}))
    finally:
        await app.cleanup()

asyncio.run(main())
""" % (RECEIPT_LINES,)


def run(tree: Path, members: int, count: int, concurrent: int) -> dict:
    return confirm_cpu.run(tree, members, count, concurrent, child=CHILD, timeout_seconds=1800)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--members", type=int, default=10_000)
    parser.add_argument("--receipts", type=int, default=500)
    parser.add_argument("--concurrent", type=int, nargs="+", default=[1, 10])
    args = parser.parse_args()
    trees = {"before": export(args.before), "after": export(args.after)}
    for concurrent in args.concurrent:
        found = {side: run(tree, args.members, args.receipts, concurrent) for side, tree in trees.items()}
        print(f"\n{concurrent} receipt(s) at a time, {args.receipts} receipts; frames per receipt by owner")
        owners = sorted({o for r in found.values() for o in r["frames"]},
                        key=lambda o: -max(r["frames"].get(o, 0) for r in found.values()))
        print(f"{'owner':32} {'before':>8} {'after':>8}")
        for o in owners:
            print(f"{o:32} " + " ".join(f"{found[s]['frames'].get(o, 0) / args.receipts:8.2f}" for s in trees))
        for side, r in found.items():
            print(f"{side} ({trees[side].name}): {r['bytes'] / args.receipts:,.0f} WAL bytes per receipt, "
                  f"{r['commits'] / args.receipts:.2f} commits per receipt")


if __name__ == "__main__":
    main()
