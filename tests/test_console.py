"""The manager's console through the aiohttp test client: who may sign in, the session
cookie, CSRF refusals, every page for a manager, and what the forms change (the program on
disk and loaded, the audit log, a member's points)."""
from __future__ import annotations

import asyncio
import hashlib
import html
import re
import shutil

import pytest

from conftest import KEYS, MARKET, _h, line, migrated_connection, receipt, tamper
from server.console.sessions import SessionStore
from server.auth import Principal
from server.keys import DATABASE, PROGRAMS, VERSIONS
from storage import admin_audit
from storage import program_versions as versions_store

NOW = "2026-11-24T12:00:05+02:00"
CARD = "7000000000001"
PHONE = "+380501234567"
PROMOS = "campaigns/promos.yaml"
MANAGER_NAME = "Olena Kovalenko"
# The test keys, the manager's with the name of the person holding it.
NAMED_KEYS = {"keys": [
    {"id": "register-S001", "sha256": _h(KEYS["register"]), "role": "register", "stores": ["S001"]},
    {"id": "manager", "sha256": _h(KEYS["manager"]), "role": "manager", "name": MANAGER_NAME},
    {"id": "prometheus", "sha256": _h(KEYS["monitor"]), "role": "monitor"},
]}


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


class Console:
    """A browser-like client: cookies kept, forms posted with the page's CSRF token."""

    def __init__(self, client):
        self.client = client
        self.csrf = ""

    async def login(self, key: str, **kw):
        page = await self.client.get("/console/login")
        token = csrf_of(await page.text())
        return await self.client.post("/console/login", data={"csrf": token, "key": key}, allow_redirects=False, **kw)

    async def sign_in(self):
        response = await self.login(KEYS["manager"])
        assert response.status == 303
        self.csrf = csrf_of(await (await self.client.get("/console")).text())

    async def get(self, path: str):
        response = await self.client.get(path, allow_redirects=False)
        return response.status, await response.text()

    async def post(self, path: str, data: dict, csrf: bool = True, **kw):
        form = {"csrf": self.csrf, **data} if csrf else data
        response = await self.client.post(path, data=form, allow_redirects=False, **kw)
        return response.status, response.headers.get("Location"), await response.text()


@pytest.fixture
async def setup(make_api, tmp_path):
    """(api, console): the market program copied where a deploy may write it, one member with
    one confirmed dairy receipt, a manager signed in to the console."""
    program_dir = tmp_path / "program"
    shutil.copytree(MARKET, program_dir)
    api = await make_api(now=NOW, program_dir=program_dir, auth=NAMED_KEYS)
    assert (await api.post("/v1/members", {"card": CARD, "phone": PHONE}))[0] == 201
    status, _ = await api.post("/v1/receipts", receipt("r1", [line(1, "dairy", 9100)], card=CARD), as_="register")
    assert status == 201
    console = Console(api.client)
    await console.sign_in()
    return api, console


async def audit_rows(api, path: str) -> list[dict]:
    app = api.client.server.app
    return await app[DATABASE].read(lambda conn: admin_audit.rows(conn, 20, path))


# ------------------------------------------------------------------ signing in

@pytest.mark.parametrize("role", ["register", "monitor"])
async def test_register_and_monitor_keys_may_not_sign_in(make_api, role):
    api = await make_api(now=NOW)
    console = Console(api.client)
    response = await console.login(KEYS[role])
    assert response.status == 403
    assert f"a {role} key may not use the console" in await response.text()
    assert "loyalty_console=" not in " ".join(response.headers.getall("Set-Cookie", []))
    assert (await console.get("/console"))[0] == 303


async def test_an_unknown_key_is_refused(make_api):
    console = Console((await make_api(now=NOW)).client)
    response = await console.login("not-a-key")
    assert response.status == 401
    assert "unknown key" in await response.text()


