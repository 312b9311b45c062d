"""What the slow requests at a fixed rate had around them: each request's time in the server
beside the garbage collections, write batches, COMMITs, fdatasyncs, checkpoints and loop lag
that overlapped it.

    PYTHONPATH=. python benchmarks/tail_probe.py [--rate 450] [--members 10000] [--seconds 20] [--tree DIR]
        [--warm-up 3] [--timeline STEP]

One server (market program), pinned like `make bench`, run through this file's --serve mode,
which installs the probes in the server's own process before it starts: gc.callbacks (each
collection's generation, duration and thread), wrappers around storage.db.Database's write
turn, COMMIT, fdatasync, answers and checkpoints, the request middleware, and a timer that
measures the event loop's lag every LAG_PROBE_INTERVAL_S. --tree runs another checkout's
server (its storage.db must have the same private method names; a missing one is skipped).

Prints wrk's latency (end to end, what a register sees), the server's own per-request time,
and for the requests at and above the server's p99 how much of each kind of event they
overlapped, against the same for all requests; each generation's collections beside the slow
requests; with --timeline, the same per STEP seconds from the first request (the warm-up
included: --warm-up 0 measures from the start). The probes keep their records in arrays of
numbers, so they add nothing the cyclic collector counts: with tuples in lists they made the
collections they timed.

TAIL_PROBE_GARBAGE=1 keeps what the cyclic collector finds (gc.DEBUG_SAVEALL: run it short)
and writes its most common types and frames into benchmarks/data/tail-LABEL.json ("garbage");
with TAIL_PROBE_GARBAGE_ONLY=1 too, without the other probes (their frames join the cycles).
TAIL_PROBE_SURVIVORS=1 lists, once the youngest generation is 95 % of its threshold, what it
holds by type, its largest containers, its tuples by their items' types and what holds a few
("young" in the output; taken between two requests, on the loop).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LAG_PROBE_INTERVAL_S = 0.005


# ------------------------------------------------------------------ in the server's process

def install_probes(events: dict[str, list]) -> None:
    """Wraps what the server does into lists of (start_s, seconds, detail...) in `events`."""
    import gc

    import server.app as app_module
    from storage import db as db_module

    clock = time.perf_counter
    survivors = bool(os.environ.get("TAIL_PROBE_SURVIVORS"))
    young_pending: list = []

    def young_census() -> None:
        """Once the youngest generation is nearly due: what it holds by type, its largest
        containers, its tuples by their items' types, and what holds a few of them. Taken
        here, between two requests: during a collection a tuple may still be half built."""
        import collections
        if young_pending or gc.get_count()[0] < gc.get_threshold()[0] * 0.95:
            return
        young_pending.append(True)          # once per collection (on_gc clears it)
        at, young = clock(), gc.get_objects(0)
        kinds = collections.Counter(type(o).__qualname__ for o in young)
        sizes = sorted(((len(o), type(o).__qualname__) for o in young
                        if isinstance(o, (dict, list, set, tuple))), reverse=True)[:5]
        tuples = [o for o in young if type(o) is tuple]
        shapes = collections.Counter(f"{len(o)}:" + ",".join(type(x).__name__ for x in o[:4]) for o in tuples)
        sample = tuples[-2000::400]
        holders = [[repr(t)[:120], [type(r).__qualname__ for r in gc.get_referrers(t)
                                    if r is not young and r is not tuples and r is not sample][:3]]
                   for t in sample]
        events["survivors"].append((at, len(young), kinds.most_common(12) + sizes + shapes.most_common(8) + holders))
        del young, tuples, sample

    gc_started: dict[int, float] = {}

    def on_gc(phase: str, info: dict) -> None:
        ident = threading.get_ident()
        if phase == "start":
            gc_started[ident] = clock()
        elif ident in gc_started:
            start = gc_started.pop(ident)
            end = clock()
            # After a full collection, how many objects it walked (a list of them: only then).
            walked = len(gc.get_objects(2)) if info["generation"] == 2 else 0
            if info["generation"] == 0:
                young_pending.clear()
            events["gc"].append((start, end - start, info["generation"], info["collected"],
                                 threading.current_thread().name, walked, gc.get_freeze_count()))

    gc.callbacks.append(on_gc)

    def timed(cls: type, name: str, kind: str, detail=None) -> None:
        original = getattr(cls, name, None)
        if original is None:
            print(f"tail_probe: {cls.__name__}.{name} not found, not probed", file=sys.stderr)
            return

        def wrapper(self, *args, **kwargs):
            start = clock()
            cpu = time.thread_time()
            result = None
            try:
                result = original(self, *args, **kwargs)
                return result
            finally:
                extra = detail(self, args, result) if detail else ()
                events[kind].append((start, clock() - start, *extra, time.thread_time() - cpu))

        setattr(cls, name, wrapper)

    Database = db_module.Database
    timed(Database, "_loop_turn", "loop_turn")
    timed(Database, "_run_functions", "run_functions", lambda self, args, _: (len(args[0]),))
    timed(Database, "_commit_and_answer", "commit", lambda self, args, _: (len(args[0].batch),))
    timed(Database, "_sync_wal", "fdatasync")
    timed(Database, "_answer", "answer", lambda self, args, _: (len(args[0]), threading.current_thread().name))
    timed(Database, "_checkpoint", "checkpoint", lambda self, args, row: (args[1], threading.current_thread().name, row))
    timed(Database, "_checkpoint_on_writer", "checkpoint_on_writer")
    timed(Database, "_flush_copied_pages", "db_sync")

    # When the loop runs the answers the sync thread handed it (call_soon_threadsafe looks
    # the function up by name at each call).
    original_settle = db_module._settle_async

    def settle(entries):
        events["settle"].append((clock(), 0.0, len(entries)))
        return original_settle(entries)

    db_module._settle_async = settle

    original_middleware = app_module.latency_middleware
    lag_started = []

    from aiohttp import web

    @web.middleware
    async def probe_middleware(request, handler):
        if not lag_started:
            lag_started.append(True)
            import asyncio
            asyncio.get_running_loop().create_task(lag_probe(events))
        if survivors:
            young_census()
        start = clock()
        try:
            return await original_middleware(request, handler)
        finally:
            events["request"].append((start, clock() - start, request.path))

    app_module.latency_middleware = probe_middleware


async def lag_probe(events: dict[str, list]) -> None:
    import asyncio
    while True:
        start = time.perf_counter()
        await asyncio.sleep(LAG_PROBE_INTERVAL_S)
        late = time.perf_counter() - start - LAG_PROBE_INTERVAL_S
        events["lag"].append((start + LAG_PROBE_INTERVAL_S, max(late, 0.0)))


class Track:
    """One kind of event, kept in arrays of numbers: a list of tuples would add objects the
    cyclic collector counts (some 1,500 a second at 450 requests/s), and its youngest
    generation would be collected for the probe's records, not the server's."""

    def __init__(self):
        import array
        self.values, self.kinds, self.widths = array.array("d"), array.array("b"), array.array("B")
        self.symbols: list = []
        self.symbol_of: dict = {}

    def append(self, record: tuple) -> None:
        self.widths.append(len(record))
        for value in record:
            if type(value) is float or type(value) is int:
                self.values.append(value)
                self.kinds.append(0)
            else:                       # a name, a mode, a checkpoint's row: few distinct ones
                at = self.symbol_of.get(value)
                if at is None:
                    at = self.symbol_of[value] = len(self.symbols)
                    self.symbols.append(value)
                self.values.append(at)
                self.kinds.append(1)

    def records(self) -> list[list]:
        out, at = [], 0
        for width in self.widths:
            out.append([self.symbols[int(self.values[i])] if self.kinds[i] else self.values[i]
                        for i in range(at, at + width)])
            at += width
        return out


def serve(config: str, out: str) -> int:
    events: dict = {kind: Track() for kind in (
        "gc", "loop_turn", "run_functions", "commit", "fdatasync", "answer", "checkpoint",
        "checkpoint_on_writer", "request", "lag", "settle", "db_sync")}
    events["survivors"] = []
    if not os.environ.get("TAIL_PROBE_GARBAGE_ONLY"):
        install_probes(events)
    import gc
    if os.environ.get("TAIL_PROBE_GARBAGE"):
        gc.set_debug(gc.DEBUG_SAVEALL)       # what the collections found: kept, to be counted
    from server.cli import main
    try:
        return main(["serve", "--config", config])
    finally:
        kept = {kind: track.records() if isinstance(track, Track) else track for kind, track in events.items()}
        kept["garbage"] = garbage_types(gc.garbage)
        Path(out).write_text(json.dumps(kept))


def garbage_types(garbage: list) -> list:
    """The cyclic garbage's most common types, with an example of what holds each cycle."""
    import collections
    counts = collections.Counter(type(o).__qualname__ + ":" + getattr(type(o), "__module__", "") for o in garbage)
    out = [[name, n] for name, n in counts.most_common(40)]
    frames = collections.Counter(f"{o.f_code.co_filename}:{o.f_code.co_name}" for o in garbage
                                 if type(o).__name__ == "frame")
    return out + [["frame " + name, n] for name, n in frames.most_common(30)]


