"""Program versions in the database: every program that goes live is recorded; deploy and
roll back through the API; a broken folder at start serves the newest recorded program;
`loyalty rules export` writes a version back to files; a second server on the same
database follows a deploy. The broken folder is also restarted on as `loyalty serve`
(the harness of test_crash_safety), after a kill -9."""
from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from conftest import KEYS, MARKET, TEST_HMAC_KEY, Api, connect, database_section, line, receipt, test_config
from rules import ProgramError, load_program
from server.app import create_app
from server.cli import main
from test_crash_safety import Server

NOW = "2026-11-24T12:00:05+02:00"
FOLLOW_WAIT_SECONDS = 20        # generous: the poll is every 50 ms, the machine may be busy


def program_files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*.yaml"))}


def copy_market(tmp_path: Path, name: str = "program") -> Path:
    folder = tmp_path / name
    shutil.copytree(MARKET, folder)
    return folder


def triple_dairy(files: dict[str, str]) -> dict[str, str]:
    changed = dict(files)
    changed["campaigns/promos.yaml"] = changed["campaigns/promos.yaml"].replace("by: 2", "by: 3")
    assert changed != files
    return changed


class Running:
    """An app on its own loopback port, started and stopped inside a test (for restarts)."""

    def __init__(self, config):
        self.config = config
        self.client: TestClient | None = None

    async def __aenter__(self) -> Api:
        self.client = TestClient(TestServer(create_app(self.config), host="127.0.0.1"))
        await self.client.start_server()
        return Api(self.client)

    async def __aexit__(self, *exc) -> None:
        await self.client.close()


def config_for(tmp_path: Path, folder: Path, db: Path | None = None, **rules):
    database = database_section(db) if db is not None else {}
    return test_config(tmp_path, NOW, folder, rules={"poll_interval_ms": 50, **rules}, database=database)


async def versions(api: Api) -> list[dict]:
    status, body = await api.get("/v1/admin/rules/versions")
    assert status == 200, body
    return body["versions"]


async def test_every_program_that_loads_is_recorded_once(tmp_path):
    folder = copy_market(tmp_path)
    config = config_for(tmp_path, folder)
    async with Running(config) as api:
        first = (await api.get("/v1/admin/rules"))[1]["version"]
        [load] = await versions(api)
        assert load["version"] == first and load["source"] == "directory" and load["program"] == "market"
        assert load["deployed_by"] is None

        promos = folder / "campaigns" / "promos.yaml"
        promos.write_text(promos.read_text().replace("by: 2", "by: 3"))
        status, reloaded = await api.post("/v1/admin/rules/reload")
        assert status == 200 and reloaded["version"] != first
        newest, oldest = await versions(api)
        assert newest["version"] == reloaded["version"] and newest["deployed_by"] == "manager"
        assert oldest == load

        status, recorded = await api.get(f"/v1/admin/rules/versions/{first}")
        assert status == 200 and recorded["files"] == program_files(MARKET)
    async with Running(config) as api:      # a restart on the same folder adds nothing
        assert len(await versions(api)) == 2


async def test_deploy_serves_records_audits_and_writes_the_folder(tmp_path):
    folder = copy_market(tmp_path)
    async with Running(config_for(tmp_path, folder)) as api:
        old = (await api.get("/v1/admin/rules"))[1]["version"]
        files = triple_dairy(program_files(folder))
        status, done = await api.post("/v1/admin/rules/deploy", {"files": files, "reason": "dairy week x3"})
        assert status == 200 and done["changed"] is True and done["version"] != old
        new = done["version"]
        assert (await api.get("/v1/admin/rules"))[1]["version"] == new
        assert load_program(folder).version == new          # a restart loads what serves
        assert program_files(folder) == files
        assert not [p for p in folder.rglob(".*")]           # no temporary file left behind
        status, answer = await api.post("/v1/receipts/calculate", receipt("r1", [line(1, "dairy", 9100)]),
                                        as_="register")
        assert status == 200 and answer["rules_version"] == new

        newest = (await versions(api))[0]
        assert (newest["version"], newest["source"], newest["deployed_by"], newest["reason"]) == (
            new, "api", "manager", "dairy week x3")
    audit = connect(tmp_path / "loyalty.db").execute(
        "SELECT key_id, method, path, status FROM audit_log WHERE path = '/v1/admin/rules/deploy'").fetchall()
    assert audit == [("manager", "POST", "/v1/admin/rules/deploy", 200)]


