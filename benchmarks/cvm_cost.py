"""What segments, a personal offer and coupon codes cost a confirmed receipt, side by side in one process.

    PYTHONPATH=. python benchmarks/cvm_cost.py [--members 300] [--receipts 200] [--rounds 4] [--profile DIR]
    PYTHONPATH=. python benchmarks/cvm_cost.py --callgrind [--tree DIR ...] [--sides A,B,P,idle] [--jobs 2] [--out DIR]
        [--members 120 --receipts 120: RESULTS.md's; the timed defaults take about twice as long]
        [--driver-receipts | --http CONNECTIONS] [--segment staff|big-spenders]

Confirms receipts through server/ops/receipts.py (the write path without HTTP; see --http) on one database, in
alternating blocks of four sides:

- A: rules/programs/market as it is;
- B: the same plus a `segments:` section (a `list` segment holding a third of the members, an
  `rfm` segment scored by the daily job), a rule `when: {segment: ...}` for each, a
  `personal: true` rule whose offer (with a points budget) half of the members hold, and a
  coupon campaign with a rule `when: {coupon: ...}`; every third receipt of B carries a fresh
  single-use code. With --segment B defines only that one of its two segments, and its rule:
  the benchmark program with one segment, one personal offer and one coupon campaign;
- P: A plus four plain rules (three with --segment), one for each of B's, with B's rewards
  and a condition on the receipt's register instead of a segment, an offer or a code. Every
  measured receipt's register_id spells which of B's rules would pay for it (the member on
  the staff list, holding the offer, in the rfm segment; a code sent), so each plain rule
  pays on exactly the receipts its B counterpart pays on: B vs P is the CVM machinery itself (reading
  segments, offers and codes, the offer charge and code use written), P vs A what four
  (or three) more paying rules cost (evaluation, attribution, split rows);
- idle: program B for members in no segment, holding no offer, sending no code: the reads
  B adds to every receipt, without the postings and writes of the rules that pay.

In a round every side confirms the same cards and totals (only receipt ids, and B's codes,
differ), in an order that rotates from round to round; the points each rule issued over the
measured rounds are printed per side (from posting_rules), which shows the pairs paid alike.

Segments, offers and codes are set up through the manager's handlers (server/cvm.py), as
`PUT /v1/admin/segments/{id}/members`, `POST /v1/admin/offers` and
`POST /v1/admin/coupons/{campaign}/codes` do. Prints the event loop thread's CPU per receipt
of each side (medians of the blocks) and their differences (B vs A, B vs P, P vs A), which
are the share of confirmed receipts/s lost at full load. Short alternating blocks on one
database let drift on a shared machine hit every side alike.

--profile DIR writes a cProfile of each side's measured confirms to DIR/<side>.pstats (read
them with `python -m pstats`); the profiler inflates the CPU times that run prints, so time
and profile in separate runs. --statements counts the SQL statements each side's measured
confirms run on the write connection (each row of an executemany, BEGIN, SAVEPOINT and COMMIT
included) and prints them per receipt; its callback costs each statement a Python call, so
time without it too. --phases times the parts of each side's confirms (the member's state read,
the one read of segments, offers and codes, the codes hashed and judged, evaluation, plan,
apply, the uses and charges written, commit) by the event loop thread's CPU clock around each
call, and prints their means per receipt: no profiler, but each timed call pays two clock
reads (a few µs on a VM), so compare sides, not absolute values, and time without it too.

--callgrind counts instructions instead of timing (valgrind; CPU times on a shared machine move
by more than a few µs a receipt): for each tree (default this one; `--tree` a `git archive`
copy of another revision, run with this file) and each side, a process does the set-up above,
confirms 30 receipts of that side (after 30 + --receipts in the process with the load driver's
receipts: see below), then --receipts more inside a window in which callgrind
counts the event loop thread's instructions (zeroed and dumped there by two client requests
from a small C library built for the run, cc and valgrind/callgrind.h needed): only the
confirms, not the set-up, nor the receipts' bodies drawn beforehand. Before a counted side
the server's clock is held and its polls (a recorded program, keys, events to deliver) are
stopped: each follows the wall clock, which valgrind stretches by a factor that follows the
machine's load. Other threads are counted apart. --runs N counts every side N times and
prints each run, with its receipts per commit, and the median, min, max and mean ± 2
standard errors of B vs A (and the others). Prints each side's instructions per receipt and
B vs A, B vs P, P vs A, idle vs A as fewer receipts/s computed from them. The callgrind.out
files stay in --out (compare two sides' inclusive costs per function with `callgrind_annotate
--inclusive=yes`).

The receipts are one-line ones unless --driver-receipts: then they are the load driver's
(benchmarks/receipts.py, 5 to 35 lines, 20 on average, from its catalogue and seed, over its
three stores), as `make bench` and benchmarks/ab.py send them, each drawn from its k as the
one-line ones are. --http CONNECTIONS (with --callgrind) measures what confirmed receipts/s
at full load measure: the counted receipts, the load driver's, go to the app served as `loyalty
serve` serves it (its runner and site, on uvloop) over that many keep-alive connections, sent
from another thread of the same process (counted apart from the event loop's), and HTTP, the
middlewares, decoding and the answer are counted with the receipt path. They go in waves:
one receipt on every connection, written while the event loop is held, then the wave's
answers, so that every wave is one commit of CONNECTIONS receipts, as at full load (about ten
a commit), and alike in every run; before each wave the WAL is checkpointed to its end, so
that every wave's commit starts it again (see Sender). --free sends as the load driver does
instead, each connection one receipt after another, and the receipts fall into commits as
valgrind's thread timing has them (2.5 to 2.9 a commit, differing between runs). Before the
counted window the side confirms 150 of the same receipts in the process: a long run sends
the driver's 2,000 templates over and over, so the rules' class cache holds what they need,
as it does here. --http measures source trees from 35b69b7 on (it takes a free port from their
benchmarks/confirm_cpu.py).
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import cProfile
import gc
import hashlib
import http.client
import os
import random
import re
import shutil
import sqlite3
import statistics
import subprocess
from collections import Counter
import sys
import tempfile
import threading
import time
from datetime import date, datetime
from pathlib import Path
from types import SimpleNamespace

import msgspec

# --callgrind runs this file inside other source trees (revisions exported to compare): the
# tree it measures is the one it imports from and takes the market program of.
ROOT = Path(os.environ.get("CVM_COST_TREE") or Path(__file__).resolve().parent.parent)
sys.path.insert(0, str(ROOT))
from benchmarks import receipts as bench_receipts  # noqa: E402
from benchmarks.events_outbox import serving  # noqa: E402
from rules.loader import read_directory  # noqa: E402
from server import cvm, rfm, schema  # noqa: E402
from server.app import create_app  # noqa: E402
from server.auth import Principal  # noqa: E402
from server.config import config_from_dict  # noqa: E402
from server.keys import CLOCK, DATABASE, METRICS, OPS, PROGRAMS  # noqa: E402
from server.listen import Site, new_runner  # noqa: E402
from server import member_state  # noqa: E402
from server.ops import members as member_ops, receipts as receipt_ops  # noqa: E402
from storage import apply as storage_apply, coupons, customer_value, db as storage_db  # noqa: E402

MARKET = ROOT / "rules/programs/market"
REGISTER = Principal("bench", "register", frozenset({"S001", "S002", "F001"}))
MANAGER = Principal("bench-manager", "manager", frozenset())
CODES_PER_REQUEST = 10_000      # the handler's own limit (schema.COUPONS_PER_REQUEST_MAX)
COUNTED_FEW = 30                # receipts a counted side confirms just before its counted window
CLOCK_START = "2026-11-24T12:00:05+02:00"
HTTP_KEY = "bench-register"     # --http: the register's API key
# --driver-receipts and --http: the load driver's receipts (benchmarks/receipts.py), from
# its catalogue and seed.
BENCH_ITEMS = bench_receipts.catalogue(random.Random(5))
BENCH_ENCODER = msgspec.json.Encoder(decimal_format="number")
SIDES = ("A", "B", "P", "idle")

# Added to the market program for side B; the rewards are small so that earning stays
# as it is otherwise (same tiers, same postings but for the added rules'). SEGMENTS are B's
# two segments, each with its rule; --segment keeps one of them, for a program with one segment.
SEGMENTS = {"staff": ("{id: staff, list: true}", "staff-bonus", "{percent: 5}"),
            "big-spenders": ("{id: big-spenders, rfm: {m: [3, 5]}}", "big-spender-bonus", "{points: 10}")}
CVM_REST = """\
coupons:
  - {id: flyer, uses_per_code: 1}
