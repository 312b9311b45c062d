"""What the events outbox costs a confirmed receipt, side by side in one process.

    PYTHONPATH=. python benchmarks/events_outbox.py [--members 2000] [--receipts 100] [--rounds 30]

Confirms receipts through server/ops/receipts.py (the write path without HTTP) on one database, in
alternating blocks with the outbox on (receipt.confirmed plus the tier check, as served) and
off (the emit replaced by nothing), and prints the event loop thread's CPU per receipt of each
(medians) and their ratio. Short alternating blocks on one database let drift on a shared
machine hit both alike.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from server import schema, webhooks  # noqa: E402
from server.app import create_app  # noqa: E402
from server.auth import Principal  # noqa: E402
from server.config import config_from_dict  # noqa: E402
from server.keys import OPS  # noqa: E402
from server.ops import members as member_ops, receipts as receipt_ops  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REGISTER = Principal("bench", "register", frozenset({"S001"}))
MANAGER = Principal("bench-manager", "manager", frozenset())


def receipt(n: int, members: int) -> schema.Receipt:
    amount = 1_000 + (n * 7919) % 150_000
    return schema.decode(
        f'{{"receipt_id": "b{n}", "store_id": "S001", "register_id": "K01", "ts": "2026-11-24T12:00:00+02:00",'
        f' "card": "card-{n % members}", "lines": [{{"line_no": 1, "sku": "x", "category": "dairy", "qty": 1,'
        f' "price": {amount}, "amount": {amount}}}], "total": {amount}}}'.encode(), schema.Receipt)


async def block(deps, start: int, count: int, members: int) -> float:
    """CPU seconds per receipt over `count` confirms, of the event loop's thread: it runs each
    receipt's transaction (the sync thread only waits for the disk)."""
    bodies = [receipt(n, members) for n in range(start, start + count)]
    cpu = time.thread_time()
    for body in bodies:
        status, _, _ = await receipt_ops.confirm(deps, body, REGISTER)
        assert status == 201
    return (time.thread_time() - cpu) / count


async def main(members: int, per_block: int, rounds: int) -> None:
    folder = Path(tempfile.mkdtemp(prefix="events-bench-"))
    config = config_from_dict({"database": {"path": str(folder / "bench.db")},
                               "rules": {"dir": str(ROOT / "rules/programs/market"), "watch": False},
                               "clock": {"start": "2026-11-24T12:00:05+02:00"}, "jobs": {"enabled": False},
                               "privacy": {"hmac_key": "bench-hmac-key-0123456789"}})
    app = create_app(config)
    async with serving(app):
        deps = app[OPS]
        for m in range(members):
            await member_ops.enroll(deps, schema.Enrollment(card=f"card-{m}"), MANAGER)
        real, n = webhooks.emit_noting_tier, 0
        inside: list[float] = []

        def timed(*args, **kwargs):
            started = time.thread_time()
            real(*args, **kwargs)
            inside.append(time.thread_time() - started)
        await block(deps, n, per_block, members)          # warm-up: caches, the program
        n += per_block
        sides: dict[str, list[float]] = {"on": [], "off": []}
        for _ in range(rounds):
            for side in ("off", "on"):
                webhooks.emit_noting_tier = timed if side == "on" else (lambda *a, **k: None)
                sides[side].append(await block(deps, n, per_block, members))
                n += per_block
        webhooks.emit_noting_tier = real
    on, off = statistics.median(sides["on"]), statistics.median(sides["off"])
    print(f"outbox off: {off * 1e6:.0f} us CPU/receipt (median of {rounds} blocks of {per_block})")
    print(f"outbox on:  {on * 1e6:.0f} us CPU/receipt")
    print(f"the outbox's own calls: {statistics.median(inside) * 1e6:.0f} us median, "
          f"{statistics.mean(inside) * 1e6:.0f} us mean per receipt, {100 * statistics.mean(inside) / off:.1f} % "
          f"of a receipt without it")
    print(f"cost: {(on - off) * 1e6:.0f} us/receipt, {100 * (on / off - 1):.1f} % more CPU, "
          f"{100 * (1 - off / on):.1f} % fewer receipts/s at full load")


class serving:
    """The app's start-up and clean-up (cleanup_ctx) without a listener."""

    def __init__(self, app):
        self.app = app

    async def __aenter__(self):
        self.app.freeze()
        await self.app.startup()

    async def __aexit__(self, *exc):
        await self.app.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=2_000)
    parser.add_argument("--receipts", type=int, default=100, help="confirms per block")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    asyncio.run(main(args.members, args.receipts, args.rounds))
