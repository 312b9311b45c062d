"""Start-up failures an operator meets (an unusable database path, a lock file that cannot be
made, a missing program folder) are one line naming the path and the reason, and exit 2:
no traceback. So are the other commands' on a database path they cannot use."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess

import pytest

from test_crash_safety import Server

pytestmark = pytest.mark.sqlite_only(reason="unusable SQLite paths and the lock file beside the database")


def start_fails(server: Server) -> str:
    """The server's only line of output once it exited 2."""
    with pytest.raises(RuntimeError):
        server.start()
    assert server.proc.wait(30) == 2
    lines = [line for line in server.log.read_text().splitlines() if " WARNING " not in line and " INFO " not in line]
    assert len(lines) == 1, server.log.read_text()
    return lines[0]


def test_database_under_a_regular_file(tmp_path):
    (tmp_path / "data").write_text("a file where a folder should be")
    db = tmp_path / "data" / "sub" / "loyalty.db"
    line = start_fails(Server(tmp_path, database={"path": str(db)}))
    assert line == f"not starting: cannot open the database {db}: {tmp_path / 'data'} is a file, not a folder"


def test_database_path_is_a_folder(tmp_path):
    db = tmp_path / "loyalty.db"
    db.mkdir()
    assert start_fails(Server(tmp_path)) == f"not starting: cannot open the database {db}: is a directory"


def test_database_file_is_not_a_database(tmp_path):
    db = tmp_path / "loyalty.db"
    db.write_bytes(b"this is not SQLite " * 1000)
    assert start_fails(Server(tmp_path)) == f"not starting: cannot open the database {db}: file is not a database"
    assert db.read_bytes() == b"this is not SQLite " * 1000


def test_lock_file_cannot_be_created(tmp_path):
    lock = tmp_path / "loyalty.db.serve.lock"
    lock.mkdir()
    assert start_fails(Server(tmp_path)) == (f"not starting: cannot open the database {tmp_path / 'loyalty.db'}: "
                                             f"cannot create its lock file {lock}: is a directory")
    assert not (tmp_path / "loyalty.db").exists()          # refused before the database was made


def test_program_folder_missing(tmp_path):
    missing = tmp_path / "no-such-program"
    line = start_fails(Server(tmp_path, rules={"dir": str(missing)}))
    assert line == f"not starting: the program folder {missing} does not exist (rules.dir)"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits; the cases above cover root")
def test_database_without_write_permission(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    db = data / "loyalty.db"
    data.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        line = start_fails(Server(tmp_path, database={"path": str(db)}))
    finally:
        data.chmod(stat.S_IRWXU)
    assert line == (f"not starting: cannot open the database {db}: cannot create its lock file "
                    f"{db}.serve.lock: permission denied")
    db.write_bytes(b"")
    db.chmod(stat.S_IRUSR)
    (tmp_path / "again").mkdir()
    line = start_fails(Server(tmp_path / "again", database={"path": str(db)}))
    assert line == f"not starting: cannot open the database {db}: permission denied"


def test_database_on_a_read_only_file_system(tmp_path):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(read_only)], capture_output=True).returncode:
        pytest.skip("mounting a read-only tmpfs needs root (CAP_SYS_ADMIN) and mount(8)")
    try:
        db = read_only / "loyalty.db"
        line = start_fails(Server(tmp_path, database={"path": str(db)}))
    finally:
        subprocess.run(["umount", str(read_only)], check=True)
    assert line == (f"not starting: cannot open the database {db}: cannot create its lock file "
                    f"{db}.serve.lock: read-only file system")


COMMANDS = [["audit", "verify"], ["partners", "settle", "--period", "2026-11"], ["export", "ledger"],
            ["export", "receipts"], ["events", "retry"], ["keys", "list"], ["jobs", "run"],
            ["privacy", "rotate-key"], ["report", "campaign", "base"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
@pytest.mark.parametrize("kind", ["a folder", "not SQLite"])
def test_commands_on_an_unusable_database_say_so_in_one_line(tmp_path, capsys, command, kind):
    from conftest import MARKET, TEST_HMAC_KEY
    from server.cli import main
    db = tmp_path / "loyalty.db"
    if kind == "a folder":
        db.mkdir()
    else:
        db.write_bytes(b"this is not SQLite " * 1000)
    config = tmp_path / "config.yaml"
    config.write_text(f"database: {{path: {db}}}\nrules: {{dir: {MARKET}}}\n"
                      f"privacy: {{demo_insecure_hmac_key: {TEST_HMAC_KEY}}}\n")
    assert main([*command, "--config", str(config)]) in (1, 2)     # jobs run: 1, as for any write refused
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.endswith(("disk I/O error", "unable to open database file", "file is not a database")), last
    assert "cannot" in last and (str(db) in last or "(database.path)" in last), last
    if kind == "not SQLite":
        assert db.read_bytes() == b"this is not SQLite " * 1000