async def test_a_deploy_of_another_program_warns_that_it_is_another_program(tmp_path):
    folder = copy_market(tmp_path)
    async with Running(config_for(tmp_path, folder)) as api:
        cafe = program_files(MARKET.parent / "cafe")
        status, done = await api.post("/v1/admin/rules/deploy", {"files": cafe, "reason": "the wrong folder"})
        assert status == 200 and done["changed"] is True
        expected = ["program id is now 'cafe', was 'market': every holdout's control group is drawn anew; if this "
                    "is not the program meant, roll back",
                    "currency is now PLN, was UAH: amounts already stored (receipts, returns, tier spend) were in "
                    "UAH; if this is not the program meant, roll back"]
        assert done["last_reload"]["warnings"][-2:] == expected
        assert (await api.get("/v1/admin/rules"))[1]["last_reload"]["warnings"][-2:] == expected
        status, done = await api.post("/v1/admin/rules/deploy", {"files": program_files(MARKET), "reason": "back"})
        assert status == 200 and "program id is now 'market', was 'cafe'" in " ".join(done["last_reload"]["warnings"])
        # The same program changed is no other program: no such warning.
        status, done = await api.post("/v1/admin/rules/deploy", {"files": triple_dairy(program_files(MARKET)),
                                                                 "reason": "dairy x3"})
        assert status == 200 and not [w for w in done["last_reload"]["warnings"] if " is now " in w]


async def test_a_rule_whose_holdout_share_changes_warns_that_its_groups_move(tmp_path):
    def with_holdout(files: dict[str, str], share: str) -> dict[str, str]:
        changed = dict(files)
        changed["campaigns/promos.yaml"] = changed["campaigns/promos.yaml"].replace(
            "    scope: {categories: [dairy]}\n", f"    scope: {{categories: [dairy]}}\n    holdout: {share}\n", 1)
        return changed
    folder = copy_market(tmp_path)
    async with Running(config_for(tmp_path, folder)) as api:
        files = program_files(folder)
        for share, before in (("0.5", "none"), ("0.2", "0.5")):
            status, done = await api.post("/v1/admin/rules/deploy", {"files": with_holdout(files, share),
                                                                     "reason": f"holdout {share}"})
            assert status == 200 and done["last_reload"]["warnings"][-1] == (
                f"rule dairy-x2: holdout is now {share}, was {before}: members move between its groups, so its "
                "campaign effect over receipts served before compares groups they were not in; to measure a new "
                "share, give the rule a new id")
        # Another change that keeps the share says nothing of it.
        changed = with_holdout(triple_dairy(files), "0.2")
        status, done = await api.post("/v1/admin/rules/deploy", {"files": changed, "reason": "dairy x3"})
        assert status == 200 and not [w for w in done["last_reload"]["warnings"] if "holdout is now" in w]


async def test_a_page_before_an_impossible_id_is_refused_with_the_field(tmp_path):
    async with Running(config_for(tmp_path, copy_market(tmp_path))) as api:
        for before in ("9" * 30, "0", "-5", "x"):
            status, body = await api.get(f"/v1/admin/rules/versions?before={before}")
            assert status == 422 and body["error"]["details"][0]["path"] == "before", before