async def test_the_session_cookie_is_httponly_and_samesite_strict(make_api):
    console = Console((await make_api(now=NOW)).client)
    response = await console.login(KEYS["manager"])
    assert response.status == 303 and response.headers["Location"] == "/console"
    cookie = next(c for c in response.headers.getall("Set-Cookie") if c.startswith("loyalty_console="))
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/console"} <= flags
    assert "secure" not in flags
    assert KEYS["manager"] not in cookie


async def test_the_cookies_are_secure_when_configured(make_api):
    api = await make_api(now=NOW, console={"secure_cookie": True})
    response = await api.client.get("/console/login")
    cookie = response.headers["Set-Cookie"]
    assert "secure" in {part.strip().lower() for part in cookie.split(";")[1:]}
    # Over plain HTTP the browser does not send a Secure cookie back: signing in needs TLS.
    response = await Console(api.client).login(KEYS["manager"])
    assert response.status == 403


async def test_sign_in_without_the_form_token_is_refused(make_api):
    api = await make_api(now=NOW)
    response = await api.client.post("/console/login", data={"csrf": "made-up", "key": KEYS["manager"]},
                                     allow_redirects=False)
    assert response.status == 403
    assert "loyalty_console=" not in " ".join(response.headers.getall("Set-Cookie", []))


async def test_signing_out_ends_the_session(setup):
    api, console = setup
    status, location, _ = await console.post("/console/logout", {})
    assert (status, location) == (303, "/console/login")
    assert (await console.get("/console"))[0] == 303
    status, _, page = await console.post("/console/members", {"card": CARD})
    assert status == 401


# ------------------------------------------------------------------ CSRF

async def test_a_form_without_the_csrf_token_changes_nothing(setup):
    api, console = setup
    status, location, _ = await console.post("/console/members", {"card": CARD})
    member_page = location
    _, page = await console.get(member_page)
    adjustment_id = re.search(r'name="adjustment_id" value="([^"]+)"', page).group(1)
    form = {"points": "500", "reason": "forged", "adjustment_id": adjustment_id}
    status, _, page = await console.post(member_page + "/adjust", form, csrf=False)
    assert status == 403 and "CSRF" in page
    status, _, page = await console.post(member_page + "/adjust", {**form, "csrf": "wrong"}, csrf=False)
    assert status == 403
    # The right token from another site's page: the browser names that origin.
    status, _, _ = await console.post(member_page + "/adjust", form, headers={"Origin": "http://evil.example"})
    assert status == 403
    _, member = await api.get(f"/v1/members/{CARD}")
    assert member["balance"]["available"] == 100


@pytest.mark.parametrize("body,content_type", [
    (b"card=\xff\xfe", "application/x-www-form-urlencoded"),
    (b"--x\r\n\r\n--x--\r\n", "multipart/form-data; boundary=x")], ids=["not UTF-8", "a part without a name"])
async def test_a_form_no_browser_sends_is_refused_as_a_page(setup, body, content_type):
    api, console = setup
    response = await api.client.post("/console/members", data=body, headers={"Content-Type": content_type},
                                     allow_redirects=False)
    assert response.status == 400
    assert "the form could not be read" in await response.text()


async def test_the_check_endpoint_needs_the_token_and_answers_the_error_shape(setup):
    api, console = setup
    response = await api.client.post("/console/program/check", json={"file": PROMOS, "text": "rules: []\n"})
    assert response.status == 403
    body = await response.json()
    assert set(body["error"]) == {"code", "message", "details"} and body["error"]["code"] == "forbidden"


# ------------------------------------------------------------------ pages

async def test_every_page_answers_200_for_a_manager(setup):
    api, console = setup
    for path in ("/console", "/console/program", f"/console/program/edit?file={PROMOS}", "/console/explain",
                 "/console/members", "/console/campaigns"):
        status, page = await console.get(path)
        assert status == 200, path
        assert "Content-Security-Policy" in (await api.client.get(path)).headers
    _, location, _ = await console.post("/console/members", {"card": CARD})
    status, page = await console.get(location)
    assert status == 200 and "Member" in page