# ------------------------------------------------------------------ the driver

def analyse(events: dict[str, list], first: float, last: float) -> dict:
    """first, last: the measured run's span (perf_counter is CLOCK_MONOTONIC, one clock for
    every process), so the warm-up run before it is left out."""
    events = {kind: [tuple(e) for e in spans if first <= e[0] <= last]
              for kind, spans in events.items() if kind not in ("garbage", "survivors")}
    requests = events["request"]
    durations = sorted(r[1] for r in requests)
    p99 = durations[int(len(durations) * 0.99)]
    slow = [r for r in requests if r[1] >= p99]
    out = {"requests": len(requests), "server_ms": {q: pct(durations, f) * 1000 for q, f in
                                                    (("p50", 0.5), ("p99", 0.99), ("p999", 0.999))}}
    gcs = events["gc"]
    out["gc"] = {f"gen{gen}": summary([g[1] for g in gcs if g[2] == gen]) for gen in (0, 1, 2)}
    out["gc_threads"] = sorted({g[4] for g in gcs})
    out["gen2_walked_objects"] = [g[5] for g in gcs if g[2] == 2 and len(g) > 5]
    out["frozen_objects"] = max((g[6] for g in gcs if len(g) > 6), default=0)
    for kind in ("loop_turn", "commit", "fdatasync", "checkpoint", "checkpoint_on_writer", "answer", "db_sync"):
        out[kind] = summary([e[1] for e in events[kind]])
    for mode in sorted({e[2] for e in events["checkpoint"] if len(e) > 2}):
        spans = [e for e in events["checkpoint"] if len(e) > 2 and e[2] == mode]
        out[f"checkpoint {mode}"] = summary([e[1] for e in spans])
        # CPU of the thread that ran them (the copying), per request served.
        out[f"checkpoint {mode}"]["cpu_us_per_request"] = round(
            sum(e[-1] for e in spans) / max(len(requests), 1) * 1e6, 1)
    turns = events["run_functions"]
    out["items_per_batch"] = statistics.mean(e[2] for e in turns) if turns else 0
    out["answers_per_s"] = len(events["answer"]) / (last - first)
    out["lag_ms"] = summary([e[1] for e in events["lag"]])
    out.update(hand_offs(events))
    out["slow_fdatasyncs"] = slow_syncs(events)
    out["slow"] = overlaps(slow, events, gcs)
    out["all"] = overlaps(requests, events, gcs)
    return out