rules:
%s  - id: comeback
    personal: true
    reward: {points: 30}
  - id: flyer-coupon
    when: {coupon: flyer}
    reward: {points: 100}
"""


def cvm_file(segments: tuple[str, ...]) -> str:
    """Side B's campaign file with these of SEGMENTS (each with its rule)."""
    defined = "".join(f"    - {SEGMENTS[s][0]}\n" for s in segments)
    rules = "".join(f"  - id: {SEGMENTS[s][1]}\n    when: {{segment: {s}}}\n    reward: {SEGMENTS[s][2]}\n"
                    for s in segments)
    return "segments:\n  rfm: {window_days: 365}\n  define:\n" + defined + CVM_REST % rules


def b_rules(segments: tuple[str, ...]) -> tuple[str, ...]:
    return (*(SEGMENTS[s][1] for s in segments), "comeback", "flyer-coupon")


# What makes each of B's rules pay, as a bit of the register id the receipts are sent from
# (see register()): the plain rules of side P read that bit (a segment's bit stays in the
# register id when --segment leaves its rule out, so every run sends the same receipts).
STAFF, OFFER, BIG, CODE = range(4)
PLAIN_RULES = {"staff": ("plain-staff", STAFF, "percent: 5"), "big-spenders": ("plain-big", BIG, "points: 10"),
               "offer": ("plain-offer", OFFER, "points: 30"), "coupon": ("plain-coupon", CODE, "points: 100")}


def plain_rules(segments: tuple[str, ...]) -> list[tuple[str, int, str]]:
    """Side P's rules, in b_rules()' order."""
    return [PLAIN_RULES[part] for part in (*segments, "offer", "coupon")]


def register(bits: tuple[bool, ...]) -> str:
    return "K" + "".join("1" if bit else "0" for bit in bits)


def plain_file(segments: tuple[str, ...] = tuple(SEGMENTS)) -> str:
    """Side P's rules: B's rewards, each on the registers whose bit says B's rule pays."""
    every = [tuple(bool(n >> b & 1) for b in range(4)) for n in range(16)]
    lines = ["rules:"]
    for rule_id, bit, reward in plain_rules(segments):
        ids = ", ".join(register(bits) for bits in every if bits[bit])
        lines += [f"  - id: {rule_id}", f"    when: {{register: [{ids}]}}", f"    reward: {{{reward}}}"]
    return "\n".join(lines) + "\n"


