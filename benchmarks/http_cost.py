"""Instructions of the event loop's thread per confirmed load-driver receipt over HTTP, by Python function.

    PYTHONPATH=. python benchmarks/http_cost.py [--tree DIR ...] [--connections 10] [--receipts 120]
    PYTHONPATH=. python benchmarks/http_cost.py --by-function [--tree DIR] [--calls-max 4]
    PYTHONPATH=. python benchmarks/http_cost.py --hash [--tree DIR ...]
    [any of them with --program B: cvm_cost.py's side B, `--segment big-spenders`]

The app is served as `loyalty serve` serves it (server/listen.py's runner and site, on uvloop,
no access log: the benchmarks run without one) with rules/programs/market, in a process of its
own per tree, which enrolls `--members` members in the process and sends the load driver's
receipts (benchmarks/receipts.py, through cvm_cost.py's `bench_body`) on `--connections`
keep-alive connections from threads of the same process: first every template once (the rules'
class cache holds what the counted ones need, as in a long run), then the counted ones. Under
callgrind (`--separate-threads=yes`, PYTHONHASHSEED=0, the polls on the loop once a minute or
less) each tree runs twice, with 30 and 30 + `--receipts` counted receipts; the difference of the
event loop thread's instructions over `--receipts` is one receipt's: HTTP parsing, aiohttp's
handler chain and middlewares, authentication, decoding, the idempotency digest, the member's
state read, the plan, the batch's SQL and COMMIT (run on the loop), the answer, metrics.

--by-function first profiles the counted receipts with cProfile (no valgrind) for the shape:
which functions of server/, storage/, rules/, aiohttp and prometheus_client the loop thread
calls, how often per receipt. Each one called at most `--calls-max` times a receipt (and taking
at least 0.2 % of the profile) is then called, under callgrind, through a C function of its
own for each place in the call tree it is reached from (a small extension built here, as
pair_cost.py's), so callgrind's inclusive count of that C function is the function's, there; a
coroutine is driven step by step through it (every resumption counted). Printed: the call tree
(inclusive, self = inclusive less the wrapped calls below it and what their wrappers cost), and
per function summed over its places. A plain run is counted beside the wrapped one: what a
wrapped call costs beyond its function (some 6 k on average, a coroutine's steps more than a
plain call) is their difference over the wrapped calls a receipt makes.

--program B serves cvm_cost.py's side B with its `rfm` segment (a segment, a personal offer, a
coupon campaign): every member's first two receipts, the RFM run, the offer for half of the
members and the codes set up before the warm-up; a fresh code on every third receipt and the
registers spelling which of B's rules pay, as cvm_cost.py sends them (`--hash` draws the codes
from a fixed seed, so that trees compare).

--hash prints, without valgrind, per tree a hash of each answer body and of every table's rows
after 300 receipts sent on one connection with the clock held still (so that the rows do not
depend on how requests fall into batches or on the wall clock; _sqlite_migrations, stamped by
the wall clock, and segments_generation, a random value, left out): equal hashes, equal results.
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
FEW = 30
STAGES = 3000

# Runs inside the measured tree. argv: mode (count | shape | by-function | hash), counted receipts,
# connections, members, folder (the extension; the shape's output).
CHILD = r'''
import asyncio, cProfile, functools, hashlib, http.client, inspect, json, pstats, sys
import tempfile, threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

mode, counted, connections, members, folder = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \
    Path(sys.argv[5])
FEW, STAGES, WARM = int(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8])
import uvloop
from benchmarks import cvm_cost as cc
from benchmarks.confirm_cpu import free_port
from server import schema
from server.app import create_app
from server.config import config_from_dict
from server.keys import OPS, DATABASE
from server.ops import members as member_ops

KEY = "bench-register"
work = Path(tempfile.mkdtemp(prefix="http-cost-"))
program_dir = "rules/programs/market"
if PROGRAM == "B":      # cvm_cost.py's side B with its `rfm` segment: a segment, a personal offer, a coupon
    import shutil
    program_dir = str(work / "program")
    shutil.copytree("rules/programs/market", program_dir)
    (Path(program_dir) / "campaigns" / "cvm.yaml").write_text(cc.cvm_file(("big-spenders",)))
port = free_port()
settings = {"server": {"host": "127.0.0.1", "port": port},
            "database": {"path": str(work / "bench.db")},
            "rules": {"dir": program_dir, "watch": False, "poll_interval_ms": 60_000},
            "clock": {"start": cc.CLOCK_START}, "jobs": {"enabled": False},
            "privacy": {"hmac_key": "bench-hmac-key-0123456789"},
            "events": {"poll_interval_seconds": 60},
            "limits": {"requests_per_second_per_key": 1_000_000, "burst": 10_000_000},
            "auth": {"keys_refresh_seconds": 300, "keys": [
                {"id": "bench", "sha256": hashlib.sha256(KEY.encode()).hexdigest(), "role": "register",
                 "stores": ["S001", "S002", "F001"]}]}}
config = config_from_dict(settings)
answers = {}

CODES, PAYING = [], None     # program B: the codes left to send, and by member which of B's rules pay

def bodies(prefix, count):
    if PAYING is None:
        return [(f"{prefix}{k}", cc.bench_body(f"{prefix}{k}", k, members, None, "card", "K01")) for k in range(count)]
    # As cvm_cost.py sends side B: a fresh code on every third receipt, the register spelling who pays.
    return [(f"{prefix}{k}", cc.bench_body(f"{prefix}{k}", k, members, CODES.pop() if k % 3 == 0 else None, "card",
                                           cc.register((*PAYING[k % members], k % 3 == 0)))) for k in range(count)]

def send(requests):
    def share_of(share):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
        for name, body in share:
            connection.request("POST", "/v1/receipts", body, {"Authorization": f"Bearer {KEY}",
                                                             "Content-Type": "application/json"})
            answer = connection.getresponse()
            text = answer.read()
            if answer.status != 201:
                raise RuntimeError(f"{name} answered {answer.status}: {text[:300]!r}")
            answers[name] = text
        connection.close()
    with ThreadPoolExecutor(connections) as pool:
        list(pool.map(share_of, [requests[at::connections] for at in range(connections)]))

# ---- by-function: each wrapped function through a C function of its own per place in the call tree
NODES, PARENT, LABEL, STACK, CALLS = {}, [None], ["(root)"], [0], [0]
LOOP = None

def node_of(label):
    key = (STACK[-1], label)
    i = NODES.get(key)
    if i is None:
        i = NODES[key] = len(PARENT)
        if i >= STAGES:
            raise SystemExit("more places in the call tree than C functions")
        PARENT.append(STACK[-1])
        LABEL.append(label)
        CALLS.append(0)
    CALLS[i] += 1
    return i

class Steps:
    __slots__ = ("coro", "label")
    def __init__(self, coro, label):
        self.coro, self.label = coro, label
    def __await__(self):
        coro = self.coro
        i = node_of(self.label)
        stage = STAGE_FUNCTIONS[i]
        value = error = None
        while True:
            STACK.append(i)
            try:
                yielded = stage(coro.send, value) if error is None else stage(coro.throw, error)
            except StopIteration as stop:
                return stop.value
            finally:
                STACK.pop()
            value = error = None
            try:
                value = yield yielded
            except BaseException as e:
                error = e

def wrapped(f, label):
    if inspect.iscoroutinefunction(f):
        @functools.wraps(f)
        async def through(*a, **k):
            if threading.get_ident() != LOOP:
                return await f(*a, **k)
            return await Steps(f(*a, **k), label)
    else:
        @functools.wraps(f)
        def through(*a, **k):
            if threading.get_ident() != LOOP:
                return f(*a, **k)
            i = node_of(label)
            STACK.append(i)
            try:
                return STAGE_FUNCTIONS[i](f, *a, **k)
            finally:
                STACK.pop()
    through.__wrapped_by_cost__ = True
    return through

SCANNED = ("server", "storage", "rules", "aiohttp", "prometheus_client")

def scanned_modules():
    return [m for name, m in list(sys.modules.items())
            if m is not None and name.split(".")[0] in SCANNED and hasattr(m, "__dict__")]

def functions():
    """(code key, function, [(namespace dict or class, name, kind)]) of every plain function
    reachable as a module global or a class attribute of the scanned modules."""
    found = {}
    for module in scanned_modules():
        spaces = [(module.__dict__, None)]
        for value in list(module.__dict__.values()):
            if isinstance(value, type) and getattr(value, "__module__", "").split(".")[0] in SCANNED:
                spaces.append((value.__dict__, value))
        for space, owner in spaces:
            for name, value in list(space.items()):
                kind, f = "plain", value
                if isinstance(value, staticmethod):
                    kind, f = "static", value.__func__
                elif isinstance(value, classmethod):
                    kind, f = "class", value.__func__
                if not inspect.isfunction(f) or inspect.isgeneratorfunction(f) or inspect.isasyncgenfunction(f):
                    continue
                code = f.__code__
                key = (code.co_filename, code.co_firstlineno, code.co_name)
                entry = found.setdefault(key, (f, []))
                if entry[0] is f:
                    entry[1].append((module if owner is None else owner, name, kind))
    return found

def install(keys):
    found = functions()
    for key in keys:
        if key not in found:
            continue
        f, places = found[key]
        label = f"{f.__module__}.{f.__qualname__}"
        through = wrapped(f, label)
        for owner, name, kind in places:
            setattr(owner, name, through if kind == "plain" else staticmethod(through) if kind == "static"
                    else classmethod(through))
    # Closures the scan cannot reach: each route's handler, each confirm's plan.
    import server.routes, storage.db
    bind = server.routes.bind
    def bind_through(route):
        handle = bind(route)
        w = wrapped(handle, "server.routes.bind.<locals>.handle")
        w.route = handle.route
        return w
    server.routes.bind = bind_through
    init = storage.db.Grouped.__init__
    def grouped_init(self, plan, apply):
        init(self, wrapped(plan, f"{plan.__module__}.{plan.__qualname__}"), apply)
    storage.db.Grouped.__init__ = grouped_init

async def main():
    global LOOP
    LOOP = threading.get_ident()
    if mode == "hash":
        import server.clock
        still = datetime.fromisoformat(cc.CLOCK_START).astimezone(timezone.utc)
        server.clock.Clock.now = lambda self: still
        if PROGRAM == "B":      # the codes drawn alike in every tree
            import random, storage.coupons
            drawn = random.Random(7)
            storage.coupons.new_code = lambda: "".join(drawn.choice(storage.coupons.ALPHABET)
                                                       for _ in range(storage.coupons.CODE_CHARS))
    if mode == "by-function":
        install([tuple(k) for k in json.loads((folder / "shape.json").read_text())])
    app = create_app(config)
    if mode == "by-function":
        app._middlewares = type(app._middlewares)(
            m if getattr(m, "__wrapped_by_cost__", False) else wrapped(m, f"{m.__module__}.{m.__qualname__}")
            for m in app._middlewares)
    async with cc.listening(app, config):
        deps = app[OPS]
        for m in range(members):
            await member_ops.enroll(deps, schema.Enrollment(card=f"card-{m}"), cc.MANAGER)
        loop = asyncio.get_running_loop()
        if PROGRAM == "B":      # every member's first receipts, for the RFM run to score; then the offer, the codes
            global PAYING
            from server import rfm
            from server.keys import CLOCK, PROGRAMS
            await loop.run_in_executor(None, send, bodies("s", 2 * members))
            program = app[PROGRAMS].current
            await rfm.run(app[DATABASE], program.segment_window_days, program.timezone, app[CLOCK].now(),
                          force=True, program=program)
            total = WARM + (FEW + counted if mode == "hash" else counted)
            CODES.extend(await cc.set_up_cvm(app, members, total // 3 + 2, ("big-spenders",)))
            PAYING = await cc.who_pays(app, members)
        warm, measured = bodies("w", WARM), bodies("b", FEW + counted if mode == "hash" else counted)
        await loop.run_in_executor(None, send, warm)
        profiler = cProfile.Profile() if mode == "shape" else None
        if profiler:
            profiler.enable()
        await loop.run_in_executor(None, send, measured)
        if profiler:
            profiler.disable()
            stats = pstats.Stats(profiler).stats
            total = sum(tt for (cc_, nc, tt, ct, callers) in stats.values())
            keep = [list(k) for k, (cc_, nc, tt, ct, callers) in stats.items()
                    if nc <= CALLS_MAX * counted and ct >= SHARE_MIN * total]
            (folder / "shape.json").write_text(json.dumps(keep))
            print(len(keep), "functions to wrap")
        if mode == "hash":
            digest = hashlib.sha256()
            for name, _ in measured:
                digest.update(answers[name])
            print("answers", digest.hexdigest())
            tables = await app[DATABASE].read(lambda conn: [r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")])
            # _sqlite_migrations is applied at the wall clock; segments_generation is a random value
            for table in (t for t in tables if t not in ("_sqlite_migrations", "segments_generation")):
                rows = sorted(repr(tuple(r)) for r in await app[DATABASE].read(
                    lambda conn: conn.execute(f"SELECT * FROM {table}").fetchall()))
                print(table, len(rows), hashlib.sha256(repr(rows).encode()).hexdigest()[:16])
    if mode == "by-function":
        (folder / f"tree-{counted}.json").write_text(json.dumps({"parent": PARENT, "label": LABEL, "calls": CALLS}))

if mode == "by-function":
    sys.path.insert(0, str(folder))
    import http_cost_stages
    STAGE_FUNCTIONS = [getattr(http_cost_stages, "s%04d" % i) for i in range(STAGES)]
uvloop.run(main())
'''


def extension(folder: Path) -> None:
    """http_cost_stages: s0000, s0001, ... (benchmarks/call_stages.py)."""
    call_stages.build(folder, "http_cost_stages", STAGES, 4)


def child(tree: Path, mode: str, counted: int, connections: int, members: int, folder: Path,
          out: Path | None = None, calls_max: int = 4, warm: int = 0, share_min: float = 0.002,
          program: str = "A") -> str:
    """warm: receipts sent before the counted ones (the same in both runs of a count)."""
    code = f"CALLS_MAX = {calls_max}\nSHARE_MIN = {share_min}\nPROGRAM = {program!r}\n" + CHILD
    argv = [sys.executable, "-c", code, mode, str(counted), str(connections), str(members), str(folder), str(FEW),
            str(STAGES), str(warm)]
    if out is not None:
        argv = ["valgrind", "--tool=callgrind", "--dump-instr=no", "--cache-sim=no", "--branch-sim=no",
                "--separate-threads=yes", f"--callgrind-out-file={out}", *argv]
    done = subprocess.run(argv, cwd=tree, capture_output=True, text=True, timeout=7200,
                          env={**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"})
    if done.returncode != 0:
        raise SystemExit(f"{tree} {mode} {counted} failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip()


def loop_total(out: Path) -> int:
    """The event loop thread's instructions (the main thread's file, -01)."""
    return int(re.search(r"^summary: (\d+)$", Path(f"{out}-01").read_text(), re.M).group(1))


def stage_costs(out: Path) -> dict[int, int]:
    """stage index -> inclusive instructions, from callgrind_annotate, loop thread."""
    text = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", f"{out}-01"],
                          capture_output=True, text=True, check=True).stdout
    return {int(stage): int(count.replace(",", ""))
            for count, stage in re.findall(r"^\s*([\d,]+) .*:stage(\d+) ", text, re.M)}


def counts(tree: Path, receipts: int, connections: int, members: int, program: str = "A") -> float:
    with tempfile.TemporaryDirectory(prefix="http-cost-") as folder:
        totals = []
        for counted in (FEW, FEW + receipts):
            out = Path(folder) / f"{counted}.out"
            child(tree, "count", counted, connections, members, Path(folder), out, warm=FEW + receipts, program=program)
            totals.append(loop_total(out))
    return (totals[1] - totals[0]) / receipts


def by_function(tree: Path, receipts: int, connections: int, members: int, calls_max: int,
                program: str = "A") -> None:
    import concurrent.futures
    import json
    with tempfile.TemporaryDirectory(prefix="http-cost-") as name:
        folder = Path(name)
        print(child(tree, "shape", FEW + receipts, connections, members, folder, calls_max=calls_max,
                    warm=FEW + receipts, program=program))
        extension(folder)

        def run(job):
            mode, counted = job
            out = folder / f"{mode}-{counted}.out"
            child(tree, mode, counted, connections, members, folder, out, calls_max, FEW + receipts, program=program)
            if mode == "count":
                return loop_total(out), None, None
            return loop_total(out), stage_costs(out), json.loads((folder / f"tree-{counted}.json").read_text())
        jobs = [("by-function", FEW), ("by-function", FEW + receipts), ("count", FEW), ("count", FEW + receipts)]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            runs = list(pool.map(run, jobs))
    (few_total, few_costs, few_tree), (total, costs, tree_), (plain_few, _, _), (plain, _, _) = runs
    # The places of the larger run, by their path from the root: the smaller run numbered
    # them in the order it met them, which may differ.
    def paths(t):
        out = {}
        for i in range(1, len(t["parent"])):
            path, j = [], i
            while j:
                path.append(t["label"][j])
                j = t["parent"][j]
            out[tuple(reversed(path))] = i
        return out
    few_at = paths(few_tree)
    per, calls = {}, {}
    for path, i in paths(tree_).items():
        j = few_at.get(path)
        per[path] = (costs.get(i, 0) - (few_costs.get(j, 0) if j else 0)) / receipts
        calls[path] = (tree_["calls"][i] - (few_tree["calls"][j] if j else 0)) / receipts
    whole, unwrapped = (total - few_total) / receipts, (plain - plain_few) / receipts
    # What a wrapped call costs beyond the function (its wrapper, in the caller's count):
    # the difference of the two totals over the wrapped calls a receipt makes.
    each = (whole - unwrapped) / sum(calls.values())
    children = {}
    for path in per:
        children.setdefault(path[:-1], []).append(path)

    def self_of(path):
        below = children.get(path, [])
        return per[path] - sum(per[c] + each * calls[c] for c in below)
    top = sum(per[p] + each * calls[p] for p in children[()])
    print(f"{tree}: {unwrapped:,.0f} instructions per receipt on the loop's thread, {connections} connections; "
          f"{whole:,.0f} with {sum(calls.values()):,.1f} wrapped calls a receipt, {each:,.0f} each")
    print(f"outside every wrapped function (uvloop and the loop's own work): {whole - top:,.0f}")
    print("call tree: inclusive, self (less the wrapped calls below it and their wrappers' cost), calls a "
          "receipt; places of at least 2,000 instructions a receipt:")

    def show(path, depth):
        for c in sorted(children.get(path, []), key=lambda c: -per[c]):
            if per[c] >= 2_000:
                print(f"{'  ' * depth}{per[c]:10,.0f} {self_of(c):10,.0f} {calls[c]:5.1f}  {c[-1]}")
                show(c, depth + 1)
    show((), 0)
    by_label = {}
    for path in per:
        label = path[-1]
        entry = by_label.setdefault(label, [0.0, 0.0, 0.0])
        if label not in path[:-1]:      # a recursive call is inside its outer one
            entry[0] += per[path]
            entry[2] += calls[path]
        entry[1] += self_of(path)
    print("by function: inclusive, self, calls a receipt; at least 1,000 instructions a receipt:")
    for label, (inc, own, n) in sorted(by_label.items(), key=lambda kv: -kv[1][0]):
        if inc >= 1_000:
            print(f"{inc:10,.0f} {own:10,.0f} {n:5.1f}  {label}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, action="append", help="a source tree to measure (default: this one)")
    parser.add_argument("--receipts", type=int, default=120)
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--members", type=int, default=120)
    parser.add_argument("--by-function", action="store_true")
    parser.add_argument("--calls-max", type=int, default=4, help="with --by-function: wrap functions called at most "
                                                                 "this many times a receipt")
    parser.add_argument("--hash", action="store_true")
    parser.add_argument("--program", choices=("A", "B"), default="A",
                        help="A: rules/programs/market; B: cvm_cost.py's side B with its rfm segment (--segment "
                             "big-spenders), its offer held by half the members and a code on every third receipt")
    args = parser.parse_args()
    trees = [t.resolve() for t in args.tree or [ROOT]]
    for tree in trees:
        subprocess.run([sys.executable, "-m", "compileall", "-q", "-x", r"/\.venv/", str(tree)], check=True,
                       capture_output=True)
    if args.hash:
        for tree in trees:
            with tempfile.TemporaryDirectory() as folder:
                print(tree)
                print(child(tree, "hash", 270, 1, args.members, Path(folder), warm=300, program=args.program))
        return
    if args.by_function:
        for tree in trees:
            by_function(tree, args.receipts, args.connections, args.members, args.calls_max, args.program)
        return
    for tree in trees:
        per = counts(tree, args.receipts, args.connections, args.members, args.program)
        print(f"{tree}: {per:,.0f} instructions per confirmed receipt, event loop thread, "
              f"{args.connections} connections")


if __name__ == "__main__":
    main()
