"""Time a confirm's answer: built from its plan (server/answer.py confirm_answer) and encoded
as the server encodes it, per call, on a 20-line receipt of a member with points.

Run from a checkout: `PYTHONPATH=. .venv/bin/python benchmarks/answer_encoding.py`; run it in
two checkouts to compare revisions (the plan and the program are built the same way in both)."""
from __future__ import annotations

import statistics
import time
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path

import msgspec

from rules import MemberFacts, load_program
from server.answer import confirm_answer
from server.plan import MemberState, plan_confirm
from server.schema import Line, Receipt
from storage.ledger import Lot, MemberRow

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime.fromisoformat("2026-11-24T12:00:05+02:00")
CALLS, ROUNDS = 20_000, 7


def plan(program):
    categories = ["dairy", "bakery", "grocery", "alcohol", "produce"]
    lines = [Line(line_no=n + 1, sku=f"sku-{n}", qty=Decimal("1.5"), price=3000 + n, amount=4500 + n,
                  category=categories[n % len(categories)]) for n in range(20)]
    receipt = Receipt(receipt_id="R-1", store_id="S001", register_id="K01",
                      ts=datetime.fromisoformat("2026-11-24T12:00:00+02:00"), lines=lines,
                      total=sum(line.amount for line in lines), card="hmac", redeem_points=50)
    member = MemberRow(7, None, None, "[]", None, "2026-01-01T00:00:00.000000Z", None, None)
    facts = MemberFacts(member_id="m_7", tier="base", enrolled_on=date(2026, 1, 1), receipt_number=2)
    state = MemberState(member, facts, [Lot(1, "2026-01-01", "2027-06-01", 300)], [], {}, None, False)
    return plan_confirm(receipt, state, program, NOW)


def main() -> None:
    program = load_program(ROOT / "tests" / "programs" / "market")
    planned, encode = plan(program), msgspec.json.Encoder().encode
    body = encode(confirm_answer(planned, program))
    per_call = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(CALLS):
            encode(confirm_answer(planned, program))
        per_call.append((time.perf_counter() - started) / CALLS * 1e6)
    print(f"confirm answer, built and encoded: {len(body)} bytes, median {statistics.median(per_call):.2f} us, "
          f"best {min(per_call):.2f} us per call ({ROUNDS} rounds of {CALLS:,})")
    program.close()


if __name__ == "__main__":
    main()