async def test_deploys_and_rollbacks_are_audited_with_their_reason(tmp_path):
    folder = copy_market(tmp_path)
    async with Running(config_for(tmp_path, folder)) as api:
        old = (await api.get("/v1/admin/rules"))[1]["version"]
        files = triple_dairy(program_files(folder))
        assert (await api.post("/v1/admin/rules/deploy", {"files": files, "reason": "dairy week x3"}))[0] == 200
        status, done = await api.post("/v1/admin/rules/rollback", {"version": old, "reason": "back to normal"})
        assert status == 200
        assert {k: done["last_reload"]["recorded"][k] for k in ("load_id", "source", "by", "reason")} == {
            "load_id": done["load_id"], "source": "rollback", "by": "manager", "reason": "back to normal"}
        assert (await api.get("/v1/admin/rules"))[1]["last_reload"]["recorded"]["previous_version"] != old
        status, _ = await api.post("/v1/admin/rules/rollback", {"version": "sha256:" + "0" * 64, "reason": "typo"})
        assert status == 404
    conn = connect(tmp_path / "loyalty.db")
    rows = conn.execute("SELECT path, status, key_name, detail FROM audit_log WHERE path LIKE '/v1/admin/rules/%' "
                        "ORDER BY id").fetchall()
    assert [(path, status, json.loads(detail)) for path, status, _, detail in rows] == [
        ("/v1/admin/rules/deploy", 200, {"reason": "dairy week x3"}),
        ("/v1/admin/rules/rollback", 200, {"version": old, "reason": "back to normal"}),
        ("/v1/admin/rules/rollback", 404, {"version": "sha256:" + "0" * 64, "reason": "typo"})]
    newest = conn.execute("SELECT source, deployed_by, deployed_by_name FROM program_loads ORDER BY id DESC").fetchone()
    assert newest == ("rollback", "manager", "manager")     # a config key without a name is named by its id
    from storage import admin_audit
    assert admin_audit.verify(conn).ok


async def test_a_deploy_that_does_not_load_changes_nothing(tmp_path):
    folder = copy_market(tmp_path)
    async with Running(config_for(tmp_path, folder)) as api:
        old = (await api.get("/v1/admin/rules"))[1]["version"]
        files = program_files(folder)
        files["campaigns/promos.yaml"] = files["campaigns/promos.yaml"].replace("reward:", "rewrad:", 1)
        status, err = await api.post("/v1/admin/rules/deploy", {"files": files, "reason": "typo"})
        assert status == 422 and err["error"]["code"] == "rules_invalid"
        assert any(d["path"].startswith("campaigns/promos.yaml:") and "rewrad" in d["message"]
                   for d in err["error"]["details"])
        assert (await api.get("/v1/admin/rules"))[1]["version"] == old
        assert program_files(folder) == program_files(MARKET) and len(await versions(api)) == 1

        status, err = await api.post("/v1/admin/rules/deploy", {"files": files})
        assert status == 422 and err["error"]["details"][0]["path"] == "reason"
        status, err = await api.post("/v1/admin/rules/deploy", {"files": program_files(folder), "reason": "x"},
                                     as_="register")
        assert status == 403


def folder_tree(folder: Path) -> dict[str, bytes | None]:
    """Everything in the folder, hidden files included: None for a folder."""
    return {p.relative_to(folder).as_posix(): None if p.is_dir() else p.read_bytes() for p in folder.rglob("*")}


async def test_a_deploy_that_clashes_with_the_folder_is_refused_and_changes_nothing(tmp_path):
    # The folder has campaigns/promos.yaml as a file; the deploy needs it as a folder.
    folder = copy_market(tmp_path)
    async with Running(config_for(tmp_path, folder)) as api:
        old = (await api.get("/v1/admin/rules"))[1]["version"]
        before = folder_tree(folder)
        files = triple_dairy(program_files(folder))
        files["campaigns/promos.yaml/november.yaml"] = files.pop("campaigns/promos.yaml")
        status, err = await api.post("/v1/admin/rules/deploy", {"files": files, "reason": "promos by month"})
        assert status == 422, err
        assert err["error"]["code"] == "rules_dir_clash"
        assert err["error"]["details"] == [{"path": "files.campaigns/promos.yaml/november.yaml",
                                            "message": f"is inside campaigns/promos.yaml, which is a file in "
                                                       f"{folder}, not a folder"}]
        assert folder_tree(folder) == before
        assert (await api.get("/v1/admin/rules"))[1]["version"] == old and len(await versions(api)) == 1


