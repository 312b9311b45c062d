"""What decoding a request body costs: a valid 20-line receipt (the receipt path), and refused
ones (a receipt with three problems, a 2,000-line receipt with a problem on every line, 1 MiB
bodies of 7,400 lines, over the limit of 2,000, broken or not).

    PYTHONPATH=. python benchmarks/decode.py [--rounds 7] [--seconds 0.5]

Prints microseconds per decode, the best of `rounds` rounds of about `seconds` each (the best
is the least disturbed by other processes). To compare revisions, run it with PYTHONPATH set
to a `git archive` of each, alternately.
"""
from __future__ import annotations

import argparse
import json
import time

from server import schema


def line(no: int, qty="1.5") -> dict:
    return {"line_no": no, "sku": f"48200000{no:05d}", "category": "dairy", "brand": "Milky",
            "qty": qty, "price": 4550, "amount": 6825, "flags": []}


def receipt(lines: list[dict]) -> dict:
    return {"receipt_id": "000123", "store_id": "S001", "register_id": "K01",
            "ts": "2026-11-24T12:00:00+02:00", "card": "7000000000001", "lines": lines,
            "total": sum(x["amount"] for x in lines), "redeem_points": 0}


def bodies() -> dict[str, bytes]:
    valid = receipt([line(i) for i in range(1, 21)])
    three = json.loads(json.dumps(valid))
    three["store_id"], three["lines"][1]["qty"] = "", "two"
    del three["lines"][2]["sku"]
    return {"valid, 20 lines": json.dumps(valid).encode(),
            "3 problems, 20 lines": json.dumps(three).encode(),
            "2,000 problems, 2,000 lines": json.dumps(receipt([line(i, qty="x") for i in range(1, 2001)])).encode(),
            "7,400 broken lines": json.dumps(receipt([line(i, qty="x") for i in range(1, 7401)])).encode(),
            "7,400 lines": json.dumps(receipt([line(i) for i in range(1, 7401)])).encode()}


def per_decode_us(body: bytes, seconds: float) -> float:
    def once() -> None:
        try:
            schema.decode(body, schema.Receipt)
        except Exception:       # a refused body: its answer is what is measured
            pass
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(50):
            once()
        n += 50
    return elapsed / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.5)
    args = parser.parse_args()
    for name, body in bodies().items():
        best = min(per_decode_us(body, args.seconds) for _ in range(args.rounds))
        print(f"{name:<28} {len(body):>8} bytes {best:>10.1f} us")


if __name__ == "__main__":
    main()