def receipt(n: int, k: int, members: int, code: str | None = None, card: str = "card",
            register_id: str = "K01") -> schema.Receipt:
    """Receipt b{n}: its card and total follow k, so sides given the same k buy alike."""
    amount = 1_000 + (k * 7919) % 150_000
    coupons = f', "coupons": ["{code}"]' if code else ""
    return schema.decode(
        f'{{"receipt_id": "b{n}", "store_id": "S001", "register_id": "{register_id}",'
        f' "ts": "2026-11-24T12:00:00+02:00", "card": "{card}-{k % members}", "lines": [{{"line_no": 1,'
        f' "sku": "x", "category": "dairy", "qty": 1, "price": {amount}, "amount": {amount}}}],'
        f' "total": {amount}{coupons}}}'.encode(), schema.Receipt)


class Statements:
    """The write connection's trace callback: statements run while a side is measured."""

    def __init__(self) -> None:
        self.side: str | None = None
        self.counts: Counter[str] = Counter()

    def __call__(self, sql: str) -> None:
        if self.side is not None:
            self.counts[self.side] += 1


class Phases:
    """Event loop thread CPU inside chosen functions, by side: each is replaced, while
    installed, by a wrapper that reads the thread's CPU clock around the call. Nested parts
    (indented) are inside the ones above them."""

    PARTS = (("transaction", storage_db.Database, "_run_in_transaction"),
             ("member state read", receipt_ops, "read_member_state"),
             ("  segments, offers, codes", member_state, "_customer_value"),
             ("    the one read", customer_value, "read"),
             ("    codes hashed", coupons, "hashes"),
             ("    codes judged", coupons, "judged"),
             ("evaluation", receipt_ops, "_timed"),
             ("plan", receipt_ops, "plan_confirm"),
             ("apply", receipt_ops, "apply_confirms"),
             ("  uses and charges", storage_apply, "_customer_value"),
             ("commit", storage_db.Database, "_commit_and_answer"))

    def __init__(self) -> None:
        self.side: str | None = None
        self.ns: dict[str, Counter[str]] = {}
        self._saved: list[tuple[object, str, object]] = []

    def install(self) -> None:
        for label, owner, name in self.PARTS:
            original = getattr(owner, name)
            self._saved.append((owner, name, original))
            setattr(owner, name, self._timed(label, original))

    def remove(self) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()

    def _timed(self, label: str, original):
        def timed(*args, **kwargs):
            if self.side is None:
                return original(*args, **kwargs)
            started = time.thread_time_ns()
            try:
                return original(*args, **kwargs)
            finally:
                self.ns.setdefault(self.side, Counter())[label] += time.thread_time_ns() - started
        return timed


async def block(deps, start: int, first_k: int, count: int, members: int, codes: list[str] | None,
                card: str = "card", paying: list[tuple[bool, bool, bool]] | None = None,
                profiler: cProfile.Profile | None = None, driver: bool = False,
                bodies: list[schema.Receipt] | None = None) -> float:
    """CPU seconds per receipt over `count` confirms, of the event loop's thread: it runs each
    receipt's transaction (the sync thread only waits for the disk). A third of the receipts
    (k divisible by 3) are the ones a code comes with: with `codes` they carry the next one.
    `paying`, by member: which of B's member conditions hold (staff, offer, rfm segment); the
    receipts' registers then spell them (register()). driver: the load driver's receipts
    (bench_body()) instead of one-line ones. bodies: block_bodies()' already drawn."""
    if bodies is None:
        bodies = block_bodies(start, first_k, count, members, codes, card, paying, driver)
    cpu = time.thread_time()
    if profiler:
        profiler.enable()
    for body in bodies:
        status, answer, _ = await receipt_ops.confirm(deps, body, REGISTER)
        assert status == 201, answer
    if profiler:
        profiler.disable()
    return (time.thread_time() - cpu) / count


def block_bodies(start: int, first_k: int, count: int, members: int, codes: list[str] | None, card: str,
                 paying: list[tuple[bool, bool, bool]] | None, driver: bool) -> list[schema.Receipt]:
    """The receipts of a block (see block())."""
    return [schema.decode(bench_body(n, k, members, code, card, reg), schema.Receipt) if driver
            else receipt(n, k, members, code, card, reg)
            for n, k, code, reg in drawn(start, first_k, count, members, codes, paying)]


def drawn(start: int, first_k: int, count: int, members: int, codes: list[str] | None,
          paying: list[tuple[bool, bool, bool]] | None):
    """(n, k, code, register) of each receipt of a block (see block())."""
    for i in range(count):
        k = first_k + i
        coded = k % 3 == 0
        yield (start + i, k, codes.pop() if codes and coded else None,
               register((*paying[k % members], coded)) if paying else "K01")


def bench_body(n: int, k: int, members: int, code: str | None, card: str, register_id: str) -> bytes:
    """Receipt b{n} as the load driver sends it (benchmarks/receipts.py: 5 to 35 lines from its
    catalogue, three stores): drawn from k, so sides given the same k buy alike."""
    now = datetime.fromisoformat(CLOCK_START)
    body = bench_receipts.receipt(random.Random(k), BENCH_ITEMS, "m", now)
    body.update(receipt_id=f"b{n}", card=f"{card}-{k % members}", register_id=register_id)
    if code:
        body["coupons"] = [code]
    return BENCH_ENCODER.encode(body)