async def test_a_deploy_of_a_file_where_the_folder_has_a_folder_is_refused_and_changes_nothing(tmp_path):
    folder = copy_market(tmp_path)
    promos = folder / "campaigns" / "promos.yaml"
    text = promos.read_text()
    promos.unlink()
    promos.mkdir()
    (promos / "november.yaml").write_text(text)
    async with Running(config_for(tmp_path, folder)) as api:
        old = (await api.get("/v1/admin/rules"))[1]["version"]
        before = folder_tree(folder)
        # campaigns/base.yaml sorts before the clash: it must not be renamed into place either.
        files = triple_dairy(program_files(MARKET))
        files["campaigns/base.yaml"] += "\n"
        status, err = await api.post("/v1/admin/rules/deploy", {"files": files, "reason": "promos in one file"})
        assert status == 422, err
        assert err["error"]["code"] == "rules_dir_clash"
        assert err["error"]["details"][0]["path"] == "files.campaigns/promos.yaml"
        assert "is a folder in" in err["error"]["message"]
        assert folder_tree(folder) == before
        assert (await api.get("/v1/admin/rules"))[1]["version"] == old and len(await versions(api)) == 1


async def test_the_watcher_does_not_read_a_deploy_back_as_a_change(tmp_path):
    folder = copy_market(tmp_path)
    async with Running(config_for(tmp_path, folder, watch=True, settle_ms=50)) as api:
        status, done = await api.post("/v1/admin/rules/deploy", {"files": triple_dairy(program_files(folder)),
                                                                 "reason": "x3"})
        assert status == 200
        await asyncio.sleep(1)      # many polls and settle periods
        info = (await api.get("/v1/admin/rules"))[1]
        assert info["version"] == done["version"] and info["last_reload"]["trigger"] == "deploy:manager"
        assert len(await versions(api)) == 2

        # A change made by hand is a change: loaded and recorded.
        promos = folder / "campaigns" / "promos.yaml"
        promos.write_text(promos.read_text().replace("by: 3", "by: 4"))
        deadline = time.monotonic() + FOLLOW_WAIT_SECONDS
        while len(loads := await versions(api)) < 3:
            assert time.monotonic() < deadline, "the watcher did not load and record the edit"
            await asyncio.sleep(0.05)
        assert loads[0]["version"] == load_program(folder).version and loads[0]["source"] == "directory"
        assert (await api.get("/v1/admin/rules"))[1]["version"] == loads[0]["version"]


async def test_rollback_serves_a_recorded_version_and_writes_it_back(tmp_path):
    folder = copy_market(tmp_path)
    async with Running(config_for(tmp_path, folder)) as api:
        old = (await api.get("/v1/admin/rules"))[1]["version"]
        # The new version adds a file; rolling back must remove it, or the folder would differ.
        files = triple_dairy(program_files(folder))
        files["campaigns/extra.yaml"] = "rules:\n  - {id: extra, scope: {categories: [bakery]}, reward: {percent: 1}}\n"
        status, done = await api.post("/v1/admin/rules/deploy", {"files": files, "reason": "x3"})
        assert status == 200

        status, back = await api.post("/v1/admin/rules/rollback", {"version": old, "reason": "too generous"})
        assert status == 200 and back["version"] == old and back["changed"] is True
        assert (await api.get("/v1/admin/rules"))[1]["version"] == old
        assert load_program(folder).version == old and program_files(folder) == program_files(MARKET)
        newest = (await versions(api))[0]
        assert (newest["version"], newest["source"], newest["reason"]) == (old, "rollback", "too generous")
        assert [v["version"] for v in await versions(api)] == [old, done["version"], old]

        status, err = await api.post("/v1/admin/rules/rollback", {"version": "sha256:" + "0" * 64, "reason": "x"})
        assert status == 404 and err["error"]["code"] == "unknown_version"
        status, err = await api.post("/v1/admin/rules/rollback", {"version": "latest", "reason": "x"})
        assert status == 422 and err["error"]["details"][0]["path"] == "version"
        status, err = await api.get("/v1/admin/rules/versions/sha256:" + "0" * 64)
        assert status == 404 and err["error"]["code"] == "unknown_version"


