"""A throwaway PostgreSQL cluster for tests: initdb and pg_ctl in a temporary folder, a Unix
socket only (nothing listens on TCP), a fresh database per test.

initdb refuses to run as root, so as root the cluster runs as the `postgres` user that
Debian's postgresql package creates (runuser); as anyone else, as that user. Tests that need
it take the `pg_url` fixture, which skips them with the reason when the binaries are absent
(`.ci/run` installs Debian's postgresql).
"""
from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

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

    def __init__(self, bins: Path):
        self.bins = bins
        self.root = Path(tempfile.mkdtemp(prefix="loyalty-pg-"))
        self.data, self.sock = self.root / "data", self.root / "sock"
        self.port = _free_port()
        self._as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self._names = itertools.count(1)

    def _run(self, *args: str, as_owner: bool = True) -> None:
        cmd = (self._as_pg if as_owner else []) + list(args)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
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
        # fsync stays on: the durability the server promises is measured against a real one.
        options = (f"-k {self.sock} -p {self.port} -c listen_addresses='' "
                   f"-c max_connections={MAX_CONNECTIONS} -c shared_buffers=64MB")
        self._run(str(self.bins / "pg_ctl"), "-D", str(self.data), "-w", "-t", str(COMMAND_TIMEOUT_S),
                  "-l", str(self.root / "postgresql.log"), "-o", options, "start")

    def stop_server(self) -> None:
        """Stops PostgreSQL as a restart or failover would (fast: open transactions are rolled back)."""
        self._run(str(self.bins / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def createdb(self) -> str:
        name = f"test{next(self._names)}"
        self._run(str(self.bins / "createdb"), "-h", str(self.sock), "-p", str(self.port), "-U", "postgres", name,
                  as_owner=False)
        return name

    def url(self, name: str) -> str:
        """The form `database.url` takes (the socket folder and port as query parameters)."""
        return f"postgresql://postgres@/{name}?host={self.sock}&port={self.port}"

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self._run(str(self.bins / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass    # the folder goes anyway; a stray postmaster dies with its files
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster():
    """The session's cluster, started at the first test that needs it."""
    bins = bin_dir()
    if bins is None:
        pytest.skip(f"PostgreSQL is not installed (no initdb under {BIN_GLOB}; apt-get install postgresql)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run initdb as")
    cluster = Cluster(bins)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster) -> str:
    """A fresh, empty database of the session's cluster, as a `database.url`."""
    return pg_cluster.url(pg_cluster.createdb())
