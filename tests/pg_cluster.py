"""A throwaway PostgreSQL cluster for tests and benchmarks: initdb and pg_ctl in a temporary
folder, a Unix socket only (nothing listens on TCP), a fresh database per test.

initdb refuses to run as root, so as root the cluster runs as the `postgres` user that
Debian's postgresql package creates (runuser); as anyone else, as that user. Tests that need
it take the `pg_url` fixture (tests/conftest.py), which skips them with the reason when the
binaries are absent (`.ci/run` installs Debian's postgresql). Nothing here imports pytest at
import time: `make bench` (benchmarks/run.py) starts its cluster from here without the test
requirements.
"""
from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

# Debian's layout: /usr/lib/postgresql/<major>/bin; the newest major wins.
BIN_GLOB = "/usr/lib/postgresql/*/bin"
# initdb, start and stop each finish in seconds; a hung one must not hang the suite.
COMMAND_TIMEOUT_S = 120
# Enough for several server processes per test plus the test's own connections.
MAX_CONNECTIONS = 100


def bin_dir() -> Path | None:
    found = sorted(glob.glob(BIN_GLOB), key=lambda p: int(Path(p).parent.name))
    return Path(found[-1]) if found and (Path(found[-1]) / "initdb").exists() else None


def _free_port() -> int:
    """A port number for the socket file's name (.s.PGSQL.<port>); nothing listens on TCP."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """One cluster: start(), url(createdb()), stop(). As root its files belong to `postgres`."""

    def __init__(self, bins: Path, settings: dict[str, str] | None = None):
        self.bins = bins
        # Server settings over the defaults (replication's for a primary; the suite's pass
        # its own max_connections and no fsync).
        self.settings = {"max_connections": str(MAX_CONNECTIONS), "shared_buffers": "64MB", **(settings or {})}
        self.root = Path(tempfile.mkdtemp(prefix="loyalty-pg-"))
        self.data, self.sock = self.root / "data", self.root / "sock"
        self.port = _free_port()
        self._as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self._names = itertools.count(1)

    def _run(self, *args: str, as_owner: bool = True) -> None:
        cmd = (self._as_pg if as_owner else []) + list(args)
        # pg_ctl waits COMMAND_TIMEOUT_S itself (-t): a little longer here, so that its own
        # message says what did not happen in time.
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S + 30)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")

    def start(self) -> None:
        self.sock.mkdir()
        if self._as_pg:
            pg = pwd.getpwnam("postgres")
            for path in (self.root, self.sock):
                os.chown(path, pg.pw_uid, pg.pw_gid)
        self._run(str(self.bins / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "--no-sync", "-E", "UTF8", "--locale", "C")
        self.start_server()

    def start_server(self) -> None:
        # fsync stays on unless settings say otherwise: the durability the server promises is
        # measured against a real one.
        options = f"-k {self.sock} -p {self.port} -c listen_addresses=''"
        options += "".join(f" -c {name}={value}" for name, value in self.settings.items())
        self._run(str(self.bins / "pg_ctl"), "-D", str(self.data), "-w", "-t", str(COMMAND_TIMEOUT_S),
                  "-l", str(self.root / "postgresql.log"), "-o", options, "start")

    def stop_server(self, mode: str = "fast") -> None:
        """Stops PostgreSQL as a restart or failover would: fast rolls open transactions back
        and shuts down cleanly; immediate quits at once, as a crash, and recovers at start."""
        # pg_ctl's own wait is 60 s by default; a fast stop's shutdown checkpoint on a disk
        # other suites keep busy has taken longer than that.
        self._run(str(self.bins / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", str(COMMAND_TIMEOUT_S),
                  "stop")

    def createdb(self) -> str:
        name = f"test{next(self._names)}"
        self._run(str(self.bins / "createdb"), "-h", str(self.sock), "-p", str(self.port), "-U", "postgres", name,
                  as_owner=False)
        return name

    def url(self, name: str) -> str:
        """The form `database.url` takes (the socket folder and port as query parameters)."""
        return f"postgresql://postgres@/{name}?host={self.sock}&port={self.port}"

    def kill(self) -> None:
        """SIGKILL to the postmaster, as a host that dies would: nothing is flushed or
        handed over; its backends notice and exit."""
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self._run(str(self.bins / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass    # the folder goes anyway; a stray postmaster dies with its files
        shutil.rmtree(self.root, ignore_errors=True)


class ReplicatedPair:
    """A primary and a streaming standby, the standby synchronous: the primary acknowledges
    a COMMIT only once the standby has flushed it, so a failover after a kill loses
    nothing that was acknowledged. url() names both hosts with target_session_attrs, as an
    installation's `database.url` would."""

    def __init__(self, bins: Path):
        self.primary = Cluster(bins, {"wal_level": "replica", "max_wal_senders": "4"})
        self.standby = Cluster(bins, {"hot_standby": "on"})

    def start(self, database: str = "loyalty") -> None:
        self.primary.start()
        self.primary._run(str(self.primary.bins / "createdb"), "-h", str(self.primary.sock), "-p",
                          str(self.primary.port), "-U", "postgres", database, as_owner=False)
        self.database = database
        self.standby.sock.mkdir()
        if self.standby._as_pg:
            pg = pwd.getpwnam("postgres")
            for path in (self.standby.root, self.standby.sock):
                os.chown(path, pg.pw_uid, pg.pw_gid)
        # -R writes primary_conninfo and standby.signal: the copy starts as a streaming standby.
        self.standby._run(str(self.standby.bins / "pg_basebackup"), "-h", str(self.primary.sock), "-p",
                          str(self.primary.port), "-U", "postgres", "-D", str(self.standby.data), "-R",
                          "-X", "stream", "--checkpoint=fast", "--no-sync")
        self.standby.start_server()
        # Synchronous only now: before a standby streams, every COMMIT (createdb's too) would
        # wait for one.
        self._psql("ALTER SYSTEM SET synchronous_standby_names = '*'")
        self._psql("SELECT pg_reload_conf()")
        deadline = time.monotonic() + COMMAND_TIMEOUT_S
        while self._psql("SELECT sync_state FROM pg_stat_replication") != "sync":
            if time.monotonic() > deadline:
                raise RuntimeError("the standby did not become synchronous")
            time.sleep(0.1)

    def _psql(self, sql: str) -> str:
        done = subprocess.run([str(self.primary.bins / "psql"), "-h", str(self.primary.sock), "-p",
                               str(self.primary.port), "-U", "postgres", "-d", "postgres", "-At", "-c", sql],
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=True)
        return done.stdout.strip()

    def url(self) -> str:
        return (f"postgresql://postgres@/{self.database}?host={self.primary.sock},{self.standby.sock}"
                f"&port={self.primary.port},{self.standby.port}&target_session_attrs=read-write")

    def promote(self) -> None:
        self.standby._run(str(self.standby.bins / "pg_ctl"), "-D", str(self.standby.data), "-w",
                          "-t", str(COMMAND_TIMEOUT_S), "promote")

    def stop(self) -> None:
        self.standby.stop()
        self.primary.stop()


def bins_or_skip() -> Path:
    import pytest
    bins = bin_dir()
    if bins is None:
        pytest.skip(f"PostgreSQL is not installed (no initdb under {BIN_GLOB}; apt-get install postgresql)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run initdb as")
    return bins


@contextlib.contextmanager
def running(cluster: Cluster | ReplicatedPair):
    """The cluster (or pair) started, and stopped with its files gone afterwards."""
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
