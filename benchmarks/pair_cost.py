"""Instructions per load-driver receipt of the receipt's pure path, sides A, B and P of cvm_cost.py.

    PYTHONPATH=. python benchmarks/pair_cost.py [--tree DIR ...] [--sides A,B,P] [--by-function] [--hash]

What paying rules cost a receipt is mostly their work per (rule, line) pair, which the load
driver's receipts (20 lines on average) show and one-line ones do not. For each tree (default
this one; `git archive` copies of other revisions to compare) and side, a process of its own
runs under callgrind (PYTHONHASHSEED=0, gc disabled) twice, with 40 and 240 receipts after
loading the program and a warm-up; the difference over 200 is one receipt's: `plan_confirm`
(the evaluation included), `confirm_answer` and its JSON, the line records encoded and the
posting rows built, on a hand-built member state, no database and no clock. The receipts are
60 of cvm_cost.py's `bench_body` (the driver's catalogue and seed), their registers spelling
which of P's rules pay; for B the member's segment, offer and judged code make B's rules pay
on the same receipts. B has the `rfm` segment only (`--segment big-spenders`).

--by-function calls each Python function of the path through a C function of its own (a
small extension built here with the system's C compiler), so callgrind's inclusive count of
that C function is the Python function's; each wrapped call costs about 1 k instructions
more. --hash prints, without valgrind, a hash of the evaluations, plans, answers, line
records and posting rows of these receipts and of 400 more of the driver's (a seventh
redeeming from eight lots, a fifth with their lines shuffled): equal hashes, equal results.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import call_stages  # beside this script, which is run as one

ROOT = Path(__file__).resolve().parent.parent
FEW, MANY = 40, 240

# (module, function) wrapped by --by-function, in the order of their C functions.
FUNCTIONS = [("rules.evaluate", name) for name in (
    "evaluate", "_read_lines", "_fact", "_caps", "_passing", "_choose", "_exact_points", "_attribute", "_hand_out",
    "_fill", "_coupons_used")] + [("server.plan", name) for name in (
        "_accrue", "_customer_value", "recorded_facts", "member_balance", "coupon_statuses", "build",
        "plan_confirm")] + [("server.answer", "confirm_answer"), ("server.answer", "messages"),
                            ("storage.apply", "_postings"), ("storage.line_records", "encode")]

# Runs inside the measured tree: argv = side, receipts, mode (count | by-function | hash), extension folder.
CHILD = r"""
import gc, hashlib, random, sys
from pathlib import Path
gc.disable()
side, count, mode, ext = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
from benchmarks import cvm_cost as cc, receipts as driver
from datetime import datetime
from rules import MemberFacts
from rules.loader import load_files, read_directory
from server import schema
import server.plan, server.answer, storage.apply, storage.line_records, rules.evaluate, rules.program
from server.ops import JSON
from storage.coupons import Judged
from storage.ledger import Lot, LotTotals, MemberRow
from storage.offers import OfferRow

NOW = datetime.fromisoformat(cc.CLOCK_START)
files, _, problems = read_directory(Path("rules/programs/market"))
assert not problems, problems
if side == "P":
    files["campaigns/plain.yaml"] = cc.plain_file(("big-spenders",)).encode()
elif side == "B":
    files["campaigns/cvm.yaml"] = cc.cvm_file(("big-spenders",)).encode()
program = load_files(files, NOW)

def bits(k):    # staff, offer, rfm segment, code: as often as cvm_cost.py's members have them
    return k % 3 == 0, k % 2 == 0, k % 5 < 3, k % 3 == 0

def state(k, lots=None):
    _, offer, big, coded = bits(k)
    member = MemberRow(k, None, None, "[]", None, "2025-01-01T00:00:00.000000Z", None, None)
    b = side == "B"
    facts = MemberFacts(member_id=f"m_{k}", tier=("base", "silver", "gold")[k % 3], receipt_number=k % 4 + 2,
                        segments=frozenset({"big-spenders"}) if b and big else frozenset(),
                        offers={"comeback": 900_000} if b and offer else {},
                        coupons={"flyer": f"CODE-{k}"} if b and coded else {})
    judged = Judged([(f"CODE-{k}", "usable")], {"flyer": (f"CODE-{k}", f"h{k}")}, ["flyer"]) if b and coded else None
    rows = [OfferRow("o1", "comeback", 1_000_000, 100_000, "2026-12-31")] if facts.offers else []
    return server.plan.MemberState(member, facts, lots, [], {"big-basket": k % 2}, None, False, coupons=judged,
                                   offer_rows=rows, lot_totals=None if lots else LotTotals(5_000, 100, 0))

def receipt(k, body=None):
    staff, offer, big, coded = bits(k)
    if body is None:
        return schema.decode(cc.bench_body(k, k, 60, f"CODE-{k}" if coded else None, "card",
                                           cc.register((staff, offer, big, coded))), schema.Receipt)
    body.update(receipt_id=f"x{k}", card=f"card-{k}", register_id=cc.register((staff, offer, big, coded)))
    if coded:
        body["coupons"] = [f"CODE-{k}"]
    return schema.decode(cc.BENCH_ENCODER.encode(body), schema.Receipt)

receipts, states = [receipt(k) for k in range(60)], [state(k) for k in range(60)]

