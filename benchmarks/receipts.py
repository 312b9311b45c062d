"""Realistic receipt bodies for the load driver (benchmarks/load.lua).

    PYTHONPATH=. python benchmarks/receipts.py OUT_FILE [--count 2000] [--seed 5]

Each output line is ``KIND|JSON``: the JSON is a receipt as the API takes it, with
``@RID@`` where the driver puts a unique receipt id and ``@CARD@`` where it puts a card.
KIND says what the receipt is for:

- ``m`` a member's purchase (the driver picks an enrolled card at random),
- ``r`` the same with ``redeem_points`` (paid partly with points),
- ``u`` a card that is not enrolled (the server answers 422 unknown_card),
- ``a`` no card at all (stored for statistics, earns nothing).

Receipts have 20 lines on average (5 to 35) drawn from one catalogue of SKUs with
fixed categories, brands and prices: the market program's categories (dairy, which its
November promotion doubles; tobacco, which never earns; alcohol, which points cannot
pay for; fuel, which earns per litre at the partner station F001) and everyday ones.
Times spread over the 12 hours before generation, so weekday mornings (the `morning`
rule) occur; totals spread across 1,000.00 so `big-basket` fires for some.
"""
from __future__ import annotations

import argparse
import random
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import msgspec

KYIV = timezone(timedelta(hours=2))
SHARES = {"m": 0.90, "r": 0.03, "u": 0.05, "a": 0.02}
REDEEM_POINTS = (10, 20, 30, 50)

# category: (weight, price range in kopecks, sold by weight)
CATEGORIES = {
    "dairy": (14, (2_500, 12_000), False),
    "bakery": (10, (1_500, 6_000), False),
    "grocery": (18, (2_000, 20_000), False),
    "produce": (14, (2_000, 9_000), True),
    "meat": (8, (12_000, 45_000), True),
    "drinks": (10, (1_500, 9_000), False),
    "snacks": (8, (1_500, 8_000), False),
    "household": (7, (4_000, 30_000), False),
    "alcohol": (5, (9_000, 90_000), False),
    "tobacco": (3, (8_000, 12_000), False),
    "electronics": (1, (50_000, 400_000), False),
}
BRANDS = ["Milky", "Ferma", "Zlagoda", "Galicia", "Yagotynske", "Roshen", "Obolon", "Nemiroff", "Biola", None]


class Line(msgspec.Struct, omit_defaults=True):
    line_no: int
    sku: str
    category: str
    qty: Decimal
    price: int
    amount: int
    brand: str | None = None
    flags: list[str] = []


def catalogue(rng: random.Random, size: int = 5_000) -> list[tuple[str, str, str | None, int, bool]]:
    names = list(CATEGORIES)
    weights = [CATEGORIES[c][0] for c in names]
    items = []
    for n in range(size):
        category = rng.choices(names, weights)[0]
        low, high = CATEGORIES[category][1]
        items.append((f"482{n:010d}", category, rng.choice(BRANDS), rng.randrange(low, high), CATEGORIES[category][2]))
    return items


def receipt(rng: random.Random, items, kind: str, now: datetime) -> dict:
    store = rng.choices(["S001", "S002", "F001"], [45, 45, 10])[0]
    count = rng.randint(5, 35)
    lines = []
    for line_no in range(1, count + 1):
        sku, category, brand, price, by_weight = rng.choice(items)
        if store == "F001" and line_no == 1:
            sku, category, brand, price, by_weight = "4820000999999", "fuel", None, 5_499, True
        if line_no == 1:  # the driver returns one unit of line 1 now and then
            qty = Decimal(rng.choice((1, 1, 1, 2, 3))) if category != "fuel" else Decimal(rng.randrange(10, 50))
        elif by_weight:
            qty = Decimal(rng.randrange(200, 2_500)) / 1000
        else:
            qty = Decimal(rng.choice((1, 1, 1, 1, 2, 2, 3, 6)))
        amount = int((price * qty).to_integral_value())
        flags = ["no_loyalty"] if rng.random() < 0.01 else []
        lines.append(Line(line_no, sku, category, qty, price, amount, brand, flags))
    ts = (now - timedelta(seconds=rng.randrange(60, 12 * 3600))).astimezone(KYIV).replace(microsecond=0)
    body = {"receipt_id": "@RID@", "store_id": store, "register_id": f"K{rng.randrange(1, 13):02d}",
            "ts": ts.isoformat(), "channel": "pos", "lines": lines, "total": sum(line.amount for line in lines),
            "redeem_points": rng.choice(REDEEM_POINTS) if kind == "r" else 0}
    if kind != "a":
        body["card"] = "@CARD@"
    return body


def generate(path: Path, count: int = 2_000, seed: int = 5, now: datetime | None = None) -> dict[str, int]:
    rng = random.Random(seed)
    items = catalogue(rng)
    now = now or datetime.now(timezone.utc)
    kinds = list(SHARES)
    made = dict.fromkeys(kinds, 0)
    encoder = msgspec.json.Encoder(decimal_format="number")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        for _ in range(count):
            kind = rng.choices(kinds, [SHARES[k] for k in kinds])[0]
            made[kind] += 1
            out.write(kind.encode() + b"|" + encoder.encode(receipt(rng, items, kind, now)) + b"\n")
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    print(generate(args.out, args.count, args.seed))


if __name__ == "__main__":
    main()
