"""config.yaml is decoded strictly; the environment overrides any key."""
from pathlib import Path

import pytest

from server.cli import main
from server.config import ConfigError, config_from_dict, load_config

pytestmark = pytest.mark.no_database

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_config_loads_and_resolves_paths():
    cfg = load_config(ROOT / "config.yaml", environ={})
    assert cfg.server.port == 8080
    assert cfg.resolve(cfg.database.path) == ROOT / "data" / "loyalty.db"
    assert cfg.resolve(cfg.rules.dir) == ROOT / "rules" / "programs" / "market"
    assert {k.role for k in cfg.auth.keys} == {"register", "manager", "monitor"}


def test_a_section_with_every_key_commented_out_takes_its_defaults(tmp_path):
    # As the README says for real cards: the demo key's line removed from the shipped file.
    path = tmp_path / "config.yaml"
    shipped = (ROOT / "config.yaml").read_text()
    path.write_text("\n".join(line for line in shipped.splitlines() if "demo_insecure_hmac_key:" not in line))
    cfg = load_config(path, environ={})
    assert cfg.privacy.demo_insecure_hmac_key is None
    assert cfg.privacy.hmac_key_env == "LOYALTY_HMAC_KEY"


def test_unknown_key_stops_startup_with_a_hint(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("server: {prot: 9000}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, environ={})
    assert e.value.key == "server.prot"
    assert "did you mean 'port'" in e.value.reason
    assert str(path) in str(e.value)


def test_a_file_that_is_not_yaml_is_one_line_naming_where(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("server:\n  port: 9000\n  host: [127.0.0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, environ={})
    assert str(e.value) == (f"{path}: not valid YAML: expected ',' or ']', but got '<stream end>' "
                            "at line 4, column 1")


@pytest.mark.parametrize("content,reason", [
    (b"server:\n  host: \xff\xfe\n", "not UTF-8 text (byte 16)"),
    (b"server: " + b"[" * 30_000 + b"]" * 30_000 + b"\n", "not a configuration: nested too deeply to read"),
], ids=["latin-1 bytes", "nested 30000 deep"])
def test_a_file_that_cannot_be_read_as_yaml_is_one_line_not_a_traceback(tmp_path, capsys, content, reason):
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    assert main(["serve", "--config", str(path)]) == 2
    assert capsys.readouterr().err == f"config error: {path}: {reason}\n"


def test_wrong_type_names_the_key(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("server: {port: eighty}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, environ={})
    assert e.value.key == "server.port"


def test_environment_overrides(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("server: {port: 8080}\n")
    cfg = load_config(path, environ={"LOYALTY_SERVER__PORT": "9000", "LOYALTY_RULES__WATCH": "false"})
    assert cfg.server.port == 9000 and cfg.rules.watch is False
    with pytest.raises(ConfigError):
        load_config(path, environ={"LOYALTY_SERVER__PORTS": "1"})


def test_a_bad_value_from_the_environment_names_the_variable_not_only_the_file(tmp_path, capsys):
    # config.yaml says port 8080: a message naming only the file sends the operator to a file with nothing wrong.
    path = tmp_path / "config.yaml"
    path.write_text("server: {port: 8080}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, environ={"LOYALTY_SERVER__PORT": "eighty"})
    assert str(e.value) == (f"{path}: server.port: must be a whole number "
                            "(set by the environment variable LOYALTY_SERVER__PORT)")
    with pytest.raises(ConfigError) as e:
        load_config(path, environ={"LOYALTY_SERVER__PROT": "1"})
    assert e.value.key == "server.prot" and e.value.reason.endswith("(set by the environment variable "
                                                                    "LOYALTY_SERVER__PROT)")
    # A value that is not YAML at all is one line too, not a traceback.
    with pytest.raises(ConfigError) as e:
        load_config(path, environ={"LOYALTY_SERVER__PORT": "["})
    assert str(e.value).startswith("environment variable LOYALTY_SERVER__PORT: server.port: not a YAML value: ")
    # A bad value in the file itself says nothing of the environment.
    path.write_text("server: {port: eighty}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, environ={"LOYALTY_RULES__WATCH": "false"})
    assert "environment" not in str(e.value)


@pytest.mark.parametrize("command", [["serve"], ["audit", "verify"], ["jobs", "run"], ["export", "ledger"]])
def test_a_database_url_libpq_cannot_read_is_one_config_line_for_every_command(tmp_path, capsys, command):
    path = tmp_path / "config.yaml"
    path.write_text('database: {url: "postgresql://loyalty@/loyalty?host=/run/postgresql  port=5432"}\n'
                    "privacy: {hmac_key: a-key-of-sixteen-chars}\n")
    assert main([*command, "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"config error: {path}: database.url: not a libpq connection URL: "), err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_database_url_libpq_reads_is_taken():
    cfg = config_from_dict({"database": {"url": "postgresql://loyalty@db1.example/loyalty?host=/run/postgresql&port=5432"}})
    assert cfg.database.url.endswith("port=5432")


@pytest.mark.parametrize("content,reason", [
    (None, "cannot read: No such file or directory"),
    (b"- a list\n", "expected a mapping at the top level"),
], ids=["missing", "a list"])
def test_a_problem_with_the_whole_file_names_the_file_and_no_key(tmp_path, capsys, content, reason):
    path = tmp_path / "config.yaml"
    if content is not None:
        path.write_bytes(content)
    assert main(["serve", "--config", str(path)]) == 2
    assert capsys.readouterr().err == f"config error: {path}: {reason}\n"
