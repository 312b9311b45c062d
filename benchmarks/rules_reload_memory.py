"""Memory across program reloads: load the market program N times, closing the previous
one each time (what the server does when the rules folder changes), and report the
process's resident memory before and after, and the engine rulesets still alive.

    PYTHONPATH=. python benchmarks/rules_reload_memory.py [--reloads 1000] [--program DIR] [--no-close]

--no-close drops each program without closing it, leaving the rulesets to the
garbage collector (Program's finalizer), as happens when a request still held the
old program during a reload.
"""

from __future__ import annotations

import argparse
import gc
import pathlib
import time

import durable_rules_engine

from rules import engine, load_program

MARKET = pathlib.Path(__file__).resolve().parent.parent / "rules" / "programs" / "market"


def rss_kib() -> int:
    """Current (not peak) resident set size of this process."""
    with open("/proc/self/status") as status:
        for row in status:
            if row.startswith("VmRSS:"):
                return int(row.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


class RulesetCounter:
    """Counts rulesets the engine creates and deletes by wrapping the module's two calls."""

    def __init__(self):
        self.created = self.deleted = 0
        self._create, self._delete = durable_rules_engine.create_ruleset, durable_rules_engine.delete_ruleset

    def __enter__(self):
        def create(*args):
            handle = self._create(*args)
            self.created += 1
            return handle

        def delete(handle):
            self._delete(handle)
            self.deleted += 1

        engine._engine.create_ruleset, engine._engine.delete_ruleset = create, delete
        return self

    def __exit__(self, *exc):
        engine._engine.create_ruleset, engine._engine.delete_ruleset = self._create, self._delete

    @property
    def alive(self) -> int:
        return self.created - self.deleted


def run(directory: pathlib.Path, reloads: int, close: bool) -> dict:
    # Warm up: imports, caches and the allocator's first arenas are not a leak.
    for _ in range(20):
        load_program(directory).close()
    gc.collect()
    with RulesetCounter() as counter:
        program = load_program(directory)
        per_program = counter.created
        before = rss_kib()
        started = time.perf_counter()
        samples = []
        for number in range(1, reloads + 1):
            new = load_program(directory)
            if close:
                program.close()
            program = new
            if number % (reloads // 10 or 1) == 0:
                samples.append((number, rss_kib()))
        elapsed = time.perf_counter() - started
        gc.collect()
        after = rss_kib()
        alive_before_last_close = counter.alive
        program.close()
        gc.collect()
        return {
            "reloads": reloads,
            "rulesets_per_program": per_program,
            "created": counter.created,
            "deleted": counter.deleted,
            "alive_with_one_program_loaded": alive_before_last_close,
            "alive_at_end": counter.alive,
            "rss_before_kib": before,
            "rss_after_kib": after,
            "rss_samples_kib": samples,
            "ms_per_reload": 1000 * elapsed / reloads,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reloads", type=int, default=1000)
    parser.add_argument("--program", type=pathlib.Path, default=MARKET)
    parser.add_argument("--no-close", action="store_true", help="leave freeing to the garbage collector")
    args = parser.parse_args()
    found = run(args.program, args.reloads, close=not args.no_close)
    how = "dropped for the garbage collector" if args.no_close else "closed"
    print(f"{found['reloads']} reloads of {args.program.name}, previous program {how}: "
          f"{found['ms_per_reload']:.2f} ms each")
    print(f"engine rulesets: {found['rulesets_per_program']} per program, {found['created']} created, "
          f"{found['deleted']} deleted, {found['alive_with_one_program_loaded']} alive with the last program "
          f"loaded, {found['alive_at_end']} after closing it")
    delta = found["rss_after_kib"] - found["rss_before_kib"]
    print(f"RSS {found['rss_before_kib']} KiB -> {found['rss_after_kib']} KiB ({delta:+d} KiB)")
    print("RSS along the way: " + ", ".join(f"{n}: {kib}" for n, kib in found["rss_samples_kib"]))


if __name__ == "__main__":
    main()