async def test_pages_without_a_session_go_to_sign_in(make_api):
    console = Console((await make_api(now=NOW)).client)
    for path in ("/console", "/console/program", "/console/members", "/console/campaigns?rule=dairy-x2"):
        status, _ = await console.get(path)
        assert status == 303


async def test_the_dashboard_counts_today(setup):
    api, console = setup
    _, page = await console.get("/console")
    numbers = dict(re.findall(r'<dd id="([\w-]+)">([^<]+)</dd>', page))
    # Welcome 100 + 2 % of 91.00 and the dairy promotion's as much again (3.64, rounded down).
    assert numbers == {"receipts-today": "1", "issued-today": "103", "redeemed-today": "0", "liability": "103"}
    assert "Last reload: loaded" in page


async def test_the_program_page_shows_rules_by_group_in_words(setup):
    api, console = setup
    _, page = await console.get("/console/program")
    assert "Group <code>base</code>" in page
    big_basket = re.search(r'<tr id="rule-big-basket">(.*?)</tr>', page, re.S).group(1)
    assert "50 point(s) per receipt" in big_basket
    assert "the receipt&#39;s total (minor units) is at least 100000" in big_basket
    assert "at most 1 receipt(s) per member per day" in big_basket
    assert "campaigns/promos.yaml:11" in big_basket


# ------------------------------------------------------------------ editing a program

async def test_the_check_finds_a_typo_at_its_line(setup):
    api, console = setup
    text = (api.client.server.app[PROGRAMS].directory / PROMOS).read_text()
    typo = text.replace("reward: {points: 50}", "reward: {pionts: 50}")
    response = await api.client.post("/console/program/check", json={"file": PROMOS, "text": typo},
                                     headers={"X-CSRF-Token": console.csrf})
    answer = await response.json()
    assert response.status == 200 and answer["ok"] is False
    line_no = text.splitlines().index("    reward: {points: 50}") + 1
    assert any(p["file"] == PROMOS and p["line"] == line_no and not p["warning"] for p in answer["problems"])
    response = await api.client.post("/console/program/check", json={"file": PROMOS, "text": text},
                                     headers={"X-CSRF-Token": console.csrf})
    assert (await response.json())["ok"] is True


async def run_backtest(console, text: str, base: str, **form_fields) -> tuple[str, str]:
    """(job id, its finished page): the edit of `text` backtested over November, or over the
    period and of the file form_fields give."""
    form = {"file": PROMOS, "text": text, "base_sha256": base, "from": "2026-11-01", "to": "2026-11-30",
            **form_fields}
    status, location, page = await console.post("/console/program/backtest", form)
    assert status == 303, page
    for _ in range(400):
        _, page = await console.get(location)
        if 'data-state="running"' not in page:
            break
        await asyncio.sleep(0.05)
    assert 'data-state="done"' in page, page
    return location.rsplit("/", 1)[1], page


async def recorded_loads(api) -> list[dict]:
    app = api.client.server.app
    return await app[DATABASE].read(lambda conn: versions_store.loads(conn, 100))


def folder_files(folder) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*.yaml"))}


async def deploy_from_console(console, app, reason: str) -> str:
    """Tripled dairy promotion, backtested and deployed; the page it lands on."""
    text = (app[PROGRAMS].directory / PROMOS).read_text()
    job, _ = await run_backtest(console, text.replace("by: 2", "by: 3"), hashlib.sha256(text.encode()).hexdigest())
    status, location, page = await console.post("/console/program/deploy", {"backtest": job, "reason": reason})
    assert (status, location) == (303, "/console/program"), page
    return (await console.get(location))[1]


