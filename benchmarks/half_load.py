"""Why a request costs more CPU at half load than at full load: the same server, both ways.

    PYTHONPATH=. python benchmarks/half_load.py [--rate 370] [--members 10000] [--seconds 14]

One server (market program), pinned like `make bench`, measured at full load and then
at the fixed rate (default: half of the full-load rate it just measured), each under
py-spy. Prints per request, side by side: CPU by thread (exact, from /proc), commits and
receipts per commit, bytes and write calls the process made (/proc/PID/io), and the
profile's stages (each thread's CPU spread over that thread's samples, as in make bench).
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import gen_members, receipts  # noqa: E402
from benchmarks.run import (DATA, ROOT, STAGES, VENV_BIN, Server, copy_database, measured,  # noqa: E402
                            metrics, pyspy_record, server_config, summarize_profile, wrk)

def proc_io(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/io") as lines:
        return {key: int(value) for key, value in (line.split(":") for line in lines)}


def run_once(server: Server, templates: Path, members: int, seconds: int, rate: float) -> dict:
    raw = DATA / f"half-load-{int(rate)}.raw.txt"
    spy = pyspy_record(server, raw, seconds + 2)
    if spy is None:
        raise SystemExit("py-spy is not installed: pip install -r benchmarks/requirements.txt")
    threads0, io0, m0 = server.thread_cpu(), proc_io(server.proc.pid), metrics()
    result, _ = measured(server, lambda: wrk(templates, members, seconds, rate=rate))
    threads1, io1, m1 = server.thread_cpu(), proc_io(server.proc.pid), metrics()
    spy.wait(60)
    n = result["requests"]
    commits = m1["loyalty_ledger_commit_batch_size_count"] - m0["loyalty_ledger_commit_batch_size_count"]
    threads = {kind: (threads1[kind] - threads0.get(kind, 0)) / n * 1e6 for kind in threads1}
    return {
        "result": result,
        "threads_us": threads,
        "commits_per_s": commits / result["seconds"],
        "per_commit": n / max(commits, 1),
        "write_kib": (io1["wchar"] - io0["wchar"]) / n / 1024,
        "write_calls": (io1["syscw"] - io0["syscw"]) / n,
        "stages_us": stage_us(summarize_profile(raw), threads),
    }


def stage_us(profile: dict, threads_us: dict[str, float]) -> dict[str, float]:
    """Each thread's exact CPU per request spread over that thread's samples."""
    per_kind = dict(profile["by_kind"])
    named = {name: kind for name, kind, _ in STAGES}
    out: dict[str, float] = collections.defaultdict(float)
    for stage, samples in profile["by_stage"]:
        kind = named.get(stage, stage.split(":", 1)[0])  # else "loop: ...", "writer: everything else"
        out[stage] += samples / max(per_kind.get(kind, 1), 1) * threads_us.get(kind, 0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=0, help="requests/s (default: half the full-load rate)")
    parser.add_argument("--members", type=int, default=10_000)
    parser.add_argument("--seconds", type=int, default=14)
    args = parser.parse_args()
    DATA.mkdir(parents=True, exist_ok=True)
    templates = DATA / "receipts.txt"
    receipts.generate(templates)
    source = DATA / f"members-{args.members}.db"
    gen_members.generate(source, args.members)
    db = DATA / "half-load.db"
    copy_database(source, db)
    config = server_config(DATA / "half-load.yaml", db, ROOT / "rules" / "programs" / "market", members=args.members)
    argv = [str(VENV_BIN / "python"), "-m", "server.cli", "serve", "--config", str(config)]
    with Server("half-load", argv, ready=True) as server:
        wrk(templates, args.members, 3)
        full = run_once(server, templates, args.members, args.seconds, 0)
        rate = args.rate or full["result"]["rps"] / 2
        part = run_once(server, templates, args.members, args.seconds, rate)
    report(full, part, rate)


def report(full: dict, part: dict, rate: float) -> None:
    rows = [("requests/s", lambda r: r["result"]["rps"]),
            ("CPU us/request", lambda r: r["result"]["cpu_us_per_request"]),
            *((f"  thread {kind} us/request", lambda r, k=kind: r["threads_us"].get(k, 0))
              for kind in full["threads_us"]),
            ("commits/s", lambda r: r["commits_per_s"]),
            ("requests per commit", lambda r: r["per_commit"]),
            ("KiB written/request (wchar)", lambda r: r["write_kib"]),
            ("write calls/request", lambda r: r["write_calls"]),
            ("p99 ms", lambda r: r["result"]["latency_us"]["p99"] / 1000)]
    print(f"{'':44} {'full load':>10} {f'{rate:,.0f}/s':>10} {'diff':>8}")
    for label, get in rows:
        a, b = get(full), get(part)
        print(f"{label:44} {a:10,.1f} {b:10,.1f} {b - a:+8,.1f}")
    print("\nprofile stages, us/request (estimates; the thread rows above are exact)")
    stages = set(full["stages_us"]) | set(part["stages_us"])
    for stage in sorted(stages, key=lambda s: -(part["stages_us"].get(s, 0) - full["stages_us"].get(s, 0))):
        a, b = full["stages_us"].get(stage, 0), part["stages_us"].get(stage, 0)
        print(f"{stage:50} {a:7.0f} {b:7.0f} {b - a:+7.0f}")


if __name__ == "__main__":
    main()
