"""A generated program of N rules (300 by default) with the market program's settings.

    PYTHONPATH=. python benchmarks/gen_rules.py OUT_DIR [--rules 300] [--today 2026-11-23]

The settings file is copied from rules/programs/market/program.yaml; the rules are what a
large retailer's marketing calendar looks like: the everyday tier group, category and
brand promotions (percent, extra points per amount, double base points), SKU promotions
per unit, basket thresholds with daily limits, store, weekday and morning offers, tier
extras and a first-purchase bonus. About a quarter of the dated promotions run on `today`, the
rest are over or not started yet, so the engine sees them but they do not fire.
"""
from __future__ import annotations

import argparse
import random
import shutil
from datetime import date, timedelta
from pathlib import Path

import yaml

MARKET = Path(__file__).resolve().parent.parent / "rules" / "programs" / "market"
CATEGORIES = ["dairy", "bakery", "grocery", "produce", "meat", "drinks", "snacks", "household", "alcohol",
              "electronics"]
BRANDS = ["Milky", "Ferma", "Zlagoda", "Galicia", "Yagotynske", "Roshen", "Obolon", "Nemiroff", "Biola"]
WEEKDAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def period(rng: random.Random, today: date) -> dict:
    start = today + timedelta(days=rng.randrange(-60, 30))
    end = start + timedelta(days=rng.randrange(3, 22))
    return {"from": start.isoformat(), "to": end.isoformat()}


def make_rules(count: int, today: date, seed: int = 3) -> list[dict]:
    rng = random.Random(seed)
    rules: list[dict] = [
        {"id": "base", "group": "base", "reward": {"percent": 2}},
        {"id": "base-silver", "group": "base", "priority": 10, "when": {"tier": "silver"}, "reward": {"percent": 3}},
        {"id": "base-gold", "group": "base", "priority": 20, "when": {"tier": "gold"}, "reward": {"percent": 5}},
    ]
    makers = ["category", "brand", "double", "sku", "basket", "store", "weekday", "morning", "tier", "first"]
    n = 0
    while len(rules) < count:
        kind = makers[n % len(makers)]
        n += 1
        rule: dict = {"id": f"{kind}-{n}"}
        if kind == "category":
            rule.update(period=period(rng, today),
                        scope={"categories": [rng.choice(CATEGORIES)], "brands": [rng.choice(BRANDS)]},
                        reward={"percent": rng.choice([1, 2, 3, 5])})
        elif kind == "brand":
            rule.update(period=period(rng, today),
                        scope={"brands": [rng.choice(BRANDS)], "categories": [rng.choice(CATEGORIES)]},
                        reward={"per_amount": {"every": rng.choice([5000, 10000, 20000]), "points": rng.randint(1, 5)}})
        elif kind == "double":
            rule.update(period=period(rng, today), scope={"categories": [rng.choice(CATEGORIES)]},
                        reward={"multiply": "base", "by": rng.choice([2, 3])})
        elif kind == "sku":
            skus = [f"482{rng.randrange(5000):010d}" for _ in range(rng.randint(3, 12))]
            rule.update(period=period(rng, today), scope={"skus": skus}, reward={"per_unit": rng.randint(1, 10)})
        elif kind == "basket":
            rule.update(when={"total": {"gte": rng.choice([50000, 80000, 100000, 150000, 200000, 300000])}},
                        reward={"points": rng.choice([10, 20, 50, 100])},
                        limit={"per_member": {"count": 1, "per": rng.choice(["day", "week", "month"])}})
            rule["period"] = period(rng, today)
        elif kind == "store":
            rule.update(when={"store": rng.choice(["S001", "S002"])}, period=period(rng, today),
                        scope={"categories": [rng.choice(CATEGORIES)]}, reward={"percent": 1})
        elif kind == "weekday":
            rule.update(when={"weekdays": [rng.choice(WEEKDAYS)], "items": {"gte": rng.randint(10, 30)}},
                        scope={"categories": [rng.choice(CATEGORIES)]}, reward={"percent": 1})
        elif kind == "morning":
            start = rng.randint(6, 11)
            rule.update(when={"hours": f"{start:02d}:00-{start + 2:02d}:00",
                              "channel": "pos"}, period=period(rng, today),
                        scope={"categories": [rng.choice(CATEGORIES)]}, reward={"percent": 1})
        elif kind == "tier":
            rule.update(when={"tier": rng.choice(["silver", "gold"]), "total": {"gte": rng.choice([20000, 50000])}},
                        scope={"categories": [rng.choice(CATEGORIES)]}, reward={"percent": 1})
        elif kind == "first":
            rule.update(when={"receipt_number": 1, "store": rng.choice(["S001", "S002", "F001"])},
                        period=period(rng, today), reward={"points": rng.choice([20, 50])})
        rules.append(rule)
    return rules


def generate(out: Path, count: int = 300, today: date | None = None, seed: int = 3) -> Path:
    today = today or date.today()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copy(MARKET / "program.yaml", out / "program.yaml")
    (out / "campaigns").mkdir()
    rules = make_rules(count, today, seed)
    per_file = 50
    for start in range(0, len(rules), per_file):
        text = yaml.safe_dump({"rules": rules[start:start + per_file]}, sort_keys=False, width=120)
        (out / "campaigns" / f"generated-{start // per_file:02d}.yaml").write_text(text, encoding="utf-8")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rules", type=int, default=300)
    parser.add_argument("--today", type=date.fromisoformat, default=None)
    args = parser.parse_args()
    print(generate(args.out, args.rules, args.today))


if __name__ == "__main__":
    main()