if mode == "by-function":
    sys.path.insert(0, ext)
    import pair_cost_stages
    for i, (module, name) in enumerate(FUNCTIONS):
        owner, through = sys.modules[module], getattr(pair_cost_stages, "s%02d" % i)
        wrapped = (lambda f, s: lambda *a, **k: s(f, *a, **k))(getattr(owner, name), through)
        setattr(owner, name, wrapped)
        if (module, name) == ("rules.evaluate", "evaluate"):
            rules.program.evaluate = wrapped
    encode = (lambda e, s: lambda x: s(e, x))(JSON.encode, getattr(pair_cost_stages, "s%02d" % len(FUNCTIONS)))
else:
    encode = JSON.encode

def one(r, s):
    plan = server.plan.plan_confirm(r, s, program, NOW)
    answer = encode(server.answer.confirm_answer(plan, program))
    lines = storage.line_records.encode(storage.line_records.with_lots(
        plan.lines, {rule: 1000 + at for rule, at in plan.lines.lots.items()}))
    rows = storage.apply._postings(storage.apply.Confirmed(plan, r, program, NOW, b"", b"", answer),
                                   [1000 + i for i in range(len(plan.lots))])
    return plan, answer, lines, rows

if mode == "hash":
    digest = hashlib.sha256()
    def add(r, s):
        try:
            plan, answer, lines, rows = one(r, s)
        except Exception as e:      # a refusal is a result too
            digest.update(repr(e).encode())
            return
        for part in (answer, lines, repr(rows).encode(), repr(plan).encode()):
            digest.update(part)
    for k in range(60):
        add(receipts[k], states[k])
    for k in range(400):
        rng = random.Random(k)
        kind = "r" if k % 7 == 0 else "m"
        body = driver.receipt(rng, cc.BENCH_ITEMS, kind, NOW)
        if k % 5 == 0:
            rng.shuffle(body["lines"])
        lots = [Lot(i + 1, f"2026-{i % 12 + 1:02d}-05", None if i % 4 == 3 else f"2027-{i % 12 + 1:02d}-05",
                    100 + 37 * i) for i in range(8)] if kind == "r" else None
        add(receipt(k, body), state(k % 60, lots))
    print(digest.hexdigest())
    sys.exit()
for i in range(120):    # the warm-up: the matcher's cache holds every answer measured
    one(receipts[i % 60], states[i % 60])
for i in range(count):
    one(receipts[i % 60], states[i % 60])
"""


def extension(folder: Path) -> None:
    """pair_cost_stages: s00, s01, ... (benchmarks/call_stages.py)."""
    call_stages.build(folder, "pair_cost_stages", len(FUNCTIONS) + 1, 2)


def child(tree: Path, side: str, count: int, mode: str, ext: Path, out: Path | None) -> str:
    code = f"FUNCTIONS = {FUNCTIONS!r}\n" + CHILD
    argv = [sys.executable, "-c", code, side, str(count), mode, str(ext)]
    if out is not None:
        argv = ["valgrind", "--tool=callgrind", "--dump-instr=no", "--cache-sim=no", "--branch-sim=no",
                f"--callgrind-out-file={out}", *argv]
    done = subprocess.run(argv, cwd=tree, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"})
    if done.returncode != 0:
        raise SystemExit(f"{tree} {side} {count} failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip()


def inclusive(out: Path) -> dict[str, int]:
    """'total' and stageNN -> inclusive instructions, from callgrind_annotate."""
    text = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(out)],
                          capture_output=True, text=True, check=True).stdout
    found = {"total": int(re.search(r"^\s*([\d,]+) .*PROGRAM TOTALS", text, re.M).group(1).replace(",", ""))}
    for count, stage in re.findall(r"^\s*([\d,]+) .*:stage(\d+) ", text, re.M):
        found[stage] = int(count.replace(",", ""))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, action="append", help="a source tree to measure (default: this one)")
    parser.add_argument("--sides", default="A,B,P")
    parser.add_argument("--by-function", action="store_true", help="each function's inclusive count as well")
    parser.add_argument("--hash", action="store_true", help="the results' hash per side, no valgrind")
    args = parser.parse_args()
    trees, sides = [t.resolve() for t in args.tree or [ROOT]], args.sides.split(",")
    with tempfile.TemporaryDirectory(prefix="pair-cost-") as folder:
        ext = Path(folder)
        if args.hash:
            for tree in trees:
                for side in sides:
                    print(tree, side, child(tree, side, 0, "hash", ext, None))
            return
        if args.by_function:
            extension(ext)
        mode = "by-function" if args.by_function else "count"
        names = [f"{module}.{name}" for module, name in FUNCTIONS] + ["the answer's JSON"]
        for tree in trees:
            for side in sides:
                runs = []
                for count in (FEW, MANY):
                    out = ext / f"{side}-{count}.out"
                    child(tree, side, count, mode, ext, out)
                    runs.append(inclusive(out))
                per = {key: (runs[1][key] - runs[0].get(key, 0)) / (MANY - FEW) for key in runs[1]}
                print(f"{tree} {side}: {per['total']:,.0f} instructions per receipt")
                for key in sorted((k for k in per if k != "total"), key=lambda k: -per[k]):
                    print(f"    {per[key]:12,.0f}  {names[int(key)]}")


if __name__ == "__main__":
    main()
