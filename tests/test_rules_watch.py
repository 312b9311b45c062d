"""Editing the program folder reloads it; a broken edit is refused and the old program keeps serving."""
import asyncio
import os
import signal
import shutil

from conftest import MARKET, line, receipt
from server import watcher
from server.keys import PROGRAMS

NOW = "2026-11-24T12:00:05+02:00"


async def wait_for(predicate, timeout_s: float = 10.0):
    for _ in range(int(timeout_s / 0.05)):
        if await predicate():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_file_change_reloads_and_broken_edit_is_refused(make_api, tmp_path):
    program = tmp_path / "program"
    shutil.copytree(MARKET, program)
    api = await make_api(now=NOW, program_dir=program,
                         rules={"watch": True, "poll_interval_ms": 50, "settle_ms": 100})
    _, info = await api.get("/v1/admin/rules")
    first = info["version"]

    base = next(program.rglob("base.yaml"))
    base.write_text(base.read_text().replace("percent: 2", "percent: 4", 1))

    async def version_changed():
        return (await api.get("/v1/admin/rules"))[1]["version"] != first
    assert await wait_for(version_changed)
    await api.post("/v1/members", {"card": "1"})
    _, res = await api.post("/v1/receipts", receipt("W-1", [line(1, "bakery", 10000)], card="1"), as_="register")
    assert res["accrued"]["by_rule"] == [{"rule": "base", "points": 4}]
    second = (await api.get("/v1/admin/rules"))[1]["version"]
    assert res["rules_version"] == second

    base.write_text("rules: [\n")

    async def refused():
        return (await api.get("/v1/admin/rules"))[1]["last_reload"]["ok"] is False
    assert await wait_for(refused)
    _, info = await api.get("/v1/admin/rules")
    assert info["version"] == second
    _, res = await api.post("/v1/receipts", receipt("W-2", [line(1, "bakery", 10000)], card="1",
                                                    ts="2026-11-24T12:00:01+02:00"), as_="register")
    assert res["rules_version"] == second and res["accrued"]["points"] == 4


async def watched_api(make_api, tmp_path):
    program = tmp_path / "program"
    shutil.copytree(MARKET, program)
    api = await make_api(now=NOW, program_dir=program,
                         rules={"watch": True, "poll_interval_ms": 50, "settle_ms": 100})
    return api, program


async def last_reload(api) -> dict:
    return (await api.get("/v1/admin/rules"))[1]["last_reload"]


async def test_a_link_to_nothing_named_yaml_is_refused_and_the_old_program_keeps_serving(make_api, tmp_path):
    api, program = await watched_api(make_api, tmp_path)
    first = (await api.get("/v1/admin/rules"))[1]["version"]
    link = program / "campaigns" / "december.yaml"
    link.symlink_to(tmp_path / "nowhere.yaml")

    async def refused():
        return (await last_reload(api))["ok"] is False
    assert await wait_for(refused), "the watcher did not notice the link"
    info = (await api.get("/v1/admin/rules"))[1]
    assert info["version"] == first and info["last_reload"]["kept_version"] == first
    assert info["last_reload"]["errors"] == [
        f"campaigns/december.yaml:1:1: cannot read: a symbolic link to {tmp_path / 'nowhere.yaml'}, "
        "which does not exist"]

    # The file it names appears: a change too, loaded.
    (tmp_path / "nowhere.yaml").write_text("rules: []\n")

    async def loaded():
        return (await last_reload(api))["ok"] is True
    assert await wait_for(loaded)
    assert (await api.get("/v1/admin/rules"))[1]["version"] != first


