"""What rule matching and receipt arithmetic cost, for the shipped market program.

    PYTHONPATH=. python benchmarks/rules_engine.py [--receipts N]

Prints microseconds per receipt for: the durable-rules engine alone (every fact
asserted and retracted), the match cache in front of it, the same conditions in
plain Python, and a whole evaluate() of a 20-line receipt; then memory across
program reloads.
"""

from __future__ import annotations

import argparse
import pathlib
import random
import resource
import time
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from types import SimpleNamespace

from rules import MemberFacts, load_program
from rules.conditions import holds
from rules.evaluate import _fact

MARKET = pathlib.Path(__file__).resolve().parent.parent / "rules" / "programs" / "market"
KYIV = timezone(timedelta(hours=2))
CATEGORIES = ["dairy", "bakery", "grocery", "alcohol", "fuel", "tobacco", "electronics"]


def receipts(count: int, lines: int, seed: int = 7) -> list[SimpleNamespace]:
    rng = random.Random(seed)
    made = []
    start = datetime(2026, 11, 16, 6, 0, tzinfo=KYIV)
    for number in range(count):
        items = []
        for line_no in range(1, lines + 1):
            price = rng.randrange(500, 60000)
            qty = Decimal(rng.choice(["1", "2", "3", "0.75", "1.5"]))
            amount = int(price * qty)
            items.append(SimpleNamespace(
                line_no=line_no, sku=f"sku-{rng.randrange(5000)}", category=rng.choice(CATEGORIES),
                brand=None, qty=qty, price=price, amount=amount, flags=[],
            ))  # fmt: skip
        made.append(SimpleNamespace(
            store_id=rng.choice(["S001", "S002", "F001"]), register_id=f"K{rng.randrange(1, 9):02d}",
            channel="pos", ts=start + timedelta(minutes=rng.randrange(0, 60 * 24 * 14)),
            total=sum(item.amount for item in items), lines=items,
        ))  # fmt: skip
    return made


def members(count: int, seed: int = 11) -> list[MemberFacts]:
    rng = random.Random(seed)
    return [
        MemberFacts(member_id=f"m{n}", tier=rng.choice(["base", "silver", "gold"]), enrolled_on=date(2025, 1, 1),
                    receipt_number=rng.randrange(1, 50))  # fmt: skip
        for n in range(count)
    ]


def best_us(run, items: list, repeats: int = 5) -> float:
    """Fastest of several passes, in microseconds per item: shared machines are noisy."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for item in items:
            run(*item)
        best = min(best, (time.perf_counter() - started) / len(items) * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--receipts", type=int, default=3000)
    args = parser.parse_args()
    program = load_program(MARKET)
    sample = receipts(args.receipts, 20)
    people = members(len(sample))
    facts = []
    for receipt, member in zip(sample, people):
        local = receipt.ts.astimezone(program.timezone)
        facts.append((_fact(program, receipt, member, local, local.date()),))
    matcher = program.matcher
    print(f"market program: {len(program.rules)} rules, fact fields {matcher.fields}")
    print(f"engine only (assert + actions + retract): {best_us(matcher.ask_engine, facts):.1f} us/receipt")
    calls_before = matcher.engine_calls
    cached = best_us(matcher.match, facts)
    asked = (matcher.engine_calls - calls_before)
    print(f"with match cache: {cached:.1f} us/receipt (engine asked {asked} times in {5 * len(facts)} matches)")
    nodes = matcher.conditions
    plain = best_us(lambda fact: [holds(node, fact) for node in nodes], facts)
    print(f"same conditions as a plain Python tree walk: {plain:.1f} us/receipt")
    for size in (1, 5, 10, 20):
        sized = list(zip(receipts(args.receipts, size) if size != 20 else sample, people))
        took = best_us(lambda receipt, member: program.evaluate(receipt, member, 0, 0, {}), sized)
        print(f"evaluate, {size} lines: {took:.1f} us/receipt")
    pairs = list(zip(sample, people))
    took = best_us(lambda receipt, member: program.evaluate(receipt, member, 500, 100000, {}), pairs)
    print(f"evaluate, 20 lines, redeeming 500 points: {took:.1f} us/receipt")
    matcher._cache_entries = 0
    matcher._cache.clear()
    took = best_us(lambda receipt, member: program.evaluate(receipt, member, 0, 0, {}), pairs)
    print(f"evaluate, 20 lines, match cache off: {took:.1f} us/receipt")
    program.close()
    reloads()


def reloads(count: int = 300) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    for _ in range(count):
        load_program(MARKET).close()
    elapsed = (time.perf_counter() - started) / count * 1e3
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{count} reloads: {elapsed:.2f} ms each, max RSS {before} -> {after} KiB")


if __name__ == "__main__":
    main()
