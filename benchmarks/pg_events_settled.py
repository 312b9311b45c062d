"""What the events pull's settled ids cost the writers on PostgreSQL (storage/events.py
Settled, p011's trigger): transactions that write one event each, as a receipt does, from
several threads, the rest of each transaction after its event stood in for by a sleep.

First an event's INSERT statement alone, looped inside PostgreSQL in one transaction, the
trigger disabled and enabled in turn: the trigger's own cost. Then rounds alternate three ways: the writers' lock's trigger disabled (as before p011), enabled,
and enabled with a warehouse pulling (settle, then a page of 100) every --pull-gap-ms. For
each it prints transactions/s, PostgreSQL CPU µs per transaction and the writers' latency
(median, p99, max), and for the pulls how long settling took (median, max) and how often
it gave up waiting (storage.events.SETTLE_WAIT_MS).

    PYTHONPATH=. .venv/bin/python benchmarks/pg_events_settled.py [--transactions 2000] [--rounds 3]

Needs Debian's postgresql (the throwaway cluster of tests/pg_cluster.py).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from pg_cluster import Cluster  # noqa: E402
from pg_rounds import ClusterCpu, alternate, throwaway_database  # noqa: E402

from storage import events  # noqa: E402
from storage.pg.connection import connect  # noqa: E402
from storage.pg.database import PgDatabase, read_only  # noqa: E402

NOW = datetime.fromisoformat("2026-11-24T09:00:00+02:00")
MODES = ("lock off", "lock on", "lock on, pulling")


def write(conn, count: int, hold_s: float, latencies: list[float]) -> None:
    for n in range(count):
        started = time.perf_counter()
        conn.execute("BEGIN")
        events.emit(conn, "birthday", n % 500 + 1, {"date": "2026-11-24"}, NOW)
        if hold_s:
            time.sleep(hold_s)
        conn.execute("COMMIT")
        latencies.append(time.perf_counter() - started)


def pull(conn, gap_s: float, stop: threading.Event, settle_s: list[float], gave_up: list[int]) -> None:
    upto, after = 0, 0
    while not stop.is_set():
        started = time.perf_counter()
        now = read_only(conn, events.settled_now)        # as Settled.settle, timed
        settle_s.append(time.perf_counter() - started)
        if now is None:
            gave_up.append(1)
        upto = max(upto, now or 0)
        page = read_only(conn, lambda c: events.page(c, after, 100, upto))
        after = page[-1]["id"] if page else after
        time.sleep(gap_s)


def set_lock(url: str, on: bool) -> None:
    admin = connect(url)
    admin.execute(f"ALTER TABLE events {'ENABLE' if on else 'DISABLE'} TRIGGER events_writers_lock")
    admin.close()


def statement_us(url: str, on: bool, count: int) -> float:
    """µs per event INSERT statement run inside PostgreSQL (a DO block's loop), in one
    transaction rolled back: the trigger's own cost, without the client, a commit's flush
    or other sessions."""
    set_lock(url, on)
    conn = connect(url)
    try:
        conn.execute("BEGIN")
        started = time.perf_counter()
        conn.execute(f"DO $$ BEGIN FOR i IN 1..{count} LOOP INSERT INTO events (type, member_id, occurred_at, data, "
                     "created_at) VALUES ('birthday', i % 500 + 1, '2026-11-24T07:00:00Z', '\\x7b7d', "
                     "'2026-11-24T07:00:00Z'); END LOOP; END $$")
        elapsed = time.perf_counter() - started
        conn.execute("ROLLBACK")
    finally:
        conn.close()
    return elapsed / count * 1e6


def measure(url: str, cluster: Cluster, mode: str, args) -> tuple[float, float, list[float], list[float], int]:
    set_lock(url, mode != "lock off")
    latencies: list[float] = []
    settle_s: list[float] = []
    gave_up: list[int] = []
    stop = threading.Event()
    each = args.transactions // args.threads
    # Connected before the meter starts and closed after it stops: ClusterCpu reads the
    # backends alive.
    conns = [connect(url) for _ in range(args.threads + 1)]
    writers = [threading.Thread(target=write, args=(conn, each, args.hold_ms / 1000, latencies))
               for conn in conns[1:]]
    puller = threading.Thread(target=pull, args=(conns[0], args.pull_gap_ms / 1000, stop, settle_s, gave_up))
    meter = ClusterCpu(cluster)
    meter.start()
    started = time.perf_counter()
    if mode == "lock on, pulling":
        puller.start()
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    elapsed = time.perf_counter() - started
    pg_s = meter.stop()
    stop.set()
    if puller.is_alive():
        puller.join()
    for conn in conns:
        conn.close()
    done = each * args.threads
    return done / elapsed, pg_s / done * 1e6, latencies, settle_s, len(gave_up)


def progress(mode: str, result) -> None:
    rate, pg, lat, settle, gave_up = result
    print(f"  {mode}: {rate:,.0f} tx/s, PostgreSQL {pg:.0f} µs/tx, latency p50 {ms(lat, 0.5)} p99 {ms(lat, 0.99)} "
          f"max {ms(lat, 1)} ms; settle p50 {ms(settle, 0.5)} max {ms(settle, 1)} ms, gave up {gave_up}/{len(settle)}",
          flush=True)


def ms(values: list[float], q: float) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--transactions", type=int, default=2000, help="a round's, over all threads")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hold-ms", type=float, default=2.0, help="the rest of a transaction after its event")
    ap.add_argument("--pull-gap-ms", type=float, default=50.0)
    args = ap.parse_args()
    with throwaway_database() as (cluster, url):
        PgDatabase(url).open()      # migrations
        inserts = alternate({on: (lambda on=on: statement_us(url, on, args.transactions * 10)) for on in (False, True)},
                            args.rounds)
        rows = alternate({mode: (lambda mode=mode: measure(url, cluster, mode, args)) for mode in MODES}, args.rounds,
                         each=progress)
        print(f"\nAn event's INSERT statement inside PostgreSQL, {args.transactions * 10} in one transaction, median of "
              f"{args.rounds}: lock off {statistics.median(inserts[False]):.0f} µs, "
              f"lock on {statistics.median(inserts[True]):.0f} µs")
        print(f"\n{args.transactions} transactions x {args.rounds} rounds, {args.threads} threads, "
              f"{args.hold_ms} ms after the event, a pull every {args.pull_gap_ms} ms; medians of the rounds\n")
        print("| writers' lock | tx/s | PostgreSQL CPU µs/tx | latency p50 ms | p99 ms | max ms | settle p50 ms "
              "| settle max ms |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for mode, results in rows.items():
            rate = statistics.median(r[0] for r in results)
            pg = statistics.median(r[1] for r in results)
            cols = [statistics.median(float(ms(r[2], q)) for r in results) for q in (0.5, 0.99, 1)]
            settle = [ms(sum((r[3] for r in results), []), q) for q in (0.5, 1)]
            print(f"| {mode} | {rate:,.0f} | {pg:.0f} | {cols[0]:.1f} | {cols[1]:.1f} | {cols[2]:.1f} | "
                  f"{settle[0]} | {settle[1]} |")

if __name__ == "__main__":
    main()