async def test_the_list_is_newest_first_and_bounded(tmp_path):
    folder = copy_market(tmp_path)
    async with Running(config_for(tmp_path, folder)) as api:
        base = program_files(folder)
        for n in range(3):
            files = dict(base, **{"campaigns/promos.yaml": base["campaigns/promos.yaml"] + f"# {n}\n"})
            assert (await api.post("/v1/admin/rules/deploy", {"files": files, "reason": f"r{n}"}))[0] == 200
        status, page = await api.get("/v1/admin/rules/versions?limit=2")
        assert status == 200 and [v["reason"] for v in page["versions"]] == ["r2", "r1"]
        status, rest = await api.get(f"/v1/admin/rules/versions?limit=2&before={page['versions'][-1]['id']}")
        assert [v["reason"] for v in rest["versions"]] == ["r0", None]
        status, err = await api.get("/v1/admin/rules/versions?limit=1000")
        assert status == 422 and err["error"]["details"][0]["path"] == "limit"


async def test_a_broken_folder_at_start_serves_the_last_recorded_program(tmp_path, caplog):
    folder = copy_market(tmp_path)
    config = config_for(tmp_path, folder)
    async with Running(config) as api:
        status, done = await api.post("/v1/admin/rules/deploy", {"files": triple_dairy(program_files(folder)),
                                                                 "reason": "x3"})
        recorded = done["version"]
    promos = folder / "campaigns" / "promos.yaml"
    promos.write_text(promos.read_text().replace("reward:", "rewrad:", 1))

    with caplog.at_level(logging.WARNING, logger="loyalty.rules"):
        async with Running(config) as api:
            info = (await api.get("/v1/admin/rules"))[1]
            assert info["version"] == recorded
            last = info["last_reload"]
            assert last["ok"] is False and last["trigger"] == "startup" and last["kept_version"] == recorded
            assert "the database" in last["served_from"]
            assert any("campaigns/promos.yaml:" in e and "rewrad" in e for e in last["errors"])
            assert "loyalty_rules_last_reload_ok 0.0" in (await api.get("/metrics"))[1]
            status, answer = await api.post("/v1/receipts/calculate", receipt("r1", [line(1, "dairy", 9100)]),
                                            as_="register")
            assert status == 200 and answer["rules_version"] == recorded
            assert promos.read_text().count("rewrad:") == 1       # the broken files are left to be fixed
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("STARTED ON A RECORDED PROGRAM" in m and recorded in m for m in warnings)
    assert any("rewrad" in m for m in warnings)          # the folder's problems are in the log


async def test_a_broken_folder_and_nothing_recorded_still_refuses_to_start(tmp_path):
    folder = copy_market(tmp_path)
    promos = folder / "campaigns" / "promos.yaml"
    promos.write_text(promos.read_text().replace("reward:", "rewrad:", 1))
    client = TestClient(TestServer(create_app(config_for(tmp_path, folder)), host="127.0.0.1"))
    with pytest.raises(ProgramError):
        await client.start_server()
    await client.close()