async def test_backtest_then_deploy_changes_the_program_and_is_audited(setup):
    api, console = setup
    app = api.client.server.app
    path = app[PROGRAMS].directory / PROMOS
    text = path.read_text()
    before = app[PROGRAMS].current.version
    edited = text.replace("by: 2", "by: 3")
    job, page = await run_backtest(console, edited, hashlib.sha256(text.encode()).hexdigest())
    found = re.search(r"<tr id=\"diff-dairy-x2\">(.*?)</tr>", page, re.S)
    assert found, page[page.find("backtest-state"):][:1500]
    row = found.group(1)
    cells = re.findall(r"<td>([^<]*)</td>", row)
    # The stored receipt: the promotion gave 1.82 (rounded with the base's 1.82 to 3 points:
    # base 2, dairy-x2 1); tripled it gives 3.64 (5.46 in all: base 2, dairy-x2 3).
    assert cells[:3] == ["1", "3", "+2"]
    assert cells[3:6] == ["1.00 UAH", "3.00 UAH", "2.00 UAH"]
    status, location, _ = await console.post("/console/program/deploy", {"backtest": job, "reason": "dairy x3 in December"})
    assert (status, location) == (303, "/console/program")
    assert path.read_text() == edited
    after = app[PROGRAMS].current.version
    assert after != before
    assert app[PROGRAMS].last_reload["trigger"] == "console:manager"
    [audited] = await audit_rows(api, "/console/program/deploy")
    assert audited["key_id"] == "manager" and audited["key_name"] == MANAGER_NAME and audited["status"] == 303
    assert '"reason":"dairy x3 in December"' in audited["detail"]
    assert after in audited["detail"] and before in audited["detail"]
    assert (await app[DATABASE].read(admin_audit.verify)).ok
    status, answer = await api.post("/v1/receipts", receipt("r2", [line(1, "dairy", 10000)], card=CARD), as_="register")
    assert status == 201 and answer["rules_version"] == after
    assert dict((r["rule"], r["points"]) for r in answer["accrued"]["by_rule"])["dairy-x2"] == 4


async def test_a_console_deploy_is_a_recorded_version_with_who_and_why(setup, tmp_path):
    api, console = setup
    app = api.client.server.app
    before = app[PROGRAMS].current.version
    page = await deploy_from_console(console, app, "dairy x3 in December")
    after = app[PROGRAMS].current.version
    newest, first = await recorded_loads(api)
    assert (newest["version"], newest["source"], newest["deployed_by"], newest["deployed_by_name"],
            newest["reason"]) == (after, "console", "manager", MANAGER_NAME, "dairy x3 in December")
    assert first["version"] == before and first["source"] == "directory"
    # The folder holds the recorded program, so a restart loads what serves.
    recorded = await app[DATABASE].read(lambda conn: versions_store.files(conn, after))
    assert folder_files(app[PROGRAMS].directory) == recorded
    # The last-reload panel tells the deploy, not a reload that found nothing new.
    panel = re.search(r'<section class="reload ok" id="last-reload">(.*?)</section>', page, re.S).group(1)
    assert "deployed from the console by Olena Kovalenko" in panel and "no change" not in panel
    assert f"version <code>{after[:19]}</code> recorded" in panel and f"replacing <code>{before[:19]}</code>" in panel
    row = re.search(rf'<tr id="load-{newest["id"]}">(.*?)</tr>', page, re.S).group(1)
    assert "deployed from the console" in row and MANAGER_NAME in row and "dairy x3 in December" in row
    assert "serving" in row and "Roll back" not in row


async def test_a_console_deploy_keeps_the_other_files_of_the_live_program(setup):
    """A broken hand edit of another file, not loaded, is not what goes live: the deploy is
    the program serving with the one edited file changed, and the folder is made to hold it."""
    api, console = setup
    app = api.client.server.app
    program_yaml = app[PROGRAMS].directory / "program.yaml"
    live_program_yaml = program_yaml.read_text()
    program_yaml.write_text(live_program_yaml + "\nbroken: [\n")
    await deploy_from_console(console, app, "dairy x3 in December")
    assert program_yaml.read_text() == live_program_yaml
    assert "by: 3" in (app[PROGRAMS].directory / PROMOS).read_text()
    recorded = await app[DATABASE].read(lambda conn: versions_store.files(conn, app[PROGRAMS].current.version))
    assert recorded == folder_files(app[PROGRAMS].directory)


