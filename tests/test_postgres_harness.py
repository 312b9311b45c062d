"""The throwaway PostgreSQL cluster the PostgreSQL tests run on: each test gets an empty
database of its own, reached over the Unix socket its url names."""
from __future__ import annotations

import subprocess
from urllib.parse import parse_qs, urlsplit

from pg_cluster import bin_dir


def psql(url: str, sql: str) -> str:
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    done = subprocess.run(
        [str(bin_dir() / "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", query["host"][0],
         "-p", query["port"][0], "-U", parts.username, "-d", parts.path.lstrip("/"), "-c", sql],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_each_test_gets_an_empty_database_of_its_own(pg_cluster):
    first, second = pg_cluster.url(pg_cluster.createdb()), pg_cluster.url(pg_cluster.createdb())
    assert first != second
    psql(first, "CREATE TABLE marker (id int)")
    assert psql(first, "SELECT count(*) FROM pg_tables WHERE tablename = 'marker'") == "1"
    assert psql(second, "SELECT count(*) FROM pg_tables WHERE tablename = 'marker'") == "0"


def test_the_cluster_listens_on_its_socket_only(pg_url):
    assert psql(pg_url, "SHOW listen_addresses") == ""
    assert psql(pg_url, "SELECT current_setting('fsync')") == "on"