class Marks:
    """Callgrind's counters of the calling thread zeroed and dumped from Python: a C library
    of two client requests (valgrind/callgrind.h), built by count_instructions() and named by
    CVM_COST_MARKS. Without it (a run outside valgrind) both do nothing."""

    SOURCE = ('#include <valgrind/callgrind.h>\n'
              'void counted_zero(void) { CALLGRIND_ZERO_STATS; }\n'
              'void counted_dump(void) { CALLGRIND_DUMP_STATS_AT("counted"); }\n')

    def __init__(self) -> None:
        import ctypes
        path = os.environ.get("CVM_COST_MARKS")
        library = ctypes.CDLL(path) if path else None
        self.zero = library.counted_zero if library else (lambda: None)
        self.dump = library.counted_dump if library else (lambda: None)

    @classmethod
    def build(cls, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "marks.c").write_text(cls.SOURCE)
        library = folder / "marks.so"
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(library), str(folder / "marks.c")], check=True)
        return library


def commits(app) -> tuple[int, int]:
    """(transactions committed, writes in them) so far, from the commit batch histogram."""
    samples = {sample.name: sample.value for family in app[METRICS].commit_batch.collect()
               for sample in family.samples}
    return (int(samples["loyalty_ledger_commit_batch_size_count"]),
            int(samples["loyalty_ledger_commit_batch_size_sum"]))


class Sender:
    """Sends receipts to the app over `connections` keep-alive connections from a thread of
    this process, and marks the counted ones' start and end on the event loop's thread.

    waves=True: every connection's next receipt is written while the event loop is held in a
    callback, then the loop is let go and all the answers are read before the next wave: the
    loop finds the wave's requests together, their handlers reach the writer in one round,
    and each wave is one commit of `connections` receipts, alike in every run (as at full
    load, about ten a commit). waves=False: each connection sends its share one after another
    as the load driver does, and how the receipts fall into commits follows the threads'
    timing under valgrind, which differs from run to run.

    The counted window is bounded by two holds of the loop, after the answers of the wave
    before (or of every receipt before): each bound sees the loop at the same point, the
    collector emptied at the first, so the window's collections follow its own allocations."""

    HEADERS = {"Authorization": f"Bearer {HTTP_KEY}", "Content-Type": "application/json"}

    def __init__(self, loop: asyncio.AbstractEventLoop, port: int, connections: int, waves: bool,
                 database: Path) -> None:
        self.loop, self.port, self.waves = loop, port, waves
        self.connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=600) for _ in range(connections)]
        # Checkpoints from this thread (the server's checkpoint thread copies the WAL by the
        # wall clock): see _settle().
        self.database = sqlite3.connect(database, timeout=60, isolation_level=None, check_same_thread=False)

    def hold(self, then=None):
        """Holds the event loop in a callback until the returned function is called; `then`
        runs on the loop's thread first."""
        held, go = threading.Event(), threading.Event()

        def holding() -> None:
            if then:
                then()
            held.set()
            go.wait()

        self.loop.call_soon_threadsafe(holding)
        held.wait()
        return go.set

    def at_loop(self, fn) -> None:
        self.hold(fn)()

    def send(self, bodies: list[bytes]) -> None:
        if not self.waves:
            with concurrent.futures.ThreadPoolExecutor(len(self.connections)) as pool:
                list(pool.map(lambda at: self._one_by_one(self.connections[at], bodies[at::len(self.connections)]),
                              range(len(self.connections))))
            return
        width = len(self.connections)
        for at in range(0, len(bodies), width):
            wave = list(zip(self.connections, bodies[at:at + width]))
            release = self.hold(self._settle)
            for connection, body in wave:
                connection.request("POST", "/v1/receipts", body, self.HEADERS)
            release()
            for connection, _ in wave:
                self._answer(connection)

    def _settle(self) -> None:
        """Every frame of the WAL copied into the database before a wave (the loop held, no
        write under way), so that each wave's commit starts the WAL again from its beginning.
        Left to the checkpoint thread, whose passes follow the wall clock, that happened at 11
        of one run's 12 counted commits and at 1 of another's, some 30 k instructions of the
        loop's thread each (the WAL index's first hash table cleared)."""
        while True:
            busy, frames, copied = self.database.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if not busy and frames == copied:
                return
            time.sleep(0.01)   # a pass of the checkpoint thread is under way

    def _one_by_one(self, connection: http.client.HTTPConnection, bodies: list[bytes]) -> None:
        for body in bodies:
            connection.request("POST", "/v1/receipts", body, self.HEADERS)
            self._answer(connection)

    @staticmethod
    def _answer(connection: http.client.HTTPConnection) -> None:
        answer = connection.getresponse()
        text = answer.read()
        if answer.status != 201:
            raise RuntimeError(f"/v1/receipts answered {answer.status}: {text[:300]!r}")

    def close(self) -> None:
        for connection in self.connections:
            connection.close()
        self.database.close()


def counted_http(app, loop: asyncio.AbstractEventLoop, port: int, connections: int, waves: bool, database: Path,
                 warm: list[bytes], counted: list[bytes], found: dict) -> None:
    """On a thread: `warm` sent, then `counted` inside callgrind's window (zeroed and dumped on
    the loop's thread); found gets the commits and writes inside the window."""
    marks = Marks()
    sender = Sender(loop, port, connections, waves, database)
    try:
        sender.send(warm)

        def start() -> None:
            gc.collect()
            found["before"] = commits(app)
            marks.zero()

        def end() -> None:
            marks.dump()
            found["after"] = commits(app)

        sender.at_loop(start)
        sender.send(counted)
        sender.at_loop(end)
    finally:
        sender.close()