async def test_a_deploy_made_to_a_program_no_longer_serving_is_refused(setup):
    from server.program_versions import ProgramChanged
    api, console = setup
    app = api.client.server.app
    serving = app[PROGRAMS].current.version
    files = {name: raw.encode() for name, raw in folder_files(app[PROGRAMS].directory).items()}
    files[PROMOS] = files[PROMOS].replace(b"by: 2", b"by: 3")
    with pytest.raises(ProgramChanged):
        await app[VERSIONS].put_live(files, "console", "manager", "late", "console:manager", "sha256:" + "0" * 64)
    assert app[PROGRAMS].current.version == serving and len(await recorded_loads(api)) == 1


async def test_another_server_on_the_database_serves_a_console_deploy(setup, tmp_path):
    from aiohttp.test_utils import TestClient, TestServer
    from conftest import Api, test_config
    from server.app import create_app
    api, console = setup
    app = api.client.server.app
    other_folder = tmp_path / "other"
    shutil.copytree(MARKET, other_folder)
    config = test_config(tmp_path, NOW, other_folder, rules={"poll_interval_ms": 50}, auth=NAMED_KEYS)
    other = TestClient(TestServer(create_app(config), host="127.0.0.1"))
    await other.start_server()
    try:
        await deploy_from_console(console, app, "dairy x3 in December")
        deployed = app[PROGRAMS].current.version
        for _ in range(400):        # the poll is every 50 ms; generous for a busy machine
            if other.server.app[PROGRAMS].current.version == deployed:
                break
            await asyncio.sleep(0.05)
        status, answer = await Api(other).post("/v1/receipts/calculate", receipt("o1", [line(1, "dairy", 9100)]),
                                               as_="register")
        assert status == 200 and answer["rules_version"] == deployed
        assert folder_files(other_folder) == folder_files(app[PROGRAMS].directory)
        recorded = other.server.app[PROGRAMS].last_reload["recorded"]
        assert (recorded["source"], recorded["by_name"], recorded["reason"]) == (
            "console", MANAGER_NAME, "dairy x3 in December")
    finally:
        await other.close()


async def test_roll_back_from_the_console(setup):
    api, console = setup
    app = api.client.server.app
    old = app[PROGRAMS].current.version
    await deploy_from_console(console, app, "dairy x3 in December")
    _, page = await console.get("/console/program")
    first = (await recorded_loads(api))[-1]
    row = re.search(rf'<tr id="load-{first["id"]}">(.*?)</tr>', page, re.S).group(1)
    assert "loaded from the folder" in row and 'action="/console/program/rollback"' in row
    assert f'href="/console/program/versions/{old.replace(":", "%3A")}"' in row
    status, location, page = await console.post("/console/program/rollback",
                                                {"version": old, "reason": "the board said no"})
    assert (status, location) == (303, "/console/program"), page
    assert app[PROGRAMS].current.version == old
    assert folder_files(app[PROGRAMS].directory) == folder_files(MARKET)
    newest = (await recorded_loads(api))[0]
    assert (newest["version"], newest["source"], newest["deployed_by_name"], newest["reason"]) == (
        old, "rollback", MANAGER_NAME, "the board said no")
    [audited] = await audit_rows(api, "/console/program/rollback")
    assert audited["status"] == 303 and audited["key_name"] == MANAGER_NAME
    assert '"reason":"the board said no"' in audited["detail"] and old in audited["detail"]
    assert (await app[DATABASE].read(admin_audit.verify)).ok
    _, page = await console.get("/console/program")
    assert "rolled back by Olena Kovalenko" in page and "the board said no" in page
    status, answer = await api.post("/v1/receipts", receipt("r2", [line(1, "dairy", 10000)], card=CARD), as_="register")
    assert status == 201 and answer["rules_version"] == old
    assert dict((r["rule"], r["points"]) for r in answer["accrued"]["by_rule"])["dairy-x2"] == 2