def timeline(events: dict[str, list], first: float, last: float, step: float) -> list[dict]:
    """Per `step` seconds from the server's first request to the end of the measured run
    (warm-up included, seconds counted from the measured run's start): requests, the
    server's p99, the longest fdatasync, the checkpoints' time, the collections by generation
    and the loop's longest lag, to see what the first seconds after a start hold."""
    requests = [tuple(r) for r in events["request"]]
    if not requests:
        return []
    start = min(r[0] for r in requests)
    buckets: dict[int, dict] = {}

    def bucket(at: float) -> dict | None:
        if at < start or at > last:
            return None
        n = int((at - start) // step)
        return buckets.setdefault(n, {"t_s": round(start + n * step - first, 1), "durations": [],
                                      "fdatasync_max_ms": 0.0, "checkpoint_ms": 0.0, "gc": [0, 0, 0],
                                      "gc_ms": 0.0, "lag_max_ms": 0.0})
    for at, seconds, *_ in requests:
        if (b := bucket(at)) is not None:
            b["durations"].append(seconds)
    for at, seconds, *_ in events["fdatasync"]:
        if (b := bucket(at)) is not None:
            b["fdatasync_max_ms"] = max(b["fdatasync_max_ms"], seconds * 1000)
    for at, seconds, *_ in events["checkpoint"]:
        if (b := bucket(at)) is not None:
            b["checkpoint_ms"] += seconds * 1000
    for at, seconds, generation, *_ in events["gc"]:
        if (b := bucket(at)) is not None:
            b["gc"][generation] += 1
            b["gc_ms"] += seconds * 1000
    for at, lag in events["lag"]:
        if (b := bucket(at)) is not None:
            b["lag_max_ms"] = max(b["lag_max_ms"], lag * 1000)
    out = []
    for n in sorted(buckets):
        b = buckets[n]
        durations = sorted(b.pop("durations"))
        b["requests"] = len(durations)
        b["p99_ms"] = round(pct(durations, 0.99) * 1000, 2) if durations else 0.0
        for key in ("fdatasync_max_ms", "checkpoint_ms", "gc_ms", "lag_max_ms"):
            b[key] = round(b[key], 2)
        out.append(b)
    return out


def slow_with_collections(events: dict[str, list], first: float, last: float) -> dict:
    """Each collection by generation beside the requests at or above the server's p99: how
    many collections there were, how many of them overlapped a slow request, and the share
    of slow requests each generation overlapped."""
    requests = [tuple(r) for r in events["request"] if first <= r[0] <= last]
    gcs = [tuple(g) for g in events["gc"] if first <= g[0] <= last]
    durations = sorted(r[1] for r in requests)
    p99 = durations[int(len(durations) * 0.99)]
    slow = sorted((r[0], r[0] + r[1]) for r in requests if r[1] >= p99)
    out = {}
    for generation in (0, 1, 2):
        spans = [(g[0], g[0] + g[1]) for g in gcs if g[2] == generation]
        hit_gc = sum(any(s < e2 and s2 < e for s2, e2 in slow) for s, e in spans)
        hit_slow = sum(any(s < e2 and s2 < e for s, e in spans) for s2, e2 in slow)
        out[f"gen{generation}"] = {"collections": len(spans), "overlapping a slow request": hit_gc,
                                   "slow requests overlapped": hit_slow, "slow requests": len(slow)}
    return out


def slow_syncs(events: dict[str, list]) -> dict:
    """The WAL's fdatasyncs at or above their p99 beside the checkpoint thread's work: the
    share that overlapped a PASSIVE (its copy, and SQLite's own sync of the database file
    when it reaches the WAL's end) or the database file's fdatasync after one, against the
    same share of all fdatasyncs."""
    syncs = events["fdatasync"]
    if not syncs:
        return {}
    p99 = sorted(e[1] for e in syncs)[int(len(syncs) * 0.99)]
    out = {"p99_ms": round(p99 * 1000, 3)}
    for name, spans in (("passive", events["checkpoint"]), ("database fdatasync", events["db_sync"])):
        spans = sorted(spans)
        for label, chosen in (("slow", [e for e in syncs if e[1] >= p99]), ("all", syncs)):
            hit = sum(overlap(spans, e[0], e[0] + e[1]) > 0 for e in chosen)
            out[f"{label} overlapping a {name}"] = round(hit / len(chosen), 3)
    return out


def hand_offs(events: dict[str, list]) -> dict:
    """What the two hand-offs of a batch cost it in waiting: from the end of its COMMIT to the
    start of its fdatasync, counted only when the sync thread had nothing to do (no fdatasync
    running, so it was waiting for this one), and from the end of the sync thread's answer to
    the loop running it."""
    import bisect
    syncs = sorted((e[0], e[0] + e[1]) for e in events["fdatasync"])
    starts = [start for start, _ in syncs]
    to_sync = []
    for start, seconds, *_ in events["commit"]:
        end = start + seconds
        at = bisect.bisect_left(starts, end)
        if at == len(starts) or (at > 0 and syncs[at - 1][1] > end):
            continue                      # the sync thread was busy: the batch waited for the disk
        to_sync.append(starts[at] - end)
    answers = sorted(e[0] + e[1] for e in events["answer"] if len(e) > 3 and str(e[3]).startswith("sqlite-sync"))
    settles = sorted(e[0] for e in events["settle"])
    to_loop = []
    for end in answers:
        at = bisect.bisect_left(settles, end)
        if at < len(settles):
            to_loop.append(settles[at] - end)
    return {"hand_off_to_sync": summary(to_sync), "hand_off_to_loop": summary(to_loop)}


def overlaps(requests: list, events: dict[str, list], gcs: list) -> dict:
    """Per request, the mean ms of each kind of event inside its span, and the share of the
    requests that overlapped at least one (gen 2 collections; checkpoints; fdatasyncs > 5 ms)."""
    kinds = {
        "gc gen0 (ms)": [g for g in gcs if g[2] == 0],
        "gc gen1 (ms)": [g for g in gcs if g[2] == 1],
        "gc gen2 (ms)": [g for g in gcs if g[2] == 2],
        "loop turns: write batches on the loop (ms)": events["loop_turn"],
        "fdatasync (ms)": events["fdatasync"],
        "checkpoint on the write turn (ms)": events["checkpoint_on_writer"],
        "checkpoint, any (ms)": events["checkpoint"],
        "database file's fdatasync after a PASSIVE (ms)": events["db_sync"],
    }
    out: dict = {}
    for name, spans in kinds.items():
        spans = sorted(spans)
        total, hit = 0.0, 0
        for start, seconds, *_ in requests:
            inside = overlap(spans, start, start + seconds)
            total += inside
            hit += inside > 0
        out[name] = round(total / len(requests) * 1000, 3)
        out[name.replace("(ms)", "share overlapped")] = round(hit / len(requests), 3)
    lags = sorted(events["lag"])
    out["max loop lag inside (ms, mean)"] = round(statistics.mean(
        max((lag for at, lag in window(lags, s, s + d)), default=0.0) for s, d, *_ in requests) * 1000, 3)
    out["request ms (mean)"] = round(statistics.mean(r[1] for r in requests) * 1000, 3)
    return out


def overlap(spans: list, start: float, end: float) -> float:
    import bisect
    total = 0.0
    at = max(bisect.bisect_left(spans, (start - 1.0,)), 0)
    for span in spans[at:]:
        if span[0] > end:
            break
        total += max(0.0, min(end, span[0] + span[1]) - max(start, span[0]))
    return total


def window(points: list, start: float, end: float):
    import bisect
    at = bisect.bisect_left(points, (start,))
    for point in points[at:]:
        if point[0] > end:
            break
        yield point


def summary(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    values = sorted(values)
    return {"count": len(values), "mean_ms": round(statistics.mean(values) * 1000, 3),
            "p99_ms": round(pct(values, 0.99) * 1000, 3), "max_ms": round(values[-1] * 1000, 3),
            "total_ms": round(sum(values) * 1000, 1)}


def pct(values: list[float], fraction: float) -> float:
    return values[min(int(len(values) * fraction), len(values) - 1)]


def wal_resets(db: Path) -> int:
    """The WAL header's checkpoint sequence number: SQLite counts one more each time the WAL
    starts again from its beginning, after a RESTART or TRUNCATE or by itself at a write."""
    try:
        with open(f"{db}-wal", "rb") as wal:
            header = wal.read(16)
    except FileNotFoundError:
        return 0
    return int.from_bytes(header[12:16], "big") if len(header) == 16 else 0


def run(tree: Path, rate: float, members: int, seconds: int, label: str, warm_up: float = 3,
        step: float = 0) -> dict:
    sys.path.insert(0, str(HERE.parent))
    from benchmarks import gen_members, receipts
    from benchmarks.run import DATA, ROOT, VENV_BIN, Server, copy_database, measured, server_config, wrk
    DATA.mkdir(parents=True, exist_ok=True)
    templates = DATA / "receipts.txt"
    receipts.generate(templates)
    source = DATA / f"members-{members}.db"
    gen_members.generate(source, members)
    db = DATA / f"tail-{label}.db"
    copy_database(source, db)
    config = server_config(DATA / f"tail-{label}.yaml", db, tree / "rules" / "programs" / "market", members=members)
    out = DATA / f"tail-{label}.json"
    argv = [str(VENV_BIN / "python"), str(HERE / "tail_probe.py"), "--serve", str(config), str(out)]
    with Server(f"tail-{label}", argv, tree=tree, ready=True) as server:
        if warm_up:
            wrk(templates, members, warm_up)
        threads0 = server.thread_cpu()
        resets0 = wal_resets(db)
        first = time.perf_counter()
        result, _ = measured(server, lambda: wrk(templates, members, seconds, rate=rate))
        last = time.perf_counter()
        resets1 = wal_resets(db)
        threads1 = server.thread_cpu()
    n = max(result["requests"], 1)
    (DATA / f"tail-{label}.span").write_text(f"{first} {last}")
    events = json.loads(out.read_text())
    analysis = analyse(events, first, last)
    analysis["collections_beside_slow"] = slow_with_collections(events, first, last)
    if step:
        analysis["timeline"] = timeline(events, first, last, step)
    if events.get("survivors"):
        analysis["young"] = [[round(at - first, 1), n, kinds] for at, n, kinds in events["survivors"]]
    analysis["wrk_ms"] = {q: result["latency_us"][q] / 1000 for q in ("p50", "p99", "p999")}
    analysis["rps"] = result["rps"]
    # Those the write turn's RESTART did not make: the WAL started again by itself.
    restarts = analysis.get("checkpoint RESTART", {}).get("count", 0)
    analysis["wal_resets"] = {"all": resets1 - resets0, "by_restart": restarts,
                              "by_itself": resets1 - resets0 - restarts}
    analysis["cpu_us_per_request"] = result["cpu_us_per_request"]
    analysis["thread_cpu_us"] = {k: round((threads1[k] - threads0.get(k, 0)) / n * 1e6) for k in threads1}
    return analysis


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        raise SystemExit(serve(sys.argv[2], sys.argv[3]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=450)
    parser.add_argument("--members", type=int, default=10_000)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--tree", type=Path, default=HERE.parent)
    parser.add_argument("--label", default="probe")
    parser.add_argument("--warm-up", type=float, default=3,
                        help="seconds at full load before the measured run (0: none, measure from the start)")
    parser.add_argument("--timeline", type=float, default=0, metavar="STEP",
                        help="also per STEP seconds: requests, p99, longest fdatasync, checkpoints, collections")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}")
    result = run(args.tree.resolve(), args.rate, args.members, args.seconds, args.label, args.warm_up,
                 args.timeline)
    print(json.dumps(result, indent=1))
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
