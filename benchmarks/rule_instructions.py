"""Instructions per receipt of the rules' evaluation and the confirm's plan, programs A and P of cvm_cost.py.

    PYTHONPATH=. python benchmarks/rule_instructions.py [--tree DIR ...] [--receipts 1000] [--evaluate-only]

CPU time per receipt moves by 20 % from run to run on a shared machine; instructions counted
by callgrind (valgrind) do not. For each tree (default: this one; several to compare
revisions, e.g. `git archive` copies) and each side, a process of its own runs twice under
callgrind, with 100 and 100 + --receipts receipts after loading its program and a warm-up;
the difference over --receipts is one receipt's: Program.evaluate plus server/plan.py's
plan_confirm (--evaluate-only: evaluate alone) on a hand-built member state, no database
and no clock. Side A is rules/programs/market, P the same plus cvm_cost.py's four plain
rules; the receipts are cvm_cost.py's (one dairy line, the register id spelling which of
P's rules pay: two of four on average) for a member with 8 lots, redeeming nothing. P − A
is what the four rules add to evaluation and plan.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import confirm_cpu  # noqa: E402
from benchmarks.cvm_cost import plain_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECEIPTS_BEFORE = 100   # the first run's; the second adds --receipts

# Runs inside the measured tree: argv = side, receipts, evaluate-only (0/1), P's extra file.
CHILD = r"""
import sys
from datetime import datetime, timezone
from pathlib import Path
from rules import MemberFacts
from rules.loader import load_files, read_directory
from server import schema
from server.plan import MemberState, plan_confirm
from storage.ledger import Hold, Lot, MemberRow

side, count, evaluate_only, extra = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
NOW = datetime(2026, 11, 24, 10, 0, 5, tzinfo=timezone.utc)
files, _, problems = read_directory(Path("rules/programs/market"))
assert not problems, problems
if side == "P":
    files["campaigns/plain.yaml"] = Path(extra).read_bytes()
program = load_files(files, NOW)

def receipt(k):
    amount = 1_000 + (k * 7919) % 150_000
    register = "K" + "".join("1" if k >> bit & 1 else "0" for bit in range(4))
    return schema.decode(
        f'{{"receipt_id": "b{k}", "store_id": "S001", "register_id": "{register}",'
        f' "ts": "2026-11-24T12:00:00+02:00", "card": "card", "lines": [{{"line_no": 1, "sku": "x",'
        f' "category": "dairy", "qty": 1, "price": {amount}, "amount": {amount}}}], "total": {amount}}}'.encode(),
        schema.Receipt)

def state(m):
    member = MemberRow(m, None, None, "[]", None, "2025-01-01T00:00:00.000000Z", None, None)
    facts = MemberFacts(member_id=f"m_{m}", tier=("base", "silver", "gold")[m % 3], receipt_number=m % 4 + 1)
    lots = [Lot(i + 1, f"2026-{i % 12 + 1:02d}-05", None if i % 4 == 3 else f"2027-{i % 12 + 1:02d}-05", 100 + 37 * i)
            for i in range(8)]
    holds = [Hold(("S001", "K0000", "other"), 20, "2026-11-24T11:00:00.000000Z")]
    return MemberState(member, facts, lots, holds, {"big-basket": m % 2}, None, False)

# Every register id, and members of every tier, receipt number and limit use.
receipts, states = [receipt(k) for k in range(16)], [state(m) for m in range(12)]

def run(n):
    for i in range(n):
        r, s = receipts[i % 16], states[i % 12]
        if evaluate_only:
            program.evaluate(r, s.facts, 0, 0, s.usage, None)
        else:
            plan_confirm(r, s, program, NOW)

run(16 * 12)    # the warm-up: every pair once, so the matcher's cache holds every answer measured
run(count)
"""


def instructions(tree: Path, side: str, receipts: int, evaluate_only: bool, extra: Path) -> float:
    totals = [confirm_cpu.callgrind_total(tree, [sys.executable, "-c", CHILD, side, str(count),
                                                 "1" if evaluate_only else "0", str(extra)])
              for count in (RECEIPTS_BEFORE, RECEIPTS_BEFORE + receipts)]
    return (totals[1] - totals[0]) / receipts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, action="append", help="a source tree to measure (default: this one)")
    parser.add_argument("--receipts", type=int, default=1000)
    parser.add_argument("--evaluate-only", action="store_true", help="Program.evaluate without the plan")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        extra = Path(folder) / "plain.yaml"
        extra.write_text(plain_file())
        for tree in args.tree or [ROOT]:
            a, p = (instructions(tree.resolve(), side, args.receipts, args.evaluate_only, extra) for side in "AP")
            print(f"{tree}: A {a:,.0f}  P {p:,.0f}  P - A {p - a:,.0f} instructions/receipt", flush=True)


if __name__ == "__main__":
    main()