async def test_a_rollback_without_a_reason_or_the_csrf_token_changes_nothing(setup):
    api, console = setup
    app = api.client.server.app
    old = app[PROGRAMS].current.version
    await deploy_from_console(console, app, "dairy x3 in December")
    deployed, folder, loads = app[PROGRAMS].current.version, folder_files(app[PROGRAMS].directory), await recorded_loads(api)
    status, _, page = await console.post("/console/program/rollback", {"version": old, "reason": "  "})
    assert status == 422 and "reason" in page
    status, _, page = await console.post("/console/program/rollback", {"version": old, "reason": "forged"}, csrf=False)
    assert status == 403 and "CSRF" in page
    status, _, page = await console.post("/console/program/rollback", {"version": "sha256:" + "0" * 64,
                                                                       "reason": "typo"})
    assert status == 422 and "unknown_version" in page
    assert app[PROGRAMS].current.version == deployed
    assert folder_files(app[PROGRAMS].directory) == folder
    assert await recorded_loads(api) == loads
    refused = await audit_rows(api, "/console/program/rollback")
    assert [row["status"] for row in refused] == [422, 422]     # the forged one never got past its token


async def test_a_recorded_version_shows_its_files(setup):
    api, console = setup
    version = api.client.server.app[PROGRAMS].current.version
    status, page = await console.get(f"/console/program/versions/{version}")
    assert status == 200 and PROMOS in page and "reward: {points: 50}" in page
    status, page = await console.get("/console/program/versions/sha256:" + "0" * 64)
    assert status == 404 and "unknown_version" in page


async def test_the_versions_are_listed_a_page_at_a_time(setup):
    api, console = setup
    app = api.client.server.app
    folder = app[PROGRAMS].directory
    base = folder_files(folder)
    for n in range(11):     # eleven more versions: twelve in all
        files = {**base, PROMOS: base[PROMOS] + f"# deploy {n}\n"}
        status, _ = await api.post("/v1/admin/rules/deploy", {"files": files, "reason": f"deploy {n}"})
        assert status == 200
    _, page = await console.get("/console/program")
    rows = re.findall(r'<tr id="load-(\d+)">', page)
    assert rows == [str(n) for n in range(12, 2, -1)]
    older = re.search(r'href="(/console/program\?before=\d+)[^"]*" id="older-versions"', page).group(1)
    _, page = await console.get(older)
    assert re.findall(r'<tr id="load-(\d+)">', page) == ["2", "1"] and 'id="older-versions"' not in page
    for before in ("x", "0", "9" * 30):
        status, page = await console.get(f"/console/program?before={before}")
        assert status == 422 and "before" in page


async def test_a_deploy_over_a_file_changed_meanwhile_is_refused_and_audited(setup):
    api, console = setup
    app = api.client.server.app
    path = app[PROGRAMS].directory / PROMOS
    text = path.read_text()
    job, _ = await run_backtest(console, text.replace("by: 2", "by: 3"), hashlib.sha256(text.encode()).hexdigest())
    changed_by_hand = text + "\n# edited on the server\n"
    path.write_text(changed_by_hand)
    status, _, page = await console.post("/console/program/deploy", {"backtest": job, "reason": "too late"})
    assert status == 409 and "program_changed" in page
    # The edit is on the refusal, to be copied before the file is opened again.
    kept = re.search(r'<textarea id="kept-edit"[^>]*>(.*?)</textarea>', page, re.S)
    assert kept and html.unescape(kept.group(1)) == text.replace("by: 2", "by: 3")
    assert f'href="/console/program/edit?file={PROMOS}" id="edit-again"' in page
    assert path.read_text() == changed_by_hand
    [audited] = await audit_rows(api, "/console/program/deploy")
    assert audited["status"] == 409 and '"reason":"too late"' in audited["detail"]
    _, page = await console.get("/console/program")     # the list of console deploys says why
    assert "refused (409 <code>program_changed</code>)" in page


