"""What segments, a personal offer and coupon codes cost a confirmed receipt, side by side in one process.

    PYTHONPATH=. python benchmarks/cvm_cost.py [--members 300] [--receipts 200] [--rounds 4]

Confirms receipts through server/ops/receipts.py (the write path without HTTP) on one database, in
alternating blocks of three sides:

- A: rules/programs/market as it is;
- B: the same plus a `segments:` section (a `list` segment holding a third of the members, an
  `rfm` segment scored by the daily job), a rule `when: {segment: ...}` for each, a
  `personal: true` rule whose offer (with a points budget) half of the members hold, and a
  coupon campaign with a rule `when: {coupon: ...}`; every third receipt of B carries a fresh
  single-use code;
- idle: program B for members in no segment, holding no offer, sending no code: the reads
  B adds to every receipt, without the postings and writes of the rules that pay.

Segments, offers and codes are set up through the manager's handlers (server/cvm.py), as
`PUT /v1/admin/segments/{id}/members`, `POST /v1/admin/offers` and
`POST /v1/admin/coupons/{campaign}/codes` do. Prints the event loop thread's CPU per receipt
of each side (medians of the blocks) and their difference, which is the share of confirmed
receipts/s lost at full load. Short alternating blocks on one database let drift on a shared
machine hit both alike.
"""
from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rules.loader import read_directory  # noqa: E402
from server import cvm, rfm, schema  # noqa: E402
from server.app import create_app  # noqa: E402
from server.auth import Principal  # noqa: E402
from server.config import config_from_dict  # noqa: E402
from server.keys import CLOCK, DATABASE, OPS, PROGRAMS  # noqa: E402
from server.ops import members as member_ops, receipts as receipt_ops  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MARKET = ROOT / "rules/programs/market"
REGISTER = Principal("bench", "register", frozenset({"S001"}))
MANAGER = Principal("bench-manager", "manager", frozenset())
CODES_PER_REQUEST = 10_000      # the handler's own limit (schema.COUPONS_PER_REQUEST_MAX)

# Added to the market program for side B; the rewards are small so that earning stays
# as it is otherwise (same tiers, same postings but for the added rules').
CVM_FILE = """\
segments:
  rfm: {window_days: 365}
  define:
    - {id: staff, list: true}
    - {id: big-spenders, rfm: {m: [3, 5]}}
coupons:
  - {id: flyer, uses_per_code: 1}
rules:
  - id: staff-bonus
    when: {segment: staff}
    reward: {percent: 5}
  - id: big-spender-bonus
    when: {segment: big-spenders}
    reward: {points: 10}
  - id: comeback
    personal: true
    reward: {points: 30}
  - id: flyer-coupon
    when: {coupon: flyer}
    reward: {points: 100}
"""


def receipt(n: int, members: int, code: str | None = None, card: str = "card") -> schema.Receipt:
    amount = 1_000 + (n * 7919) % 150_000
    coupons = f', "coupons": ["{code}"]' if code else ""
    return schema.decode(
        f'{{"receipt_id": "b{n}", "store_id": "S001", "register_id": "K01", "ts": "2026-11-24T12:00:00+02:00",'
        f' "card": "{card}-{n % members}", "lines": [{{"line_no": 1, "sku": "x", "category": "dairy", "qty": 1,'
        f' "price": {amount}, "amount": {amount}}}], "total": {amount}{coupons}}}'.encode(), schema.Receipt)


async def block(deps, start: int, count: int, members: int, codes: list[str] | None,
                card: str = "card") -> float:
    """CPU seconds per receipt over `count` confirms, of the event loop's thread: it runs each
    receipt's transaction (the sync thread only waits for the disk). With `codes`, every
    third receipt carries the next one."""
    bodies = [receipt(n, members, codes.pop() if codes and n % 3 == 0 else None, card)
              for n in range(start, start + count)]
    cpu = time.thread_time()
    for body in bodies:
        status, answer = await receipt_ops.confirm(deps, body, REGISTER)
        assert status == 201, answer
    return (time.thread_time() - cpu) / count


async def manage(app, handler, path: dict, body) -> dict:
    """A manager's call through the handler an HTTP request would reach; its answer."""
    reply = await handler(app, SimpleNamespace(path=path, body=body))
    assert reply.status in (200, 201), reply.text
    return msgspec.json.decode(reply.body)


async def set_up_cvm(app, members: int, codes_needed: int) -> list[str]:
    """The staff list, the offer and the codes (program B serving); returns the codes."""
    cards = [f"card-{m}" for m in range(members)]
    await manage(app, cvm.put_segment_members, {"id": "staff"}, schema.SegmentCards(cards=cards[::3]))
    await manage(app, cvm.assign_offer, {}, schema.OfferAssignment(
        offer_id="bench-comeback", rule="comeback", cards=cards[::2], points=1_000_000,
        from_=date(2026, 11, 1), to=date(2026, 12, 31)))
    codes: list[str] = []
    while len(codes) < codes_needed:
        count = min(CODES_PER_REQUEST, codes_needed - len(codes))
        answer = await manage(app, cvm.create_coupons, {"campaign": "flyer"}, schema.CouponRequest(count=count))
        codes += answer["codes"]
    return codes