async def test_a_reload_that_raises_is_reported_and_the_watcher_keeps_watching(make_api, tmp_path, monkeypatch,
                                                                               caplog):
    api, program = await watched_api(make_api, tmp_path)
    first = (await api.get("/v1/admin/rules"))[1]["version"]
    holder = api.client.server.app[PROGRAMS]

    def fails(trigger, who=None):
        raise RuntimeError("the machine hiccuped")
    monkeypatch.setattr(holder, "reload", fails)
    base = program / "campaigns" / "base.yaml"
    base.write_text(base.read_text().replace("percent: 2", "percent: 4", 1))

    async def failed():
        return (await last_reload(api))["ok"] is False
    assert await wait_for(failed), "the failed reload was not reported"
    info = (await api.get("/v1/admin/rules"))[1]
    assert info["version"] == first
    assert info["last_reload"]["errors"] == ["the reload failed: RuntimeError: the machine hiccuped"]
    metrics = (await api.get("/metrics"))[1]
    assert 'loyalty_rules_reloads_total{result="failed"} 1.0' in metrics
    assert "loyalty_rules_last_reload_ok 0.0" in metrics
    said = [r for r in caplog.records if r.name == "loyalty.rules" and "failed" in r.getMessage()]
    assert [r.getMessage() for r in said] == [
        f"rules reload (file change) failed, still serving {first}: RuntimeError: the machine hiccuped"]

    # The next change is still picked up.
    monkeypatch.undo()
    base.write_text(base.read_text().replace("percent: 4", "percent: 5", 1))

    async def changed():
        return (await api.get("/v1/admin/rules"))[1]["version"] != first
    assert await wait_for(changed), "the watcher stopped after the failed reload"
    assert (await last_reload(api))["ok"] is True


async def test_a_look_at_the_folder_that_keeps_failing_is_said_once_and_watching_goes_on(make_api, tmp_path,
                                                                                         monkeypatch, caplog):
    api, program = await watched_api(make_api, tmp_path)
    first = (await api.get("/v1/admin/rules"))[1]["version"]

    def fails(directory):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(watcher, "signature", fails)

    async def failed():
        return (await last_reload(api))["ok"] is False
    assert await wait_for(failed)
    await asyncio.sleep(0.5)        # some ten polls more, failing the same way
    said = [r for r in caplog.records if r.name == "loyalty.rules" and "failed" in r.getMessage()]
    assert len(said) == 1 and "OSError: [Errno 5] Input/output error" in said[0].getMessage()

    monkeypatch.undo()
    base = program / "campaigns" / "base.yaml"
    base.write_text(base.read_text().replace("percent: 2", "percent: 4", 1))

    async def changed():
        return (await api.get("/v1/admin/rules"))[1]["version"] != first
    assert await wait_for(changed), "the watcher stopped after the failed looks"


async def test_a_sighup_reload_that_raises_is_reported_and_the_next_sighup_loads(make_api, tmp_path, monkeypatch):
    program = tmp_path / "program"
    shutil.copytree(MARKET, program)
    api = await make_api(now=NOW, program_dir=program)
    first = (await api.get("/v1/admin/rules"))[1]["version"]
    holder = api.client.server.app[PROGRAMS]
    reload = holder.reload

    def fails(trigger, who=None):
        raise OSError("Input/output error")
    monkeypatch.setattr(holder, "reload", fails)
    base = program / "campaigns" / "base.yaml"
    base.write_text(base.read_text().replace("percent: 2", "percent: 4", 1))
    os.kill(os.getpid(), signal.SIGHUP)

    async def failed():
        return (await last_reload(api))["ok"] is False
    assert await wait_for(failed), "the failed SIGHUP reload was not reported"
    said = await last_reload(api)
    assert (said["trigger"], said["errors"]) == ("SIGHUP", ["the reload failed: OSError: Input/output error"])
    assert 'loyalty_rules_reloads_total{result="failed"} 1.0' in (await api.get("/metrics"))[1]

    monkeypatch.setattr(holder, "reload", reload)
    os.kill(os.getpid(), signal.SIGHUP)

    async def changed():
        return (await api.get("/v1/admin/rules"))[1]["version"] != first
    assert await wait_for(changed), "the next SIGHUP did not reload"