async def test_a_deploy_needs_a_reason(setup):
    api, console = setup
    path = api.client.server.app[PROGRAMS].directory / PROMOS
    text = path.read_text()
    job, _ = await run_backtest(console, text.replace("by: 2", "by: 3"), hashlib.sha256(text.encode()).hexdigest())
    status, _, page = await console.post("/console/program/deploy", {"backtest": job, "reason": "  "})
    assert status == 422 and "reason" in page
    assert path.read_text() == text


async def test_a_backtest_of_a_broken_edit_shows_the_problems_and_keeps_the_text(setup):
    api, console = setup
    text = (api.client.server.app[PROGRAMS].directory / PROMOS).read_text()
    broken = text.replace("by: 2", "by: two")
    status, _, page = await console.post("/console/program/backtest", {
        "file": PROMOS, "text": broken, "base_sha256": "x", "from": "2026-11-01", "to": "2026-11-30"})
    assert status == 422 and "rules_invalid" in page and f"{PROMOS}:8:" in page
    assert "by: two" in page


async def test_a_backtest_period_is_bounded(setup):
    api, console = setup
    text = (api.client.server.app[PROGRAMS].directory / PROMOS).read_text()
    status, _, page = await console.post("/console/program/backtest", {
        "file": PROMOS, "text": text, "base_sha256": "x", "from": "2020-01-01", "to": "2026-11-30"})
    assert status == 422 and "console.backtest_days_max" in page


async def test_only_files_of_the_program_may_be_edited(setup):
    api, console = setup
    status, page = await console.get("/console/program/edit?file=../../config.yaml")
    assert status == 422 and "is not a file of the live program" in page


# ------------------------------------------------------------------ explain and members

async def test_explain_a_stored_receipt(setup):
    api, console = setup
    status, _, page = await console.post("/console/explain", {"stored": "S001/K01/r1"})
    assert status == 200
    outcomes = dict(re.findall(r'<tr id="why-([^"]+)" class="([^"]+)">', page))
    assert outcomes["base"] == "applied" and outcomes["dairy-x2"] == "applied"
    assert outcomes["big-basket"] == "not-applicable"
    assert "when.total: 9100 is not &gt;= 100000" in page
    assert 'data-source="recorded"' in page and "member m_1, tier base" in page and "receipt #1" in page


async def test_explain_a_pasted_receipt_and_refuse_one_that_is_not(setup):
    api, console = setup
    import json
    body = receipt("p1", [line(1, "bakery", 120000)], card=CARD)
    status, _, page = await console.post("/console/explain", {"receipt": json.dumps(body)})
    assert status == 200
    assert dict(re.findall(r'<tr id="why-([^"]+)" class="([^"]+)">', page))["big-basket"] == "applied"
    assert 'data-source="now"' in page and "The member as they are now" in page and "receipt #2" in page
    status, _, page = await console.post("/console/explain", {"receipt": "{not json"})
    assert status == 422 and "not JSON" in page
    status, _, page = await console.post("/console/explain", {"receipt": json.dumps({**body, "total": "x"})})
    assert status == 422 and "not a receipt" in page and "total" in page


