"""`make bench`: the servers, the load, the table and benchmarks/RESULTS.md in one run.

    PYTHONPATH=. python benchmarks/run.py [--members 10000,1000000] [--duration 15] [--pg-only]

Environment: BENCH_MEMBERS (comma list, default 10000,1000000; add 14000000 for the
full-size run, which first generates about 33 GB once, in about an hour), BENCH_DURATION (seconds of each
measured run), BENCH_PROFILE=0 to skip the profile, BENCH_PG=0 to skip the PostgreSQL rows
(BENCH_PG_MEMBERS, default 10000, and BENCH_PG_ROUNDS, default 3, size them).

What runs, side by side in one invocation, on a 2-core machine: every server is pinned to
core 0 and wrk to core 1 (one thread, 32 connections), so ratios between rows are
comparable even when absolute numbers drift with the machine's other tenants.

1. the driver's own ceiling: wrk + load.lua against a trivial asyncio responder;
2. the ceiling: a bare aiohttp handler decoding the same receipt JSON with msgspec;
3. per member count, the real server (`loyalty serve`, one process) with the market
   program and with a generated 300-rule program: the most it confirms at full load,
   then fixed-rate runs at 50% and 90% of that for the latency distribution;
4. py-spy on the real server at full load (market program, largest member count);
5. PostgreSQL beside SQLite (without PostgreSQL installed, a line saying so): the market
   program on SQLite with one server process, on PostgreSQL with one and with two on one
   database (wrk against each), full load, the three in turns for BENCH_PG_ROUNDS rounds:
   confirmed receipts/s, p50/p99, and CPU µs per confirmed receipt of each server process
   and of PostgreSQL (every process of the cluster, from /proc). A few minutes.

Everything it writes goes to benchmarks/data/ (ignored by git; BENCH_DATA to put it
elsewhere) except RESULTS.md. Text
in RESULTS.md below the line "<!-- notes -->" is kept across runs.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from tabulate import tabulate

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "benchmarks"
# BENCH_DATA: elsewhere (the benchmark's smoke test runs it in a temporary folder).
DATA = Path(os.environ.get("BENCH_DATA", HERE / "data"))
VENV_BIN = Path(sys.executable).parent
SERVER_CPU, DRIVER_CPU = "0", "1"
KEY, MONITOR_KEY = "bench-register-key", "bench-monitor-key"
PORT = int(os.environ.get("BENCH_PORT", "18090"))
NOTES_MARK = "<!-- notes -->"

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from benchmarks import gen_members, gen_rules, receipts  # noqa: E402
from benchmarks.pg_rounds import ClusterCpu, alternate, medians  # noqa: E402
from pg_cluster import BIN_GLOB, Cluster, bin_dir, running  # noqa: E402


def log(message: str) -> None:
    print(f"[bench {datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------ servers

THREAD_KINDS = ("loop", "writer", "sync", "checkpoint")


class Server:
    def __init__(self, name: str, argv: list[str], tree: Path = ROOT, pin: bool = True, ready: bool = False,
                 port: int = PORT):
        """ready: also wait for /readyz (a loyalty server preloading its cache says 503 until done)."""
        self.name, self.argv, self.tree, self.pin, self.ready, self.port = name, argv, tree, pin, ready, port
        self.proc: subprocess.Popen | None = None
        self.log_path = DATA / f"server-{name}.log"
        self.ready_s = 0.0

    def __enter__(self) -> "Server":
        env = {**os.environ, "PYTHONPATH": str(self.tree)}
        self.log_file = self.log_path.open("wb")
        pinning = ["taskset", "-c", SERVER_CPU] if self.pin else []
        self.proc = subprocess.Popen([*pinning, *self.argv], cwd=self.tree, env=env,
                                     stdout=self.log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1):
                    break
            except OSError:
                time.sleep(0.2)
        else:
            raise RuntimeError(f"{self.name} did not answer /healthz; see {self.log_path}")
        if self.ready:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        started = time.monotonic()
        while time.monotonic() - started < READY_SECONDS_MAX:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited while starting; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=5):
                    self.ready_s = time.monotonic() - started
                    return
            except OSError:     # 503 while preloading (HTTPError is an OSError)
                time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {READY_SECONDS_MAX:.0f}s; see {self.log_path}")

    def __exit__(self, *exc) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log_file.close()

    def cpu_seconds(self) -> float:
        """The server's CPU time (utime + stime), all its threads."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def thread_cpu(self) -> dict[str, float]:
        """CPU seconds per thread: the event loop (main), the writer, the sync thread, the
        checkpointer (started in that order), the readers."""
        tick = os.sysconf("SC_CLK_TCK")
        tasks = sorted(int(t.name) for t in Path(f"/proc/{self.proc.pid}/task").iterdir())
        out: dict[str, float] = {}
        for position, tid in enumerate(tasks):
            try:
                fields = Path(f"/proc/{self.proc.pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # storage.db starts its threads in this order; readers come later, on demand.
            kind = THREAD_KINDS[position] if position < len(THREAD_KINDS) else "reader"
            out[kind] = out.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / tick
        return out

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")


# The write connection's cache per million members: the b-trees storage/preload.py reads
# came to 519 MiB per million generated members (dbstat); the rest is room for the pages
# a run appends (new lots, postings and receipts).
CACHE_MIB_PER_MILLION_MEMBERS = 640
CACHE_MIB_MIN = 64
# Preloading 14 million members reads ~7 GB, much of it in random order on this disk.
READY_SECONDS_MAX = 3600.0


def cache_mib(members: int) -> int:
    return max(CACHE_MIB_MIN, -(-members * CACHE_MIB_PER_MILLION_MEMBERS // 1_000_000))


def server_config(path: Path, db: Path | str, rules_dir: Path, members: int = 10_000,
                  cache: bool = True, port: int = PORT) -> Path:
    """A server whose write connection's cache holds `members` members, read at start
    (cache=False: a revision from before database.cache_mib, which refuses the keys). db is
    the SQLite file, or a PostgreSQL URL (database.url, whose server has no such cache)."""
    sha = lambda key: hashlib.sha256(key.encode()).hexdigest()  # noqa: E731
    if isinstance(db, str):
        database = {"url": db}
    else:
        database = {"path": str(db), **({"cache_mib": cache_mib(members), "preload": True} if cache else {})}
    config = {
        "server": {"host": "127.0.0.1", "port": port, "max_body_bytes": 1048576},
        "database": database,
        "rules": {"dir": str(rules_dir), "watch": False},
        "auth": {"keys": [
            {"id": "bench-register", "sha256": sha(KEY), "role": "register", "stores": ["S001", "S002", "F001"]},
            {"id": "bench-monitor", "sha256": sha(MONITOR_KEY), "role": "monitor"},
        ]},
        # The generated members' cards are HMACs under this key; one key sends everything,
        # so its rate limit must not be what is measured.
        "privacy": {"hmac_key": gen_members.BENCH_HMAC_KEY},
        "limits": {"requests_per_second_per_key": 1_000_000, "burst": 10_000_000},
        # A generated database is a bulk import: its first expiry run would post every lot
        # that expired in the generated history (~100,000 postings per million members) while
        # the receipts are measured. Production runs the jobs all along, a day's worth at a time.
        "jobs": {"enabled": False},
    }
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    return path


def metrics() -> dict[str, float]:
    request = urllib.request.Request(f"http://127.0.0.1:{PORT}/metrics",
                                     headers={"Authorization": f"Bearer {MONITOR_KEY}"})
    out: dict[str, float] = {}
    with urllib.request.urlopen(request, timeout=5) as answer:
        for line in answer.read().decode().splitlines():
            m = re.match(r"^(loyalty_(?:rules_evaluation_seconds|ledger_commit_batch_size|ledger_commit_seconds)"
                         r"_(?:sum|count)) (\S+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
    return out


# ------------------------------------------------------------------ load

RUN_NO = [0]


def wrk(templates: Path, members: int, seconds: float, rate: float = 0, connections: int = 32,
        port: int = PORT) -> dict:
    return wrk_result(wrk_start(templates, members, seconds, rate, connections, port))


def wrk_start(templates: Path, members: int, seconds: float, rate: float = 0, connections: int = 32,
              port: int = PORT) -> subprocess.Popen:
    """wrk under way against the server on `port`; wrk_result() waits for its numbers."""
    RUN_NO[0] += 1
    tag = f"b{int(time.time())}x{RUN_NO[0]}"
    argv = ["taskset", "-c", DRIVER_CPU, "wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", "--timeout", "10s",
            "-s", str(HERE / "load.lua"), f"http://127.0.0.1:{port}", "--", str(templates), str(members), tag, KEY,
            str(rate)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wrk_result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate()
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, proc.args, out, err)
    for line in out.splitlines():
        if line.startswith("BENCH_JSON "):
            result = json.loads(line[len("BENCH_JSON "):])
            seconds_run = result["duration_us"] / 1e6
            result["rps"] = result["requests"] / seconds_run
            result["confirmed_rps"] = result["ok_receipt"] / seconds_run
            result["seconds"] = seconds_run
            return result
    raise RuntimeError(f"wrk printed no result:\n{out}")


def measured(server: Server, run) -> tuple[dict, float]:
    """Runs `run()` and returns its result with the server's CPU microseconds per request."""
    cpu_before = server.cpu_seconds()
    result = run()
    cpu = server.cpu_seconds() - cpu_before
    result["cpu_us_per_request"] = cpu / max(result["requests"], 1) * 1e6
    result["cpu_share"] = cpu / result["seconds"]
    return result, cpu


# ------------------------------------------------------------------ profile

# (stage, thread, function names); a sample goes to the stage of the innermost function
# on its stack that names one.
STAGES = [
    ("rules: evaluate", "loop", {"evaluate"}),
    ("request: msgspec decode", "loop", {"decode"}),
    ("receipt checks", "loop", {"check_receipt"}),
    ("fingerprint: canonical JSON + sha256", "loop", {"canonical", "sha256"}),
    ("answer: from the plan, JSON encode", "loop", {"receipt_answer", "confirm_answer", "calculate_answer",
                                                    "json_reply"}),
    ("auth", "loop", {"authenticate"}),
    ("metrics (prometheus_client)", "loop", {"observe", "inc", "labels"}),
    # The receipt's read runs inside its write function on the loop; innermost look-up wins.
    ("read: member state, tier facts", "loop", {"read_member_state", "member_facts", "tier_view"}),
    ("read: budgets", "loop", {"budget_left", "rule_totals"}),
    ("read: receipt already confirmed?", "loop", {"get_receipt"}),
    ("read: card -> member", "loop", {"member_by_card", "member_by_id"}),
    ("read: tier (receipt_counts)", "loop", {"receipt_counts"}),
    ("read: lots, holds, balance", "loop", {"lots_of", "balance_of", "open_holds", "hold_member"}),
    ("read: rule usage", "loop", {"rule_usage"}),
    ("plan: lots, postings, line records", "loop", {"plan_confirm", "plan_calculate", "build"}),
    # Write functions and their COMMIT run on the loop; the writer thread takes long writes only.
    ("write: SAVEPOINTs, batch", "loop", {"_loop_turn", "_run_functions", "_run_item", "_run_group",
                                          "_plan_and_apply"}),
    ("write: apply the plans (holds, expiry marks)", "loop", {"apply_confirms", "_postings", "close_holds"}),
    ("write: postings (hash chain)", "loop", {"post", "append_postings"}),
    ("write: lots", "loop", {"new_lot", "new_lots"}),
    ("write: receipt rows (zstd), line records", "loop", {"insert_receipts", "receipt_row", "with_lots"}),
    ("write: rule fires", "loop", {"record_fires"}),
    ("write: COMMIT (WAL frames), passing the turn", "loop", {"_commit_and_answer"}),
    ("sync: fdatasync of the WAL, answering", "sync", {"_syncer_main"}),
    ("reader thread (reads off the loop)", "reader", {"_run_read"}),
    ("checkpoint thread", "checkpoint", {"_checkpoint_main"}),
]
# Leaves where a thread waits rather than works (py-spy counts some of them as active).
IDLE = re.compile(r"^(\S+\.)?(select|_worker|wait|get) \((selectors|concurrent/futures/thread|threading|queue)\.py")


def frame_name(frame: str) -> str:
    return frame.split(" (", 1)[0].rsplit(".", 1)[-1]


def thread_kind(stack: list[str]) -> str:
    names = {frame_name(frame) for frame in stack}
    if "_writer_main" in names:
        return "writer"
    if "_syncer_main" in names:
        return "sync"
    if "_checkpoint_main" in names:
        return "checkpoint"
    if "_run_read" in names:
        return "reader"
    if "run_forever" in names or "run_app" in names or any("server/" in frame for frame in stack):
        return "loop"  # coroutine frames sometimes show without the loop under them
    return "other"


def profile(server: Server, templates: Path, members: int, seconds: int) -> dict:
    out = DATA / "profile.raw.txt"
    spy = pyspy_record(server, out, seconds)
    if spy is None:
        return {"error": "py-spy not installed"}
    threads_before = server.thread_cpu()
    result, _ = measured(server, lambda: wrk(templates, members, seconds - 2))
    threads_after = server.thread_cpu()
    result["thread_cpu_us"] = {kind: (threads_after.get(kind, 0) - threads_before.get(kind, 0)) / result["requests"] * 1e6
                               for kind in threads_after}
    spy.wait(60)
    if not out.exists():
        return {"error": spy.stderr.read().decode()[-500:]}
    return {**summarize_profile(out), "run": result}


def pyspy_record(server: Server, out: Path, seconds: int) -> subprocess.Popen | None:
    """py-spy sampling the server for `seconds` into `out` (raw stacks), started and given a
    second to attach; None if py-spy is not installed."""
    pyspy = shutil.which("py-spy", path=str(VENV_BIN)) or shutil.which("py-spy")
    if not pyspy:
        return None
    spy = subprocess.Popen([pyspy, "record", "--pid", str(server.proc.pid), "--rate", "250", "--duration",
                            str(seconds), "--format", "raw", "--nonblocking", "--output", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1)
    return spy


def summarize_profile(out: Path) -> dict:
    by_stage: collections.Counter = collections.Counter()
    by_leaf: collections.Counter = collections.Counter()
    by_kind: collections.Counter = collections.Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack_text, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        count = int(count)
        stack = [frame.strip() for frame in stack_text.split(";") if frame.strip()]
        if not stack or IDLE.match(stack[-1]):
            continue
        kind = thread_kind(stack)
        total += count
        by_kind[kind] += count
        by_leaf[stack[-1]] += count
        stage = f"{kind}: everything else"
        if kind == "loop" and any(frame_name(f) == "_handle" and "aiohttp" in f for f in stack):
            stage = "loop: aiohttp, handler glue, asyncio"
        names = [frame_name(frame) for frame in stack]
        found = False
        for name in reversed(names):  # the innermost stage wins
            for stage_name, want, functions in STAGES:
                if want == kind and name in functions:
                    stage, found = stage_name, True
                    break
            if found:
                break
        if kind == "loop" and not found and not any("aiohttp" in f for f in stack):
            stage = "loop: asyncio event loop, other"
        elif kind == "loop" and not found:
            stage = "loop: aiohttp HTTP parse/respond, handler glue"
        by_stage[stage] += count
    return {"samples": total, "by_stage": by_stage.most_common(), "by_leaf": by_leaf.most_common(15),
            "by_kind": by_kind.most_common()}


# ------------------------------------------------------------------ PostgreSQL beside SQLite

# The market program at the smallest member count keeps the copy into PostgreSQL (about half
# a minute for 10,000 members) and the rounds within a few minutes; the CPU per receipt compared does
# not depend on the member count while everything fits in memory.
PG_MEMBERS = 10_000
PG_ROUNDS = 3
PG_SHAPES = ("SQLite, one process", "PostgreSQL, one process", "PostgreSQL, two processes")


def pg_comparison(templates: Path, rules_dir: Path, members: int, seconds: int, rounds: int) -> dict:
    """SQLite with one server process, PostgreSQL with one and with two on one database, at
    full load, the three taking turns round by round. PostgreSQL is a throwaway cluster
    (tests/pg_cluster.py: fsync and synchronous_commit on, as installed) filled with the
    generated members through `loyalty migrate sqlite-to-postgres`; the SQLite server runs on
    the copy that went over."""
    bins = bin_dir()
    if bins is None:
        return {"skipped": f"PostgreSQL is not installed (no initdb under {BIN_GLOB})"}
    source = DATA / f"members-{members}.db"
    gen_members.generate(source, members)
    db = DATA / f"pg-sqlite-{source.name}"
    drop_database(db)
    shutil.copyfile(source, db)
    try:
        with running(Cluster(bins)) as cluster, contextlib.ExitStack() as stack:
            url = cluster.url(cluster.createdb())
            log(f"PostgreSQL: copying {members:,} members from {db.name} (loyalty migrate sqlite-to-postgres)")
            started = time.monotonic()
            subprocess.run([str(VENV_BIN / "loyalty"), "migrate", "sqlite-to-postgres", "--from", str(db), "--to", url],
                           check=True, capture_output=True)
            copied_s = time.monotonic() - started
            analyze(url)
            servers = [stack.enter_context(compared_server(name, database, port, rules_dir, members))
                       for name, database, port in (("sqlite", db, PORT), ("pg-a", url, PORT + 1),
                                                    ("pg-b", url, PORT + 2))]
            for server in servers:
                wrk(templates, members, min(3, seconds), port=server.port)
            meter = ClusterCpu(cluster)
            sqlite, pg_a, pg_b = servers
            shapes = dict(zip(PG_SHAPES, (
                lambda: side_by_side([sqlite], None, templates, members, seconds),
                lambda: side_by_side([pg_a], meter, templates, members, seconds),
                lambda: side_by_side([pg_a, pg_b], meter, templates, members, seconds))))
            results = alternate(shapes, rounds, lambda name, r: log(
                f"{name}: {r['confirmed_rps']:,.0f} confirmed/s, CPU µs/receipt servers "
                f"{' + '.join(f'{us:,.0f}' for us in r['server_us'])}, PostgreSQL {r['pg_us'] or 0:,.0f}, "
                f"load {r['load']:.1f}"))
    finally:
        drop_database(db)
    return {"members": members, "rounds": rounds, "copied_s": copied_s, "results": results,
            "postgresql": bins.parent.name}


def analyze(url: str) -> None:
    """Planner statistics for the copied tables, as after any bulk load: the copy leaves
    none, and until autovacuum's first analyze (a minute or more) a receipt's reads were
    planned without them; a first round measured then confirmed 8 receipts/s, the next 116."""
    import psycopg
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ANALYZE")


def compared_server(name: str, database: Path | str, port: int, rules_dir: Path, members: int) -> Server:
    """A `loyalty serve` of the comparison, on the SQLite file or the PostgreSQL URL `database`."""
    config = server_config(DATA / f"config-compare-{name}.yaml", database, rules_dir, members=members, port=port)
    return Server(f"compare-{name}", [str(VENV_BIN / "loyalty"), "serve", "--config", str(config)],
                  ready=True, port=port)


def side_by_side(servers: list[Server], meter: ClusterCpu | None, templates: Path, members: int,
                 seconds: int) -> dict:
    """One measured run: the 32 connections split evenly over the servers, one wrk each, all
    at once; the CPU of each server and of the cluster per receipt confirmed in all."""
    before = [server.cpu_seconds() for server in servers]
    if meter:
        meter.start()
    runs = [wrk_result(proc) for proc in [wrk_start(templates, members, seconds, connections=32 // len(servers),
                                                    port=server.port) for server in servers]]
    pg_cpu = meter.stop() if meter else None
    cpu = [server.cpu_seconds() - b for server, b in zip(servers, before)]
    confirmed = max(sum(r["ok_receipt"] for r in runs), 1)
    return {
        "confirmed_rps": sum(r["confirmed_rps"] for r in runs),
        # Two drivers' distributions do not merge from their percentiles: the slower one's.
        "p50_ms": max(r["latency_us"]["p50"] for r in runs) / 1000,
        "p99_ms": max(r["latency_us"]["p99"] for r in runs) / 1000,
        "server_us": [c / confirmed * 1e6 for c in cpu],
        "pg_us": pg_cpu / confirmed * 1e6 if meter else None,
        "failed": sum(r["other"] + r["errors"]["timeout"] + r["errors"]["connect"] for r in runs),
        "failed_by": failed_by(runs),
        "load": os.getloadavg()[0],
    }


def failed_by(runs: list[dict]) -> dict[str, int]:
    """What the failed requests of wrk runs were: each status but the expected ones (201,
    200, 422; a 422 counted among "other" is not told apart here) and wrk's own errors."""
    found: collections.Counter = collections.Counter()
    for r in runs:
        found.update({f"status {code}": n for code, n in r["statuses"].items()
                      if str(code) not in ("200", "201", "422")})
        found.update({f"wrk {kind}": n for kind, n in r["errors"].items() if kind in ("timeout", "connect") and n})
    return dict(found)


# ------------------------------------------------------------------ the run

def db_bytes(db: Path) -> int:
    return sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())


# Runs add receipts, postings and lots; run on a fresh copy of the generated database so
# that every run starts from the same one (a 10,000-member database had grown to 1.9 GB
# over repeated runs, and each run measured a bigger one). Bigger ones are used in place:
# copying 33 GB would take longer than the benchmark and double the disk it needs; a run
# adds ~0.4 % to that size.
COPY_BYTES_MAX = 4 * 1024**3


def database_for_runs(generated: Path) -> Path:
    if db_bytes(generated) > COPY_BYTES_MAX:
        return generated
    copy = DATA / f"run-{generated.name}"
    copy_database(generated, copy)
    return copy


def drop_database(db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


def copy_database(source: Path, db: Path) -> None:
    """A fresh copy of a generated database, on disk before a server opens it: left dirty in
    the page cache, the whole copy (24 MB at 10,000 members) was written during the measured
    run, by the server's first sync of its database file or by the kernel 30 s after the copy,
    and every WAL fdatasync of those moments waited for it."""
    drop_database(db)
    shutil.copyfile(source, db)
    fd = os.open(db, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def server_rows(name: str, server: Server, templates: Path, members: int, seconds: int) -> dict:
    log(f"{name}: warm-up")
    wrk(templates, members, 3)
    before = metrics()
    log(f"{name}: full load {seconds}s")
    full, _ = measured(server, lambda: wrk(templates, members, seconds))
    after = metrics()
    row = {"name": name, "full": full}
    n = after.get("loyalty_rules_evaluation_seconds_count", 0) - before.get("loyalty_rules_evaluation_seconds_count", 0)
    if n:
        row["eval_us"] = (after["loyalty_rules_evaluation_seconds_sum"]
                          - before["loyalty_rules_evaluation_seconds_sum"]) / n * 1e6
    commits = after.get("loyalty_ledger_commit_batch_size_count", 0) - before.get("loyalty_ledger_commit_batch_size_count", 0)
    if commits:
        row["batch_mean"] = (after["loyalty_ledger_commit_batch_size_sum"]
                             - before["loyalty_ledger_commit_batch_size_sum"]) / commits
        row["commit_ms"] = (after["loyalty_ledger_commit_seconds_sum"]
                            - before["loyalty_ledger_commit_seconds_sum"]) / commits * 1e3
    for share in (0.5, 0.9):
        rate = full["rps"] * share
        log(f"{name}: fixed rate {rate:,.0f} req/s ({share:.0%} of max) {seconds}s")
        row[share], _ = measured(server, lambda: wrk(templates, members, seconds, rate=rate))
    row["rss_mib"] = server.peak_rss_mib()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", default=os.environ.get("BENCH_MEMBERS", "10000,1000000"))
    parser.add_argument("--duration", type=int, default=int(os.environ.get("BENCH_DURATION", "15")))
    parser.add_argument("--profile", type=int, default=int(os.environ.get("BENCH_PROFILE", "1")))
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--pg", type=int, default=int(os.environ.get("BENCH_PG", "1")),
                        help="0: no PostgreSQL rows")
    parser.add_argument("--pg-members", type=int, default=int(os.environ.get("BENCH_PG_MEMBERS", PG_MEMBERS)))
    parser.add_argument("--pg-rounds", type=int, default=int(os.environ.get("BENCH_PG_ROUNDS", PG_ROUNDS)))
    parser.add_argument("--pg-only", action="store_true",
                        help="only the PostgreSQL comparison, printed; RESULTS.md is left as it is")
    args = parser.parse_args()
    counts = [int(x.replace("_", "")) for x in args.members.split(",") if x.strip()]
    seconds = args.duration
    DATA.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)

    templates = DATA / "receipts.txt"
    made = receipts.generate(templates)
    market = ROOT / "rules" / "programs" / "market"
    if args.pg_only:
        print("\n".join(pg_section(pg_comparison(templates, market, args.pg_members, seconds, args.pg_rounds),
                                   seconds)))
        return 0
    rules300 = gen_rules.generate(DATA / "rules300", 300, started.date())
    python = str(VENV_BIN / "python")
    log(f"receipt bodies: {made}; 300-rule program in {rules300}")

    with Server("trivial", [python, str(HERE / "bare_server.py"), str(PORT), "--trivial"]) as server:
        log("driver ceiling: wrk against a trivial responder")
        wrk(templates, 10_000, 2)
        driver, _ = measured(server, lambda: wrk(templates, 10_000, seconds))
    with Server("bare", [python, str(HERE / "bare_server.py"), str(PORT)]) as server:
        log("ceiling: bare aiohttp + msgspec decode")
        wrk(templates, 10_000, 3)
        bare, _ = measured(server, lambda: wrk(templates, 10_000, seconds))
        # The same fixed rates as the servers below: what latency this machine and driver
        # give a handler that does almost nothing, at half and nine tenths of its maximum.
        for share in (0.5, 0.9):
            log(f"ceiling: fixed rate {bare['rps'] * share:,.0f} req/s ({share:.0%} of max) {seconds}s")
            bare[share], _ = measured(server, lambda: wrk(templates, 10_000, seconds, rate=bare["rps"] * share))
        bare_rss = server.peak_rss_mib()

    per_count = []
    prof = None
    for members in counts:
        source = DATA / f"members-{members}.db"
        log(f"{members:,} members: generating {source} (resumes if stopped)")
        gen_started = time.monotonic()
        added = gen_members.generate(source, members)
        gen_s = time.monotonic() - gen_started
        # The size right after generation is kept beside the database (runs in place add
        # to it); that is the size per million members reported.
        sidecar = Path(f"{source}.generated.json")
        if added or not sidecar.exists():
            sidecar.write_text(json.dumps({"bytes": db_bytes(source), "seconds": gen_s, "complete": added == members}))
        generated = json.loads(sidecar.read_text())
        db = database_for_runs(source)
        entry = {"members": members, "db_bytes": generated["bytes"], "generated": added,
                 "gen_s": gen_s if added else generated["seconds"],
                 "gen_complete": generated.get("complete", False), "copied": db != source, "rows": []}
        for name, rules_dir in (("market", market), ("300 rules", rules300)):
            config = server_config(DATA / f"config-{members}-{name.replace(' ', '')}.yaml", db, rules_dir,
                                   members=members)
            log(f"{name}, {members:,} members: starting, preloading {cache_mib(members):,} MiB of cache")
            with Server(f"{members}-{name.replace(' ', '')}",
                        [str(VENV_BIN / "loyalty"), "serve", "--config", str(config)], ready=True) as server:
                entry.setdefault("preload_s", server.ready_s)
                log(f"{name}, {members:,} members: ready after {server.ready_s:.0f}s")
                before = db_bytes(db)
                row = server_rows(f"{name}, {members:,} members", server, templates, members, seconds)
                confirmed = row["full"]["ok_receipt"] + row[0.5]["ok_receipt"] + row[0.9]["ok_receipt"]
                # At the smallest count, where the CPU rather than the disk bounds the server.
                if args.profile and name == "market" and members == min(counts):
                    log("profile: py-spy at full load")
                    prof = profile(server, templates, members, seconds + 2)
                    prof["members"] = members
                    confirmed += prof.get("run", {}).get("ok_receipt", 0)
            row["bytes_per_receipt"] = (db_bytes(db) - before) / confirmed if confirmed else float("nan")
            entry["rows"].append(row)
        entry["db_bytes_now"] = db_bytes(db)
        if db != source:
            drop_database(db)
        per_count.append(entry)

    comparison = (pg_comparison(templates, market, args.pg_members, seconds, args.pg_rounds) if args.pg
                  else {"skipped": "BENCH_PG=0"})
    text = report(started, seconds, driver, bare, bare_rss, per_count, prof, made, comparison)
    notes = ""
    if args.out.exists() and NOTES_MARK in args.out.read_text():
        notes = args.out.read_text().split(NOTES_MARK, 1)[1]
    args.out.write_text(text + "\n" + NOTES_MARK + (notes or "\n"))
    print(text)
    log(f"wrote {args.out}")
    return 0


# ------------------------------------------------------------------ the report

def lat(result: dict) -> str:
    l = result["latency_us"]
    return f"{l['p50'] / 1000:.1f} / {l['p99'] / 1000:.1f} / {l['p999'] / 1000:.1f}"


def report(started, seconds, driver, bare, bare_rss, per_count, prof, made, comparison) -> str:
    ceiling = bare["confirmed_rps"]
    lines = [
        "# Benchmark results",
        "",
        f"`make bench` on {started:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, Python "
        f"{sys.version.split()[0]}; servers pinned to core {SERVER_CPU}, wrk (1 thread, 32 connections) to core "
        f"{DRIVER_CPU}; {seconds} s per measured run. The machine is shared: compare rows of one run, not runs.",
        "",
        f"Receipt mix: {made['m']} member purchases, {made['r']} with a redemption, {made['u']} with an unknown card "
        f"(422 unknown_card), {made['a']} without a card, 20 lines on average (~2.3 KB); 2% of requests return one "
        "unit of a line of a receipt confirmed earlier.",
        "",
        "## Throughput",
        "",
    ]
    table = [
        ["driver ceiling (wrk + load.lua vs a trivial responder)", "-", f"{driver['rps']:,.0f}", "-", "-", "-",
         f"{driver['cpu_us_per_request']:.0f}", "-"],
        ["ceiling: bare aiohttp + msgspec decode", "-", f"{bare['rps']:,.0f}", f"{ceiling:,.0f}", "100%",
         lat(bare), f"{bare['cpu_us_per_request']:.0f}", f"{bare_rss:.0f}"],
    ]
    for entry in per_count:
        for row in entry["rows"]:
            full = row["full"]
            table.append([row["name"], f"{entry['members']:,}", f"{full['rps']:,.0f}", f"{full['confirmed_rps']:,.0f}",
                          f"{full['confirmed_rps'] / ceiling:.1%}", lat(full), f"{full['cpu_us_per_request']:.0f}",
                          f"{row['rss_mib']:.0f}"])
    lines.append(tabulate(table, headers=["server", "members", "requests/s", "confirmed receipts/s",
                                          "of ceiling", "p50 / p99 / p99.9 ms (full load)",
                                          "server CPU µs/request", "peak RSS MiB"], tablefmt="github"))
    lines += ["", "Confirmed receipts/s counts 201 answers to POST /v1/receipts; requests/s also counts unknown "
              "cards, refused redemptions and returns. The last full-load column is closed-loop (32 connections "
              "always busy), so its latency is queueing, not service time.", "",
              "## Latency at fixed rates", "",
              "wrk sends on a fixed schedule (load.lua `delay()`, a send that falls behind goes out as soon as a "
              "connection is free); latency is measured from the actual send, so it is exact while the server "
              "keeps up (achieved rate = target) and optimistic when it does not.", ""]
    table = []
    rows = [("ceiling: bare aiohttp + msgspec decode", bare)]
    rows += [(row["name"], {"rps": row["full"]["rps"], 0.5: row[0.5], 0.9: row[0.9]})
             for entry in per_count for row in entry["rows"]]
    for name, runs in rows:
        for share in (0.5, 0.9):
            r = runs[share]
            table.append([name, f"{share:.0%}", f"{runs['rps'] * share:,.0f}", f"{r['rps']:,.0f}",
                          f"{r['confirmed_rps']:,.0f}", f"{r['latency_us']['p50'] / 1000:.2f}",
                          f"{r['latency_us']['p99'] / 1000:.2f}", f"{r['latency_us']['p999'] / 1000:.2f}",
                          f"{r['cpu_share']:.0%}", f"{r['cpu_us_per_request']:.0f}"])
    lines.append(tabulate(table, headers=["server", "load", "target req/s", "achieved req/s", "confirmed/s",
                                          "p50 ms", "p99 ms", "p99.9 ms", "server CPU", "CPU µs/request"],
                          tablefmt="github"))
    lines += ["", "Compare the last column with the full-load CPU per request above: on this VM a request "
              "costs more CPU the less busy the server is, the bare handler's included."]
    lines += ["", "## Outcomes, storage and inside the server (full-load runs)", ""]
    table = []
    for entry in per_count:
        for row in entry["rows"]:
            f = row["full"]
            table.append([row["name"], f["ok_receipt"], f["unknown_card"], f["redeem_refused"], f["ok_return"],
                          f["not_found"], f["other"] + f["errors"]["timeout"] + f["errors"]["connect"],
                          f"{row.get('eval_us', float('nan')):.0f}", f"{row.get('batch_mean', float('nan')):.1f}",
                          f"{row.get('commit_ms', float('nan')):.2f}", f"{row['bytes_per_receipt']:,.0f}"])
    lines.append(tabulate(table, headers=["server", "confirmed", "unknown card (422)", "redemption refused (422)",
                                          "returns", "return: receipt not found", "other/errors",
                                          "rules evaluate µs", "writes per commit", "commit ms",
                                          "bytes per stored receipt"], tablefmt="github"))
    lines += ["", "| members | database after generation | per million members | generated in | "
              "after this run's receipts | cache preloaded in |",
              "| --- | --- | --- | --- | --- | --- |"]
    for entry in per_count:
        per_m = entry["db_bytes"] / entry["members"] * 1e6
        made_in = f"{entry['gen_s']:.0f} s" + ("" if entry["gen_complete"] else " (resumed)")
        lines.append(f"| {entry['members']:,} | {entry['db_bytes'] / 2**20:,.0f} MiB | {per_m / 2**20:,.0f} MiB | "
                     f"{made_in} | {entry['db_bytes_now'] / 2**20:,.0f} MiB{'' if entry['copied'] else ' (in place)'} | {entry.get('preload_s', 0):.0f} s |")
    lines += ["", "Each server holds the receipt path's hot rows in its write connection's page cache "
              f"(`database.cache_mib`: {CACHE_MIB_PER_MILLION_MEMBERS} MiB per million members, at least "
              f"{CACHE_MIB_MIN}) and reads them at start (`database.preload`); it is measured once /readyz "
              "says the preload is done (the first server's wait is in the last column). Each member count runs "
              f"on a fresh copy of its generated database, except those over {COPY_BYTES_MAX / 2**30:.0f} GiB, "
              "which run in place (marked)."]
    lines += pg_section(comparison, seconds)
    if prof:
        lines += ["", "## Profile of the confirm path", ""]
        if "error" in prof:
            lines.append(f"py-spy failed: {prof['error']}")
        else:
            run = prof["run"]
            cpu_us = run["cpu_us_per_request"]
            lines.append(f"py-spy (250 Hz, all threads, samples of threads waiting on a queue or epoll dropped) on the market server at full load, "
                         f"{prof['members']:,} members: {prof['samples']:,} samples while it answered "
                         f"{run['rps']:,.0f} requests/s ({run['confirmed_rps']:,.0f} confirmed) using "
                         f"{run['cpu_share']:.0%} of its core, {cpu_us:.0f} µs of CPU per request. µs per request "
                         "below = share of samples x that CPU time.")
            lines.append("")
            thread_us = run.get("thread_cpu_us", {})
            kinds = dict(prof["by_kind"])
            lines += ["CPU per request by thread (from /proc, exact): " + ", ".join(
                f"{kind} {us:.0f} µs" for kind, us in sorted(thread_us.items(), key=lambda kv: -kv[1])) + ".", ""]
            table = []
            for stage, count in prof["by_stage"]:
                kind = next((want for name, want, _ in STAGES if name == stage), stage.split(":")[0])
                us = thread_us.get(kind, 0) * count / kinds[kind] if kinds.get(kind) else float("nan")
                table.append([stage, kind, count, f"{count / prof['samples']:.1%}", f"{us:.0f}"])
            lines.append(tabulate(table, headers=["stage", "thread", "samples", "share of samples",
                                                  "≈ CPU µs/request"], tablefmt="github"))
            lines += ["", "≈ CPU µs/request spreads each thread's measured CPU over its samples. With four threads "
                      "on one core a sample also lands on a thread that is runnable but waiting for the core or "
                      "the GIL, and the writer's and the sync thread's include waiting for the GIL and for fdatasync, so read the column as an "
                      "estimate; the per-thread totals above are exact."]
            lines += ["", "Top frames (where the samples were, innermost Python frame):", ""]
            table = [[frame, count, f"{count / prof['samples']:.1%}"] for frame, count in prof["by_leaf"]]
            lines.append(tabulate(table, headers=["frame", "samples", "share"], tablefmt="github"))
            lines += ["", "Samples by thread: " + ", ".join(f"{k} {v / prof['samples']:.0%}" for k, v in prof["by_kind"])
                      + ". Raw stacks: benchmarks/data/profile.raw.txt."]
    return "\n".join(lines) + "\n"


def pg_section(comparison: dict, seconds: int) -> list[str]:
    lines = ["", "## PostgreSQL beside SQLite", ""]
    if "skipped" in comparison:
        return lines + [f"Not run: {comparison['skipped']}."]
    results = comparison["results"]
    loads = [r["load"] for rows in results.values() for r in rows]
    lines += [
        f"The market program, {comparison['members']:,} members (copied into PostgreSQL by `loyalty migrate "
        f"sqlite-to-postgres` in {comparison['copied_s']:.0f} s), {comparison['rounds']} rounds in which the three "
        f"take turns, {seconds} s each at full load: 32 connections, one wrk of 32 against one process or one of 16 "
        f"against each of two. Servers pinned to core {SERVER_CPU} (two processes share it), wrk to core "
        f"{DRIVER_CPU}, PostgreSQL {comparison['postgresql']} not pinned (a throwaway cluster: fsync and "
        "synchronous_commit on, shared_buffers 64 MB); each PostgreSQL server keeps `database.connections` 8. "
        f"Medians of the rounds; the 1-minute load average after the runs was {min(loads):.1f} to {max(loads):.1f} "
        f"(median {statistics.median(loads):.1f}).", ""]
    table = []
    for name, rows in results.items():
        confirmed = [r["confirmed_rps"] for r in rows]
        p50, p99 = medians((r["p50_ms"], r["p99_ms"]) for r in rows)
        per_server = medians(tuple(r["server_us"]) for r in rows)
        pg_us = None if rows[0]["pg_us"] is None else statistics.median(r["pg_us"] for r in rows)
        total = statistics.median(sum(r["server_us"]) + (r["pg_us"] or 0) for r in rows)
        table.append([name, f"{statistics.median(confirmed):,.0f}", f"{min(confirmed):,.0f} / {max(confirmed):,.0f}",
                      f"{p50:.1f} / {p99:.1f}", " + ".join(f"{us:,.0f}" for us in per_server),
                      "-" if pg_us is None else f"{pg_us:,.0f}", f"{total:,.0f}", sum(r["failed"] for r in rows)])
    lines.append(tabulate(table, headers=["database, server processes", "confirmed receipts/s",
                                          "lowest / highest round", "p50 / p99 ms",
                                          "CPU µs per confirmed receipt: each server process", "PostgreSQL",
                                          "in all", "other/errors"], tablefmt="github"))
    for name, rows in results.items():
        failed: collections.Counter = collections.Counter()
        for r in rows:
            failed.update(r.get("failed_by", {}))
        if failed:
            lines += ["", f"Failed requests of {name}: " + ", ".join(f"{k} × {n}" for k, n in sorted(failed.items()))
                      + "."]
    lines += ["", "CPU per confirmed receipt is each process's utime + stime (/proc) over the run divided by the "
              "receipts confirmed in all (the unknown cards, refused redemptions and returns, about 8 % of requests, "
              "are paid out of it); PostgreSQL's is the postmaster's and its children's, read while the servers' "
              "connections are open. The latency is closed-loop (queueing); with two processes, that of the slower "
              "driver. On 2 shared cores the throughput of more processes is noise; compare the CPU per receipt, "
              "between the rows of one run (it too grows with the machine's load)."]
    return lines


if __name__ == "__main__":
    sys.exit(main())