class listening:
    """The app served as `loyalty serve` serves it (its runner and site), on config's port."""

    def __init__(self, app, config):
        self.app, self.config = app, config

    async def __aenter__(self):
        self.runner = new_runner(self.app, self.config.server)
        await self.runner.setup()
        await Site(self.runner, self.config.server).start()

    async def __aexit__(self, *exc):
        await self.runner.cleanup()


# The server's background loops, by their coroutines' names: each wakes by the wall clock,
# which valgrind stretches by a factor that follows the machine's load.
POLLS = {"watch", "keep_keys_fresh", "ProgramVersions.follow", "Dispatcher.run"}


def quiet(app) -> None:
    """Before a counted side: the server's clock held where it is, and its polls stopped.
    What a receipt does then no longer follows the wall clock; a poll is seconds apart, so
    at full load its share of a receipt is nil, while in a counted window it lands or not."""
    clock = app[CLOCK]
    moment = clock.now()
    clock.now = lambda: moment
    current = asyncio.current_task()
    for task in asyncio.all_tasks():
        if task is not current and task.get_coro().__qualname__ in POLLS:
            task.cancel()


async def manage(app, handler, path: dict, body) -> dict:
    """A manager's call through the handler an HTTP request would reach; its answer."""
    reply = await handler(app, SimpleNamespace(path=path, body=body))
    assert reply.status in (200, 201), reply.text
    return msgspec.json.decode(reply.body)


async def set_up_cvm(app, members: int, codes_needed: int, segments: tuple[str, ...]) -> list[str]:
    """The staff list (when B has it), the offer and the codes (program B serving); returns the codes."""
    cards = [f"card-{m}" for m in range(members)]
    if "staff" in segments:
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


async def main(members: int, per_block: int, rounds: int, profile: Path | None, count: bool,
               timed: bool = False, counted: tuple[str, int] | None = None, http_connections: int = 0,
               driver: bool = False, segments: tuple[str, ...] = tuple(SEGMENTS), waves: bool = True) -> None:
    """The measured rounds and their report; with `counted` (side, receipts), after the same
    set-up, only that many receipts of that side, for callgrind to count (no report), sent
    over HTTP on `http_connections` connections when that is not 0. driver: the measured
    receipts are the load driver's (always so over HTTP), else one-line ones; segments: those of
    SEGMENTS that B has."""
    folder = Path(tempfile.mkdtemp(prefix="cvm-bench-"))
    program_b = folder / "program"
    shutil.copytree(MARKET, program_b)
    (program_b / "campaigns" / "cvm.yaml").write_text(cvm_file(segments))
    settings = {"database": {"path": str(folder / "bench.db")},
                "rules": {"dir": str(program_b), "watch": False},
                "clock": {"start": CLOCK_START}, "jobs": {"enabled": False},
                "privacy": {"hmac_key": "bench-hmac-key-0123456789"}}
    if counted:
        # The server's polls (a program recorded by another server, keys, events to deliver)
        # run on the event loop by the wall clock, which valgrind stretches by a factor that
        # follows the machine's load: at their defaults they put 100 k and more instructions
        # a receipt into one run and not another. Counted runs poll as seldom as allowed.
        settings["rules"]["poll_interval_ms"] = 60_000
        settings["auth"] = {"keys_refresh_seconds": 300}
        settings["events"] = {"poll_interval_seconds": 60}
    port = 0
    if http_connections:
        from benchmarks.confirm_cpu import free_port     # here: trees from 35b69b7 on have it
        port = free_port()
        sha = hashlib.sha256(HTTP_KEY.encode()).hexdigest()
        settings["server"] = {"host": "127.0.0.1", "port": port}
        settings["auth"]["keys"] = [{"id": "bench", "sha256": sha, "role": "register",
                                     "stores": ["S001", "S002", "F001"]}]
        settings["limits"] = {"requests_per_second_per_key": 1_000_000, "burst": 10_000_000}
    config = config_from_dict(settings)
    app = create_app(config)
    async with listening(app, config) if port else serving(app):
        deps, holder = app[OPS], app[PROGRAMS]
        b = holder.current
        files, _, problems = read_directory(MARKET)
        assert not problems, problems
        programs = {"A": holder.compile(files), "B": b,
                    "P": holder.compile({**files, "campaigns/plain.yaml": plain_file(segments).encode()})}
        for m in range(members):
            await member_ops.enroll(deps, schema.Enrollment(card=f"card-{m}"), MANAGER)
        n = 0
        # Warm-up, one block of each: caches, every program, and every member's first
        # receipt so the RFM job has something to score.
        for side in ("A", "B", "P"):
            holder.current = programs[side]
            await block(deps, n, 0, max(per_block, members), members, None)
            n += max(per_block, members)
        holder.current = b      # the manager's calls below check B's segments and rules
        scored = await rfm.run(app[DATABASE], b.segment_window_days, b.timezone, app[CLOCK].now(), force=True,
                               program=b)
        codes = await set_up_cvm(app, members, codes_needed(per_block, rounds, counted is not None),
                                 segments)
        paying = await who_pays(app, members)
        # Side "idle": program B for members enrolled after the set-up (in no segment, holding
        # no offer, sending no code): what B's reads cost when none of its rules pays.
        for m in range(members):
            await member_ops.enroll(deps, schema.Enrollment(card=f"idle-{m}"), MANAGER)
        programs["idle"] = b
        holder.current = b
        await block(deps, n, 0, members, members, None, "idle")
        n += members
        if counted:
            side, receipts = counted
            holder.current = programs[side]
            card = "idle" if side == "idle" else "card"
            quiet(app)
            if driver:
                # A long run sends the driver's 2,000 templates over and over, so the rules'
                # class cache (rules/matching.py) holds what its receipts need: so here.
                await block(deps, n, 0, COUNTED_FEW + receipts, members, codes if side == "B" else None, card,
                            paying, driver=True)
                n += COUNTED_FEW + receipts
            side_codes = codes if side == "B" else None
            found: dict = {}
            if port:
                bodies = [bench_body(i, k, members, code, card, reg)
                          for i, k, code, reg in drawn(n, 0, COUNTED_FEW + receipts, members, side_codes, paying)]
                await asyncio.get_running_loop().run_in_executor(
                    None, counted_http, app, asyncio.get_running_loop(), port, http_connections, waves,
                    folder / "bench.db", bodies[:COUNTED_FEW], bodies[COUNTED_FEW:], found)
            else:
                marks = Marks()
                await block(deps, n, 0, COUNTED_FEW, members, side_codes, card, paying, driver=driver)
                # Drawn before the window, as the bodies sent over HTTP are.
                bodies = block_bodies(n + COUNTED_FEW, COUNTED_FEW, receipts, members, side_codes, card, paying,
                                      driver)
                gc.collect()
                found["before"] = commits(app)
                marks.zero()
                await block(deps, n + COUNTED_FEW, COUNTED_FEW, receipts, members, side_codes, card, paying,
                            driver=driver, bodies=bodies)
                marks.dump()
                found["after"] = commits(app)
            (done, wrote), (done_before, wrote_before) = found["after"], found["before"]
            print(f"counted: {receipts} receipts, {done - done_before} commits, {wrote - wrote_before} writes")
        else:
            # The measured rounds.
            mark = await app[DATABASE].read(lambda conn: conn.execute(
                "SELECT COALESCE(MAX(posting_id), 0) FROM posting_rules").fetchone()[0])
            statements = Statements() if count else None
            if statements:
                await app[DATABASE].write(lambda conn: conn.set_trace_callback(statements))
            phases = Phases() if timed else None
            if phases:
                phases.install()
            try:
                sides, profilers = await alternate(deps, holder, programs, n, rounds, per_block, members, codes,
                                                   paying, profile is not None, statements, phases, driver)
            finally:
                if phases:
                    phases.remove()
            if statements:
                await app[DATABASE].write(lambda conn: conn.set_trace_callback(None))
            holder.current = b
            # The codes' counters: where each use is recorded moved (m038), what they count did not.
            used = await app[DATABASE].read(
                lambda conn: conn.execute("SELECT COALESCE(SUM(uses), 0) FROM coupon_codes").fetchone()[0])
            paid = await app[DATABASE].read(lambda conn: {
                rule: (count, points) for rule, count, points in conn.execute(
                    "SELECT rule_id, COUNT(*), SUM(points) FROM posting_rules WHERE posting_id > ? GROUP BY rule_id",
                    (mark,))})
    if counted:
        shutil.rmtree(folder)
        return
    report(sides, scored.scored if scored else 0, paid, used, per_block, statements, phases, segments)
    if profile:
        profile.mkdir(parents=True, exist_ok=True)
        for side, profiler in profilers.items():
            profiler.dump_stats(profile / f"{side}.pstats")
    shutil.rmtree(folder)


