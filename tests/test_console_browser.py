"""The console in a real browser against the real server process: Debian's chromium driven
through its chromedriver (nothing is downloaded), loopback only.

Sign in, open the program, make a typo and see the error at its line, fix it, run the
backtest, deploy, and see the new version serve a receipt; roll back to the first version
and see it serve again; then explain that receipt and look its member up. On a program with
a control group: the campaign effect page from the dashboard, with its chart.
CONSOLE_SCREENSHOTS=DIR (`make console-screenshots`: docs/console) keeps a screenshot of each
page there.
"""
from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path

import pytest

from conftest import KEYS, MARKET, _h, line, receipt
from server.report_campaign import holdout_member
from test_crash_safety import Server

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(
    not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
    reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver): "
           "apt-get install -y chromium chromium-driver")
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CARD = "7000000000001"
MANAGER_NAME = "Olena Kovalenko"
PROMOS = "campaigns/promos.yaml"
WAIT_SECONDS = 30


def api(server: Server, method: str, path: str, body: dict, key: str) -> tuple[int, dict]:
    request = urllib.request.Request(server.url(path), data=json.dumps(body).encode(), method=method,
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, json.loads(response.read())


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                     "--no-first-run", "--disable-background-networking", "--disable-sync",
                     "--disable-component-update", "--disable-default-apps",
                     # Only the server under test answers: any other host name fails to resolve.
                     "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(WAIT_SECONDS)
    try:
        yield driver
    finally:
        driver.quit()


def serve(tmp_path, holdout: bool = False):
    """The real server on a copy of the market program (dairy-x2 with half its audience held out
    when `holdout`)."""
    program = tmp_path / "program"
    shutil.copytree(MARKET, program)
    if holdout:
        promos = program / PROMOS
        promos.write_text(promos.read_text().replace("    scope: {categories: [dairy]}\n",
                                                     "    scope: {categories: [dairy]}\n    holdout: 0.5\n", 1))
    keys = [{"id": "register-S001", "sha256": _h(KEYS["register"]), "role": "register", "stores": ["S001"]},
            {"id": "manager", "sha256": _h(KEYS["manager"]), "role": "manager", "name": MANAGER_NAME}]
    server = Server(tmp_path, rules={"dir": str(program), "watch": True}, auth={"keys": keys})
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def server(tmp_path):
    yield from serve(tmp_path)


@pytest.fixture
def holdout_server(tmp_path):
    yield from serve(tmp_path, holdout=True)


class Shots:
    def __init__(self, driver, folder: Path):
        self.driver, self.folder = driver, folder
        folder.mkdir(parents=True, exist_ok=True)

    def take(self, name: str) -> None:
        assert self.driver.save_screenshot(str(self.folder / f"{name}.png"))


# chromedriver reports an element the page replaced between finding it and reading it as an
# "unhandled inspector error", not as a stale element; the next poll finds the new one.
REPLACED_NODE = ("Node with given id does not belong to the document", "No node with given id found")


def wait(driver, condition):
    def polled(d):
        try:
            return condition(d)
        except StaleElementReferenceException:
            return False
        except WebDriverException as e:
            if any(text in (e.msg or "") for text in REPLACED_NODE):
                return False
            raise
    return WebDriverWait(driver, WAIT_SECONDS).until(polled)


def replace_text(area, text: str) -> None:
    area.send_keys(Keys.CONTROL, "a")
    area.send_keys(Keys.DELETE)
    area.send_keys(text)


def test_edit_check_backtest_deploy_and_serve(server, browser, tmp_path):
    shots = Shots(browser, Path(os.environ.get("CONSOLE_SCREENSHOTS") or tmp_path / "shots"))
    assert api(server, "POST", "/v1/members", {"card": CARD, "phone": "+380501234567"}, KEYS["manager"])[0] == 201
    status, _ = api(server, "POST", "/v1/receipts",
                    receipt("000123", [line(1, "dairy", 9100), line(2, "bakery", 3000)], card=CARD), KEYS["register"])
    assert status == 201

    # Sign in with the keyboard alone.
    browser.get(server.url("/console/login"))
    shots.take("login")
    browser.find_element(By.ID, "key").send_keys(KEYS["manager"], Keys.ENTER)
    wait(browser, EC.url_to_be(server.url("/console")))
    assert browser.find_element(By.ID, "receipts-today").text == "1"
    shots.take("dashboard")

    # The program, its rules in words.
    browser.find_element(By.LINK_TEXT, "Program").click()
    wait(browser, EC.presence_of_element_located((By.ID, "rule-big-basket")))
    version_before = browser.find_element(By.ID, "version").text
    assert "at least 100000" in browser.find_element(By.ID, "rule-big-basket").text
    shots.take("program")

    # A typo: the server's checker names its line as it is typed.
    browser.find_element(By.LINK_TEXT, f"Edit {PROMOS}").click()
    area = wait(browser, EC.presence_of_element_located((By.ID, "text")))
    original = area.get_attribute("value")
    typo_line = original.splitlines().index("    reward: {points: 50}") + 1
    replace_text(area, original.replace("reward: {points: 50}", "reward: {pionts: 50}"))
    problem = wait(browser, EC.presence_of_element_located(
        (By.XPATH, f"//ul[@id='check-problems']/li[contains(., '{PROMOS}:{typo_line}:')]")))
    assert "would not load" in browser.find_element(By.ID, "check-status").text
    shots.take("edit-error")
    problem.find_element(By.TAG_NAME, "button").click()      # moves the cursor to the line
    caret = browser.execute_script("const a = document.getElementById('text');"
                                   "return a.value.slice(0, a.selectionStart).split('\\n').length;")
    assert caret == typo_line

    # Fixed, and the change meant: dairy earns its base points twice more instead of once.
    replace_text(area, original.replace("by: 2", "by: 3"))
    wait(browser, EC.text_to_be_present_in_element((By.ID, "check-status"), "No errors"))
    assert browser.find_elements(By.CSS_SELECTOR, "#check-problems li.problem") == []

    browser.find_element(By.ID, "run-backtest").click()
    wait(browser, EC.presence_of_element_located((By.CSS_SELECTOR, "#backtest-state[data-state='done']")))
    cells = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#diff-dairy-x2 td")]
    # 2.42 base and 1.82 dairy (4.24: 4 points, 2 of them dairy-x2) become 2.42 and 3.64 (6: 4 of them).
    assert cells[:3] == ["2", "4", "+2"] and cells[5] == "2.00 UAH"
    shots.take("backtest")

    reason = browser.find_element(By.ID, "reason")
    reason.send_keys("dairy x3 for the December campaign", Keys.ENTER)
    wait(browser, EC.url_to_be(server.url("/console/program")))
    version_after = browser.find_element(By.ID, "version").text
    assert version_after != version_before
    assert "dairy x3 for the December campaign" in browser.find_element(By.ID, "deploys").text
    assert "deployed from the console" in browser.find_element(By.ID, "last-reload").text
    newest = browser.find_element(By.CSS_SELECTOR, "#versions tbody tr")
    assert "dairy x3 for the December campaign" in newest.text and "serving" in newest.text
    assert MANAGER_NAME in newest.text
    shots.take("program-deployed")
    browser.execute_script("document.getElementById('versions-title').scrollIntoView()")
    shots.take("program-versions")

    # The new version serves the next receipt.
    status, answer = api(server, "POST", "/v1/receipts", receipt("000124", [line(1, "dairy", 10000)], card=CARD),
                         KEYS["register"])
    assert status == 201 and answer["rules_version"] == version_after
    assert {r["rule"]: r["points"] for r in answer["accrued"]["by_rule"]}["dairy-x2"] == 4

    # Roll back to the version loaded from the folder, with a reason; it serves again.
    first = browser.find_element(By.XPATH, f"//table[@id='versions']//tr[.//code[@title='{version_before}']][.//form]")
    first.find_element(By.NAME, "reason").send_keys("the campaign was postponed", Keys.ENTER)
    wait(browser, EC.text_to_be_present_in_element((By.ID, "version"), version_before))
    assert "rolled back" in browser.find_element(By.ID, "last-reload").text
    assert "the campaign was postponed" in browser.find_element(By.CSS_SELECTOR, "#versions tbody tr").text
    shots.take("program-rolled-back")
    status, answer = api(server, "POST", "/v1/receipts/calculate",
                         receipt("000125", [line(1, "dairy", 10000)], card=CARD), KEYS["register"])
    assert status == 200 and answer["rules_version"] == version_before
    assert {r["rule"]: r["points"] for r in answer["accrued"]["by_rule"]}["dairy-x2"] == 2

    # Why each rule applied or not, on the stored receipt.
    browser.find_element(By.LINK_TEXT, "Explain a receipt").click()
    select = wait(browser, EC.presence_of_element_located((By.ID, "stored")))
    select.find_element(By.XPATH, "./option[starts-with(@value, 'S001/K01/000124')]").click()
    browser.find_element(By.ID, "explain").click()
    row = wait(browser, EC.presence_of_element_located((By.ID, "why-big-basket")))
    assert "is not >= 100000" in row.text
    shots.take("explain")

    # The member: balance, lots, statement.
    browser.find_element(By.LINK_TEXT, "Members").click()
    wait(browser, EC.presence_of_element_located((By.ID, "card"))).send_keys(CARD, Keys.ENTER)
    available = wait(browser, EC.presence_of_element_located((By.ID, "available")))
    assert available.text == "100"
    assert browser.find_element(By.ID, "pending").text == "10"       # 4 and 6 from the two receipts
    assert "dairy-x2" in browser.find_element(By.ID, "statement").text
    shots.take("member")

    browser.find_element(By.LINK_TEXT, "Dashboard").click()
    wait(browser, EC.text_to_be_present_in_element((By.ID, "receipts-today"), "2"))
    browser.find_element(By.XPATH, "//button[.='Sign out']").click()
    wait(browser, EC.url_to_be(server.url("/console/login")))
    browser.get(server.url("/console"))
    assert browser.current_url == server.url("/console/login")


def test_campaign_effect_from_the_dashboard(holdout_server, browser, tmp_path):
    server = holdout_server
    shots = Shots(browser, Path(os.environ.get("CONSOLE_SCREENSHOTS") or tmp_path / "shots"))
    # Sixteen members over four weeks of November; the treated ones (dairy-x2 not held out) spend more.
    for i in range(1, 17):
        card = f"70000000001{i:02d}"
        assert api(server, "POST", "/v1/members", {"card": card}, KEYS["manager"])[0] == 201
        treated = not holdout_member("market", "dairy-x2", f"m_{i}", "0.5")
        for week in range(4):
            ts = f"2026-11-{1 + 7 * week + i % 3:02d}T11:00:00+02:00"
            dairy = 4000 + 100 * (i % 4) + 900 * week + (3000 if treated else 0)
            status, _ = api(server, "POST", "/v1/receipts", receipt(
                f"c{i}-{week}", [line(1, "dairy", dairy), line(2, "bakery", 2000 + 150 * i)], card=card, ts=ts),
                KEYS["register"])
            assert status == 201

    browser.get(server.url("/console/login"))
    browser.find_element(By.ID, "key").send_keys(KEYS["manager"], Keys.ENTER)
    wait(browser, EC.url_to_be(server.url("/console")))
    browser.find_element(By.LINK_TEXT, "dairy-x2").click()        # the dashboard's link: the rule's own period
    wait(browser, EC.presence_of_element_located((By.ID, "campaign-report")))
    assert "2026-11-20 to 2026-11-30" in browser.find_element(By.ID, "report-title").text

    # The whole month instead, with the keyboard from the form.
    browser.execute_script("document.getElementById('from').value = '2026-11-01';"
                           "document.getElementById('to').value = '2026-11-28';")
    browser.find_element(By.ID, "show-report").send_keys(Keys.ENTER)
    wait(browser, EC.text_to_be_present_in_element((By.ID, "report-title"), "2026-11-01 to 2026-11-28"))
    treated = browser.find_element(By.ID, "group-treated").text
    assert treated.startswith("treated") and "UAH" in treated
    chart = browser.find_element(By.CSS_SELECTOR, "#campaign-chart svg")
    assert chart.size["width"] > 300 and chart.size["height"] > 100
    assert len(chart.find_elements(By.TAG_NAME, "path")) == 2
    assert browser.find_element(By.ID, "verdict").text.startswith("The campaign raised spend per member")
    browser.set_window_size(1280, 1500)
    shots.take("campaign-effect")