async def test_member_by_card_and_a_manual_adjustment(setup):
    api, console = setup
    status, location, _ = await console.post("/console/members", {"card": CARD})
    assert status == 303 and CARD not in location
    _, page = await console.get(location)
    assert re.search(r'id="available">100<', page) and re.search(r'id="pending">3<', page)
    assert re.search(r'id="tier">base<', page)
    # The way to silver (5,000.00 UAH) in money: 91.00 UAH spent so far.
    assert re.search(r'id="to-next">4909\.00 UAH more spend to silver<', page)
    assert "2026-12-08" in page     # the receipt's lot: available 14 days after its date
    adjustment_id = re.search(r'name="adjustment_id" value="([^"]+)"', page).group(1)
    form = {"points": "25", "reason": "parking refund", "adjustment_id": adjustment_id}
    status, _, page = await console.post(location + "/adjust", form)
    assert status == 200 and re.search(r'id="available">125<', page)
    status, _, page = await console.post(location + "/adjust", form)     # the same form again
    assert "Already made" in page and re.search(r'id="available">125<', page)
    assert f"parking refund <small>(by <span title=\"key manager\">{MANAGER_NAME}</span>)</small>" in page
    _, member = await api.get(f"/v1/members/{CARD}")
    assert member["balance"]["available"] == 125
    audited = await audit_rows(api, location + "/adjust")
    assert len(audited) == 2 and all('"reason":"parking refund"' in row["detail"] for row in audited)
    assert all(row["key_name"] == MANAGER_NAME for row in audited)


async def test_member_by_phone_needs_the_card_to_adjust(setup):
    api, console = setup
    status, location, _ = await console.post("/console/members", {"phone": PHONE})
    assert status == 303
    _, page = await console.get(location)
    adjustment_id = re.search(r'name="adjustment_id" value="([^"]+)"', page).group(1)
    form = {"points": "-10", "reason": "duplicate welcome", "adjustment_id": adjustment_id}
    status, _, page = await console.post(location + "/adjust", {**form, "card": "7000000000999"})
    assert status == 422 and "must be a card of this member" in page
    status, _, page = await console.post(location + "/adjust", {**form, "card": CARD})
    assert status == 200 and re.search(r'id="available">90<', page)


async def test_an_unknown_card_is_said_so(setup):
    api, console = setup
    status, _, page = await console.post("/console/members", {"card": "7000000000999"})
    assert status == 404 and "is not enrolled" in page


# ------------------------------------------------------------------ the session store

def test_sessions_end_when_idle_and_the_store_is_bounded():
    clock = [0.0]
    store = SessionStore(sessions_max=2, idle_seconds=60, lifetime_seconds=3600, now=lambda: clock[0])
    manager = Principal("manager", "manager", frozenset())
    first, _ = store.open(manager)
    clock[0] = 59
    assert store.get(first) is not None       # used: idle time starts again
    clock[0] = 119
    assert store.get(first) is not None
    clock[0] = 180
    assert store.get(first) is None           # unused for 61 s
    a, _ = store.open(manager)
    b, _ = store.open(manager)
    store.get(a)
    c, _ = store.open(manager)                # one too many: the one idle longest goes
    assert store.get(b) is None and store.get(a) is not None and store.get(c) is not None
    assert len(store) == 2
    clock[0] = 180 + 3601
    assert store.get(a) is None               # past the session's lifetime


def test_a_changed_deploy_reason_breaks_the_audit_chain(tmp_path):
    conn = migrated_connection(tmp_path / "a.db")
    row = dict(key_id="manager", key_name="Manager", method="POST", body_digest="0" * 64, status=303)
    admin_audit.append(conn, at="2026-11-24T10:00:00.000000Z", path="/v1/admin/rules/reload", **row)
    admin_audit.append(conn, at="2026-11-24T10:00:01.000000Z", path="/console/program/deploy",
                       detail='{"reason":"dairy x3"}', **row)
    assert admin_audit.verify(conn).ok
    tamper(conn, "audit_log", """UPDATE audit_log SET detail = '{"reason":"approved by the board"}' WHERE id = 2""")
    result = admin_audit.verify(conn)
    assert not result.ok and result.first_bad_id == 2