def codes_needed(per_block: int, rounds: int, counted: bool) -> int:
    """Codes to create: one for every third receipt of B's blocks, or of --callgrind's larger
    run and its warm-up (both of its runs create as many, so that the set-up cancels out)."""
    if counted:   # and as many for the warm-up of the load driver's receipts
        return 3 * ((COUNTED_FEW + per_block) // 3 + 1)
    return rounds * (per_block // 3 + 1)


def count_instructions(trees: list[Path], members: int, receipts: int, out: Path, jobs: int,
                       sides: tuple[str, ...] = SIDES, http_connections: int = 0, driver: bool = False,
                       segments: tuple[str, ...] = tuple(SEGMENTS), runs: int = 1, waves: bool = True) -> None:
    """Instructions per receipt of each side in each tree, `runs` times: a process per side under
    callgrind does the set-up, confirms COUNTED_FEW receipts of that side, then `receipts` more
    inside a window whose instructions of the event loop's thread are counted (zeroed and
    dumped there: Marks). The callgrind.out files stay in out/<tree>/.../<side>-<run>.out.1-01.
    http_connections: the receipts go over HTTP (see --http), in waves of one commit each
    unless waves is False; driver: the load driver's receipts (always so over HTTP); segments:
    B's (see --segment)."""
    marks = Marks.build(out)
    order = [(run, tree, side) for run in range(1, runs + 1) for tree in trees for side in sides]
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        counts = dict(zip(order, pool.map(
            lambda job: callgrind_side(job[1], job[2], job[0], members, receipts, out, marks, http_connections,
                                       driver, segments, waves), order)))
    print((f"the load driver's receipts over HTTP, {http_connections} connections, "
           + ("waves of one commit" if waves else "sent freely")) if http_connections
          else ("the load driver's" if driver else "one-line") + " receipts confirmed in the process, one at a time")
    print(f"B's segments: {', '.join(segments)}; {receipts} receipts counted per side and run")
    pairs = [(x, y) for x, y in (("B", "A"), ("B", "P"), ("P", "A"), ("idle", "A")) if x in sides and y in sides]
    for tree in trees:
        print(f"{tree}: instructions per receipt (receipts per commit)")
        shares: dict[tuple[str, str], list[float]] = {pair: [] for pair in pairs}
        for run in range(1, runs + 1):
            per = {side: counts[run, tree, side][0] / receipts for side in sides}
            for x, y in pairs:
                shares[x, y].append(100 * (1 - per[y] / per[x]))
            print(f"  run {run}: " + ", ".join(
                f"{side} {per[side]:,.0f} ({receipts / counts[run, tree, side][1]:.2f})" for side in sides)
                  + "".join(f"; {x} - {y} {per[x] - per[y]:+,.0f}, {x} vs {y} {shares[x, y][-1]:.2f} %"
                            for x, y in pairs))
        for x, y in pairs:
            values = shares[x, y]
            spread = (f", mean {statistics.mean(values):.2f} ± {2 * statistics.stdev(values) / len(values) ** 0.5:.2f}"
                      f" (2 standard errors)" if len(values) > 1 else "")
            print(f"  {x} vs {y} (fewer receipts/s at full load): median {statistics.median(values):.2f} %, "
                  f"min {min(values):.2f}, max {max(values):.2f}{spread}")


def callgrind_side(tree: Path, side: str, run: int, members: int, receipts: int, out: Path, marks: Path,
                   http_connections: int = 0, driver: bool = False,
                   segments: tuple[str, ...] = tuple(SEGMENTS), waves: bool = True) -> tuple[int, int]:
    """The instructions of the event loop's thread (the one the CPU times count: it runs every
    receipt's transaction) over the counted window of a process that sets up as main() does
    (hash seed fixed, bytecode compiled beforehand), and the commits in it. Threads are counted
    apart: the checkpoint thread's work follows the wall clock, which valgrind stretches."""
    folder = out / tree.name / (f"http{http_connections}" + ("" if waves else "-free") if http_connections
                                else "driver" if driver else "")
    one = ["--segment", segments[0]] if len(segments) == 1 else []
    folder = folder / segments[0] if one else folder
    folder.mkdir(parents=True, exist_ok=True)
    name = folder / f"{side}-{run}.out"
    for old in folder.glob(f"{name.name}*"):
        old.unlink()
    argv = ["valgrind", "--tool=callgrind", "--cache-sim=no", "--branch-sim=no", "--separate-threads=yes",
            f"--callgrind-out-file={name}", sys.executable, str(Path(__file__).resolve()),
            "--members", str(members), "--receipts", str(receipts), "--counted-side", side,
            "--counted", str(receipts), "--http", str(http_connections),
            *(["--driver-receipts"] if driver else []), *([] if waves else ["--free"]), *one]
    done = subprocess.run(argv, cwd=tree, capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "PYTHONPATH": str(tree), "CVM_COST_TREE": str(tree),
                               "PYTHONHASHSEED": "0", "CVM_COST_MARKS": str(marks)})
    window = Path(f"{name}.1-01")
    found = re.findall(r"^summary: (\d+)$", window.read_text(), re.M) if window.exists() else []
    committed = re.findall(r"^counted: \d+ receipts, (\d+) commits", done.stdout, re.M)
    if done.returncode != 0 or len(found) != 1 or len(committed) != 1:
        raise SystemExit(f"{tree} {side} run {run} under valgrind failed:\n{done.stdout[-1000:]}{done.stderr[-3000:]}")
    return int(found[0]), int(committed[0])


async def alternate(deps, holder, programs: dict, n: int, rounds: int, per_block: int, members: int,
                    codes: list[str], paying: list, profile: bool,
                    statements: Statements | None,
                    phases: Phases | None = None, driver: bool = False) -> tuple[dict[str, list[float]], dict]:
    """The measured rounds: each side's CPU per receipt by block, and its profiler (profile);
    statements, when given, counts each side's, and phases times their parts."""
    sides: dict[str, list[float]] = {side: [] for side in SIDES}
    # The event loop thread's CPU clock, as the timings: other processes on the machine, and
    # the loop waiting for the sync thread, do not count.
    profilers = {side: cProfile.Profile(time.thread_time) for side in sides} if profile else {}
    order = list(sides)
    for r in range(rounds):
        # The same receipts for every side in a round; the order turns so that none
        # always meets the members after the others have bought.
        for side in order[r % len(order):] + order[:r % len(order)]:
            # What each request reads to take the serving program (no reload: the
            # programs stay compiled, and the switch costs nothing inside a block).
            holder.current = programs[side]
            if statements:
                statements.side = side
            if phases:
                phases.side = side
            sides[side].append(await block(deps, n, r * per_block, per_block, members,
                                           codes if side == "B" else None,
                                           "idle" if side == "idle" else "card", paying, profilers.get(side),
                                           driver))
            n += per_block
            if statements:
                statements.side = None
            if phases:
                phases.side = None
    return sides, profilers


async def who_pays(app, members: int) -> list[tuple[bool, bool, bool]]:
    """By member: on the staff list, holding the offer, in the rfm segment (as set_up_cvm
    and the RFM run left them)."""
    deps = app[OPS]
    ids = [(await member_ops.find_member(deps, f"card-{m}")).id for m in range(members)]
    big = await app[DATABASE].read(lambda conn: {row[0] for row in conn.execute(
        "SELECT member_id FROM segment_spans WHERE segment_id = 'big-spenders' AND valid_to IS NULL")})
    return [(m % 3 == 0, m % 2 == 0, ids[m] in big) for m in range(members)]


def report(sides: dict[str, list[float]], scored: int, paid: dict, used: int, per_block: int,
           statements: Statements | None, phases: Phases | None = None,
           segments: tuple[str, ...] = tuple(SEGMENTS)) -> None:
    cost = {side: statistics.median(blocks) for side, blocks in sides.items()}
    print(f"RFM scored {scored} members; {len(sides['A'])} alternating rounds of {per_block} receipts per side")
    print(f"measured rounds, rules paid (receipts, points): coupon uses {used}")
    for b_rule, (p_rule, _, _) in zip(b_rules(segments), plain_rules(segments)):
        print(f"  B {b_rule:18} {paid.get(b_rule, (0, 0))}   P {p_rule:13} {paid.get(p_rule, (0, 0))}")
    for side, blocks in sides.items():
        print(f"{side} blocks (us):", " ".join(f"{x * 1e6:.0f}" for x in blocks))
    names = {"A": "market", "B": "market + CVM", "P": f"market + {len(segments) + 2} plain rules",
             "idle": "B, members in nothing"}
    for side, name in names.items():
        print(f"{side} {name + ':':26} {cost[side] * 1e6:.0f} us CPU/receipt (median)")
    for x, y in (("B", "A"), ("B", "P"), ("P", "A"), ("idle", "A")):
        print(f"{x} vs {y}: {(cost[x] - cost[y]) * 1e6:.0f} us/receipt, {100 * (cost[x] / cost[y] - 1):.1f} % "
              f"more CPU, {100 * (1 - cost[y] / cost[x]):.1f} % fewer receipts/s at full load")
    for x, y in (("B", "A"), ("B", "P"), ("P", "A")):
        by_round = (100 * (1 - u / v) for u, v in zip(sides[y], sides[x]))
        print(f"fewer receipts/s by round, {x} vs {y} (%):", " ".join(f"{p:.1f}" for p in by_round))
    if statements:
        receipts = {side: len(blocks) * per_block for side, blocks in sides.items()}
        per = {side: statements.counts[side] / receipts[side] for side in sides}
        print("SQL statements per receipt:", ", ".join(f"{side} {per[side]:.2f}" for side in sides),
              f"(B - P {per['B'] - per['P']:.2f}, B - A {per['B'] - per['A']:.2f})")
    if phases:
        receipts = {side: len(blocks) * per_block for side, blocks in sides.items()}
        print(f"{'us CPU/receipt (mean)':28}" + "".join(f"{side:>8}" for side in sides) + "   B - P   B - A")
        for label, _, _ in Phases.PARTS:
            us = {side: phases.ns.get(side, Counter())[label] / receipts[side] / 1e3 for side in sides}
            print(f"{label:28}" + "".join(f"{us[side]:8.1f}" for side in sides)
                  + f"{us['B'] - us['P']:8.1f}{us['B'] - us['A']:8.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=300)
    parser.add_argument("--receipts", type=int, default=200, help="confirms per block")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--profile", type=Path, help="a folder for each side's cProfile of its confirms")
    parser.add_argument("--statements", action="store_true", help="count each side's SQL statements per receipt")
    parser.add_argument("--phases", action="store_true", help="time the parts of each side's confirms")
    parser.add_argument("--callgrind", action="store_true",
                        help="count instructions per receipt of each side instead (valgrind)")
    parser.add_argument("--tree", type=Path, action="append",
                        help="with --callgrind: a source tree to count (repeatable; default this one)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "cvm-callgrind",
                        help="with --callgrind: where the callgrind.out files stay")
    parser.add_argument("--jobs", type=int, default=2, help="with --callgrind: valgrind runs at a time")
    parser.add_argument("--sides", default=",".join(SIDES), help="with --callgrind: the sides to count (A,B,P,idle)")
    parser.add_argument("--driver-receipts", action="store_true",
                        help="measure the load driver's receipts (benchmarks/receipts.py) instead of one-line ones")
    parser.add_argument("--http", type=int, default=0, metavar="CONNECTIONS",
                        help="with --callgrind: send the load driver's receipts over HTTP on this many connections")
    parser.add_argument("--runs", type=int, default=1,
                        help="with --callgrind: count every side this many times (median, min, max, mean ± 2 SE)")
    parser.add_argument("--free", action="store_true",
                        help="with --http: each connection sends its share one after another (commits as they fall), "
                             "not in waves of one commit each")
    parser.add_argument("--segment", choices=tuple(SEGMENTS),
                        help="B defines this one of its two segments (and its rule) only; P's plain rules follow")
    parser.add_argument("--counted-side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--counted", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    segments = (args.segment,) if args.segment else tuple(SEGMENTS)
    if args.callgrind:
        trees = [tree.resolve() for tree in args.tree or [ROOT]]
        for tree in trees:
            subprocess.run([sys.executable, "-m", "compileall", "-q", "-x", r"/\.venv/", str(tree)], check=True,
                           capture_output=True)
        count_instructions(trees, args.members, args.receipts, args.out, args.jobs, tuple(args.sides.split(",")),
                           args.http, args.driver_receipts, segments, args.runs, not args.free)
    elif args.http and not args.counted_side:
        parser.error("--http counts instructions: use it with --callgrind")
    else:
        counted = (args.counted_side, args.counted) if args.counted_side else None
        run = main(args.members, args.receipts, args.rounds, args.profile, args.statements, args.phases,
                   counted=counted, http_connections=args.http, driver=args.driver_receipts or bool(args.http),
                   segments=segments, waves=not args.free)
        if args.http:
            import uvloop
            uvloop.run(run)     # the loop `loyalty serve` runs on
        else:
            asyncio.run(run)