async def main(members: int, per_block: int, rounds: int) -> None:
    folder = Path(tempfile.mkdtemp(prefix="cvm-bench-"))
    program_b = folder / "program"
    shutil.copytree(MARKET, program_b)
    (program_b / "campaigns" / "cvm.yaml").write_text(CVM_FILE)
    config = config_from_dict({"database": {"path": str(folder / "bench.db")},
                               "rules": {"dir": str(program_b), "watch": False},
                               "clock": {"start": "2026-11-24T12:00:05+02:00"}, "jobs": {"enabled": False},
                               "privacy": {"hmac_key": "bench-hmac-key-0123456789"}})
    app = create_app(config)
    async with _serving(app):
        deps, holder = app[OPS], app[PROGRAMS]
        b = holder.current
        files, _, problems = read_directory(MARKET)
        assert not problems, problems
        a = holder.compile(files)
        programs = {"A": a, "B": b}
        for m in range(members):
            await member_ops.enroll(deps, schema.Enrollment(card=f"card-{m}"), MANAGER)
        n = 0
        # Warm-up, one block of each: caches, both programs, and every member's first
        # receipt so the RFM job has something to score.
        for side in ("A", "B"):
            holder.current = programs[side]
            await block(deps, n, max(per_block, members), members, None)
            n += max(per_block, members)
        scored = await rfm.run(app[DATABASE], b.segment_window_days, b.timezone, app[CLOCK].now(), force=True,
                               program=b)
        codes = await set_up_cvm(app, members, rounds * per_block // 3 + 1)
        # Side "idle": program B for members enrolled after the set-up (in no segment, holding
        # no offer, sending no code): what B's reads cost when none of its rules pays.
        for m in range(members):
            await member_ops.enroll(deps, schema.Enrollment(card=f"idle-{m}"), MANAGER)
        programs["idle"] = b
        holder.current = b
        await block(deps, n, members, members, None, "idle")
        n += members
        sides: dict[str, list[float]] = {"A": [], "B": [], "idle": []}
        for _ in range(rounds):
            for side in sides:
                # What each request reads to take the serving program (no reload: both
                # programs stay compiled, and the switch costs nothing inside a block).
                holder.current = programs[side]
                sides[side].append(await block(deps, n, per_block, members, codes if side == "B" else None,
                                               "idle" if side == "idle" else "card"))
                n += per_block
        holder.current = b
        used = await app[DATABASE].read(lambda conn: conn.execute("SELECT COUNT(*) FROM coupon_uses").fetchone()[0])
        by_rule = await app[DATABASE].read(lambda conn: dict(conn.execute(
            "SELECT rule_id, COUNT(*) FROM posting_rules WHERE rule_id IN "
            "('staff-bonus', 'big-spender-bonus', 'comeback', 'flyer-coupon') GROUP BY rule_id").fetchall()))
    report(sides, scored.scored if scored else 0, by_rule, used, per_block)
    shutil.rmtree(folder)


def report(sides: dict[str, list[float]], scored: int, by_rule: dict, used: int, per_block: int) -> None:
    cost_a, cost_b, idle = (statistics.median(sides[s]) for s in ("A", "B", "idle"))
    print(f"RFM scored {scored} members; {len(sides['A'])} alternating rounds of {per_block} receipts per side")
    print(f"B's rules fired (their rows in posting_rules): {by_rule}; coupon uses: {used}")
    print("A blocks (us):", " ".join(f"{x * 1e6:.0f}" for x in sides["A"]))
    print("B blocks (us):", " ".join(f"{x * 1e6:.0f}" for x in sides["B"]))
    print("idle blocks (us):", " ".join(f"{x * 1e6:.0f}" for x in sides["idle"]))
    print(f"A market:            {cost_a * 1e6:.0f} us CPU/receipt (median)")
    print(f"B market + CVM:      {cost_b * 1e6:.0f} us CPU/receipt (median)")
    print(f"cost: {(cost_b - cost_a) * 1e6:.0f} us/receipt, {100 * (cost_b / cost_a - 1):.1f} % more CPU, "
          f"{100 * (1 - cost_a / cost_b):.1f} % fewer receipts/s at full load")
    print(f"B's reads alone (idle members): {idle * 1e6:.0f} us CPU/receipt, "
          f"{100 * (1 - cost_a / idle):.1f} % fewer receipts/s than A")
    per_round = [100 * (1 - x / y) for x, y in zip(sides["A"], sides["B"])]
    print("fewer receipts/s by round (%):", " ".join(f"{p:.1f}" for p in per_round))


class _serving:
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
    parser.add_argument("--members", type=int, default=300)
    parser.add_argument("--receipts", type=int, default=200, help="confirms per block")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    asyncio.run(main(args.members, args.receipts, args.rounds))
