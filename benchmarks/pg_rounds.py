"""What the PostgreSQL benchmarks share: rounds that alternate the ways measured, their
medians, and the CPU a throwaway cluster (tests/pg_cluster.py) used in between.

On a shared machine the load of the other tenants drifts within minutes; alternating the
ways round by round puts that drift on every way alike, and the median of the rounds drops
a round that one burst hit.
"""
from __future__ import annotations

import os
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from pg_cluster import Cluster, bin_dir, running  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
Result = TypeVar("Result")


@contextmanager
def throwaway_database() -> Iterator[tuple[Cluster, str]]:
    """(cluster, url of an empty database on it), the cluster gone afterwards; the benchmark
    exits with the package to install when PostgreSQL is absent."""
    if bin_dir() is None:
        sys.exit("PostgreSQL is not installed (apt-get install postgresql)")
    with running(Cluster(bin_dir())) as cluster:
        yield cluster, cluster.url(cluster.createdb())


def alternate(ways: dict[str, Callable[[], Result]], rounds: int,
              each: Callable[[str, Result], None] = lambda name, result: None) -> dict[str, list[Result]]:
    """Every way once per round, in the same order, `rounds` times; each(name, result) after
    every run (a progress line)."""
    results: dict[str, list[Result]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, way in ways.items():
            results[name].append(way())
            each(name, results[name][-1])
    return results


def medians(rows: Iterable[tuple[float, ...]]) -> tuple[float, ...]:
    """Column by column, the median of rows of numbers."""
    return tuple(statistics.median(column) for column in zip(*rows))


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class ClusterCpu:
    """CPU seconds used by the cluster's processes between start() and stop(), from /proc:
    the postmaster and its children (backends, WAL writer, checkpointer). stop() is called
    while the measured connections are open, so their backends are read alive: a backend
    that has exited shows nowhere until the postmaster reaps it. Processes that came and
    went in between (an autovacuum worker) are not counted."""

    def __init__(self, cluster: Cluster):
        self.postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
        self.before: dict[int, int] = {}

    def _ticks(self) -> dict[int, int]:
        out = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue        # exited meanwhile
            if int(entry) == self.postmaster or int(fields[1]) == self.postmaster:
                out[int(entry)] = int(fields[11]) + int(fields[12])
        return out

    def start(self) -> None:
        self.before = self._ticks()

    def stop(self) -> float:
        now = self._ticks()
        return sum(ticks - self.before.get(pid, 0) for pid, ticks in now.items()) / CLK_TCK