async def test_export_writes_a_version_back_to_files(tmp_path, capsys):
    folder = copy_market(tmp_path)
    config = config_for(tmp_path, folder)
    async with Running(config) as api:
        old = (await api.get("/v1/admin/rules"))[1]["version"]
        status, done = await api.post("/v1/admin/rules/deploy", {"files": triple_dairy(program_files(folder)),
                                                                 "reason": "x3"})
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump({"database": database_section(tmp_path / "loyalty.db"),
                                           "rules": {"dir": str(folder)}, "privacy": {"hmac_key": TEST_HMAC_KEY}}))
    out = tmp_path / "exported"
    assert main(["rules", "export", old, str(out), "--config", str(config_file)]) == 0
    assert main(["rules", "check", str(out), "--today", "2026-11-24"]) == 0
    assert load_program(out).version == old
    assert program_files(out) == program_files(MARKET)

    # Not over a folder that holds something, unless asked; then it holds exactly that version.
    assert main(["rules", "export", done["version"], str(out), "--config", str(config_file)]) == 2
    assert "not empty" in capsys.readouterr().err
    (out / "campaigns" / "leftover.yml").write_text("rules: []\n")
    short = done["version"].removeprefix("sha256:")[:12]
    assert main(["rules", "export", short, str(out), "--config", str(config_file), "--force"]) == 0
    assert load_program(out).version == done["version"] and not (out / "campaigns" / "leftover.yml").exists()

    assert main(["rules", "export", "sha256:" + "0" * 64, str(tmp_path / "none"), "--config", str(config_file)]) == 2
    assert "no program version" in capsys.readouterr().err

    # A folder where the version has a file (or a file above one): refused before anything is written.
    (out / "campaigns" / "promos.yaml").unlink()
    (out / "campaigns" / "promos.yaml").mkdir()
    (out / "campaigns" / "promos.yaml" / "kept.txt").write_text("notes")
    before = folder_tree(out)
    assert main(["rules", "export", old, str(out), "--config", str(config_file), "--force"]) == 2
    err = capsys.readouterr().err
    assert "campaigns/promos.yaml is a folder in" in err and len(err.strip().splitlines()) == 1
    assert folder_tree(out) == before


async def test_a_second_server_on_the_database_follows_a_deploy(tmp_path):
    db = tmp_path / "shared.db"
    first, second = copy_market(tmp_path, "first"), copy_market(tmp_path, "second")
    async with Running(config_for(tmp_path, first, db)) as a, Running(config_for(tmp_path, second, db)) as b:
        status, done = await a.post("/v1/admin/rules/deploy", {"files": triple_dairy(program_files(first)),
                                                               "reason": "x3"})
        assert status == 200
        deadline = time.monotonic() + FOLLOW_WAIT_SECONDS
        while (await b.get("/v1/admin/rules"))[1]["version"] != done["version"]:
            assert time.monotonic() < deadline, "the second server did not follow the deploy"
            await asyncio.sleep(0.05)
        info = (await b.get("/v1/admin/rules"))[1]
        assert info["last_reload"]["trigger"] == "database" and info["last_reload"]["ok"] is True
        status, answer = await b.post("/v1/receipts/calculate", receipt("r1", [line(1, "dairy", 9100)]),
                                      as_="register")
        assert status == 200 and answer["rules_version"] == done["version"]
        assert load_program(second).version == done["version"]     # its own restart would load it too
        assert len(await versions(b)) == 2                        # following records nothing


def test_the_real_server_restarts_on_the_recorded_program_when_its_folder_breaks(tmp_path):
    folder = copy_market(tmp_path)
    server = Server(tmp_path, rules={"dir": str(folder), "watch": False})

    def get(path: str) -> tuple[int, dict]:
        request = urllib.request.Request(server.url(path), headers={"Authorization": f"Bearer {KEYS['manager']}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    server.start()
    try:
        version = get("/v1/admin/rules")[1]["version"]
    finally:
        server.kill()       # kill -9: the record was committed before the server served
    promos = folder / "campaigns" / "promos.yaml"
    promos.write_text(promos.read_text().replace("reward:", "rewrad:", 1))
    server.start()
    try:
        deadline = time.monotonic() + FOLLOW_WAIT_SECONDS
        while get("/readyz")[0] != 200:
            assert time.monotonic() < deadline, server.log.read_text()[-2000:]
            time.sleep(0.05)
        info = get("/v1/admin/rules")[1]
        assert info["version"] == version and info["last_reload"]["ok"] is False
    finally:
        server.kill()
    assert "STARTED ON A RECORDED PROGRAM" in server.log.read_text()
