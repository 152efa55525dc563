"""The web console in a real browser (Debian's headless Chromium through chromedriver) against a running platform.

Set ``STOKER_CONSOLE_SCREENSHOTS=<folder>`` to keep a screenshot of each page (``docs/console`` holds them).
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx import Client
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from services.cli import platform as embedded
from tests.e2e.conftest import Platform, start_platform
from tests.helpers import assert_eventually

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PAGES = ["/console", "/console/functions", "/console/invocations", "/console/workflows"]
FLOW = """
steps:
  - id: first
    function: hello
    input: {name: $.input.who}
  - id: each
    function: hello
    after: [first]
    map: $.input.names
    input: {name: $.item}
  - id: last
    function: hello
    after: [each]
    input: {name: $.steps.first.output.greeting}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    home = tmp_path_factory.mktemp("stoker-console")
    # A short idle time: the test of an unwatched console does not wait two minutes.
    running, _ = start_platform(home, env_extra={"STOKER_CONSOLE_IDLE_S": "4"})
    try:
        yield running
    finally:
        running.stoker("down", check=False)


@pytest.fixture(scope="module")
def console_url(cluster: Platform) -> str:
    return f"http://127.0.0.1:{cluster.env['STOKER_CONSOLE_PORT']}"


def log_in(browser: WebDriver, console_url: str, token: str, succeeds: bool = True) -> None:
    """Through the login page, as a user does: the console keeps the token in an HttpOnly cookie."""
    browser.get(f"{console_url}/console/login")
    WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.ID, "token"))
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.ID, "login").click()
    if succeeds:
        WebDriverWait(browser, 20).until(lambda d: "/console/login" not in d.current_url)


@pytest.fixture(scope="module")
def browser(cluster: Platform, console_url: str) -> Iterator[WebDriver]:
    for path in (CHROMIUM, CHROMEDRIVER):
        assert shutil.which(path), f"{path} is missing: `make browser` installs Debian's chromium and chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1300,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        log_in(driver, console_url, cluster.admin_token)
        yield driver
    finally:
        driver.quit()


def open_page(browser: WebDriver, url: str) -> None:
    browser.get(url)
    WebDriverWait(browser, 20).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"))


def texts(browser: WebDriver, css: str, attribute: str) -> dict[str, str]:
    """``attribute`` -> text of each element matching ``css``, read in one go: the pages re-render as
    events arrive, so an element found in one call may be replaced before the next."""
    found: dict[str, str] = browser.execute_script(
        "return Object.fromEntries([...document.querySelectorAll(arguments[0])]"
        ".map(e => [e.getAttribute(arguments[1]), e.innerText]))",
        css,
        attribute,
    )
    return found


def click(browser: WebDriver, css: str) -> None:
    """Click the element that is there now (a user's click, through the page's own handler)."""
    assert browser.execute_script(
        "const e = document.querySelector(arguments[0]); if (e) e.click(); return !!e", css
    ), f"nothing to click at {css}"


def attribute_of(browser: WebDriver, css: str, name: str) -> str | None:
    value: str | None = browser.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.getAttribute(arguments[1]) : null", css, name
    )
    return value


def errors_in(browser: WebDriver) -> list[dict[str, Any]]:
    return [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def screenshot(browser: WebDriver, name: str) -> None:
    folder = os.environ.get("STOKER_CONSOLE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        time.sleep(0.5)  # the charts' first frame
        browser.save_screenshot(str(Path(folder) / f"{name}.png"))


def invoke(cluster: Platform, name: str = "you") -> str:
    with cluster.client() as http:
        answer = http.post("/fn/hello", json={"name": name})
    assert answer.status_code == 200, answer.text
    return answer.headers["X-Stoker-Invocation-Id"]


def test_the_gateway_sends_a_browser_to_the_console(cluster: Platform, console_url: str) -> None:
    answer = httpx.get(f"{cluster.http}/console", follow_redirects=False)
    assert answer.status_code == 307
    assert answer.headers["location"] == f"{console_url}/console"


def test_every_page_loads_without_console_errors(cluster: Platform, console_url: str, browser: WebDriver) -> None:
    invoke(cluster)
    for path in PAGES:
        open_page(browser, console_url + path)
        assert not errors_in(browser), f"{path}: {errors_in(browser)}"
        assert browser.find_element(By.ID, "app").text.strip(), f"{path} rendered nothing"
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "broker").get_attribute("data-up") == "yes")


def test_the_cluster_page_shows_nodes_their_instances_and_figures(
    cluster: Platform, console_url: str, browser: WebDriver
) -> None:
    open_page(browser, console_url + "/console")
    nodes = texts(browser, "article.node", "data-node")
    assert {"management-0", "runtime-0", "runtime-1", "isolated-0"} <= set(nodes)
    assert "stoker.io/dedicated=runtime:NoSchedule" in nodes["runtime-0"] and "generic" in nodes["runtime-0"]
    assert any("hello@" in text for text in nodes.values()), "the instance that ran hello shows its function@version"
    assert any("memory:" in text and "MB" in text for text in nodes.values()), "a node with user code shows its figures"
    screenshot(browser, "cluster")


def test_an_invocation_appears_in_the_stream_within_a_second(
    cluster: Platform, console_url: str, browser: WebDriver
) -> None:
    open_page(browser, console_url + "/console/invocations")
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "broker").get_attribute("data-up") == "yes")
    ident = invoke(cluster, "stream")
    answered = time.monotonic()
    WebDriverWait(browser, 5, poll_frequency=0.02).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, f'tr[data-invocation="{ident}"]')
    )
    shown_after = time.monotonic() - answered
    assert shown_after < 1.0, f"the result showed {shown_after:.2f} s after the HTTP answer"
    row = texts(browser, "tr[data-invocation]", "data-invocation")[ident]
    assert "hello" in row and "ok" in row
    # A filter hides what does not match and shows what does.
    browser.find_element(By.CSS_SELECTOR, 'select[name="status"] option[value="error"]').click()
    assert ident not in texts(browser, "tr[data-invocation]", "data-invocation")
    browser.find_element(By.CSS_SELECTOR, 'select[name="status"] option[value="ok"]').click()
    assert ident in texts(browser, "tr[data-invocation]", "data-invocation")
    screenshot(browser, "invocations")
    assert not errors_in(browser)


def test_an_invocation_page_shows_its_result_and_trace_waterfall(
    cluster: Platform, console_url: str, browser: WebDriver
) -> None:
    ident = invoke(cluster, "trace")
    open_page(browser, f"{console_url}/console/invocations/{ident}")
    WebDriverWait(browser, 15).until(lambda d: d.find_elements(By.ID, "waterfall-0"))
    assert browser.find_element(By.ID, "result").get_attribute("data-status") == "ok"
    assert "Hello, trace!" in browser.find_element(By.ID, "result").text
    spans = int(browser.find_element(By.ID, "waterfall-0").get_attribute("data-spans") or 0)
    services = {
        row.get_attribute("data-service") for row in browser.find_elements(By.CSS_SELECTOR, "table.spans tr[data-span]")
    }
    names = {
        row.get_attribute("data-span") for row in browser.find_elements(By.CSS_SELECTOR, "table.spans tr[data-span]")
    }
    assert spans >= 5 and spans == len(browser.find_elements(By.CSS_SELECTOR, "table.spans tr[data-span]"))
    assert {"gateway", "dispatcher"} <= services and any(s.startswith("agent-") for s in services), services
    assert {"stoker start", "stoker exec"} <= names, names
    # The chart is drawn: its canvas holds pixels other than the background.
    drawn = browser.execute_script(
        "const c = document.getElementById('waterfall-0'); const d = c.getContext('2d')"
        ".getImageData(0, 0, c.width, c.height).data; let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++;"
        " return n;"
    )
    assert drawn > 1000
    screenshot(browser, "invocation")
    assert not errors_in(browser)


def test_a_workflow_run_shows_its_dag_with_step_states(
    cluster: Platform, console_url: str, browser: WebDriver, tmp_path: Path
) -> None:
    source = tmp_path / "flow.yaml"
    source.write_text(FLOW)
    cluster.stoker("wf", "create", "greetings", "-f", str(source))
    cluster.stoker("wf", "run", "greetings", "--data", '{"who": "Ada", "names": ["Bo", "Cy"]}')
    open_page(browser, console_url + "/console/workflows")
    article = browser.find_element(By.CSS_SELECTOR, 'article[data-workflow="greetings"]')
    assert article.find_elements(By.CSS_SELECTOR, ".dag canvas"), "the definition's DAG is drawn"
    run_link = WebDriverWait(browser, 10).until(
        lambda d: d.find_element(By.CSS_SELECTOR, 'article[data-workflow="greetings"] a[href^="/console/runs/"]')
    )
    screenshot(browser, "workflows")
    run_link.click()
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#steps tr[data-step]"))
    assert browser.find_element(By.ID, "run-status").get_attribute("data-status") == "ok"
    states = {
        row.get_attribute("data-step"): row.get_attribute("data-status")
        for row in browser.find_elements(By.CSS_SELECTOR, "#steps tr[data-step]")
    }
    assert states == {"first": "ok", "each": "ok", "last": "ok"}
    nodes = browser.execute_script("return [...document.querySelectorAll('#run-dag canvas')].length")
    assert nodes >= 1
    each = browser.find_element(By.CSS_SELECTOR, '#steps tr[data-step="each"]').text
    assert "Hello, Bo!" in each and "Hello, Cy!" in each  # a mapped step's output: its items' outputs
    screenshot(browser, "run")
    assert not errors_in(browser)
    # The run's own invocation (its id is the run's) leads to the run.
    run_id = browser.current_url.rsplit("/", 1)[-1]
    open_page(browser, f"{console_url}/console/invocations/{run_id}")
    WebDriverWait(browser, 15).until(lambda d: attribute_of(d, "#run-link", "href"))
    assert attribute_of(browser, "#run-link", "href") == f"/console/runs/{run_id}"


def test_invoke_and_prewarm_from_the_functions_page(cluster: Platform, console_url: str, browser: WebDriver) -> None:
    open_page(browser, console_url + "/console/functions")
    card = 'article[data-function="hello"]'
    body = browser.find_element(By.CSS_SELECTOR, f"{card} input.payload")  # kept across the page's refreshes
    body.clear()
    body.send_keys('{"name": "console"}')
    click(browser, f'{card} button[data-action="invoke"]')
    WebDriverWait(browser, 20).until(
        lambda d: "Hello, console!" in texts(d, f"{card} pre.output", "class").get("output", "")
    )
    assert browser.find_elements(By.CSS_SELECTOR, f"{card} canvas"), "the function's chart is drawn"
    click(browser, f'{card} button[data-action="prewarm"]')
    WebDriverWait(browser, 10).until(lambda d: texts(d, ".notice", "role"))
    assert texts(browser, ".notice", "role") == {"status": "done"}
    screenshot(browser, "functions")
    assert not errors_in(browser)


def test_cordon_from_the_cluster_page_changes_the_node(cluster: Platform, console_url: str, browser: WebDriver) -> None:
    open_page(browser, console_url + "/console")
    node = 'article[data-node="runtime-1"]'
    click(browser, f'{node} button[data-action="cordon"]')
    WebDriverWait(browser, 15).until(lambda d: attribute_of(d, node, "data-cordoned") == "yes")
    assert cluster.status()["nodes"]["runtime-1"]["unschedulable"] is True
    assert "cordoned" in texts(browser, "article.node", "data-node")["runtime-1"]
    click(browser, f'{node} button[data-action="uncordon"]')
    WebDriverWait(browser, 15).until(lambda d: attribute_of(d, node, "data-cordoned") == "no")
    assert_eventually(lambda: cluster.status()["nodes"]["runtime-1"]["unschedulable"] is False, timeout_s=15)
    assert not errors_in(browser)


def test_an_isolation_shows_with_its_reason_and_the_page_releases_it(
    cluster: Platform, console_url: str, browser: WebDriver
) -> None:
    cluster.stoker("fn", "isolate", "hello", "--for", "600")
    open_page(browser, console_url + "/console")
    row = 'tr[data-isolated="hello"]'
    WebDriverWait(browser, 15).until(lambda d: texts(d, row, "data-isolated"))
    assert "stoker fn isolate" in texts(browser, row, "data-isolated")["hello"]
    screenshot(browser, "cluster-isolation")
    click(browser, f'{row} button[data-action="release"]')
    WebDriverWait(browser, 15).until(lambda d: not texts(d, row, "data-isolated"))
    assert cluster.status()["isolations"] == {}
    assert not errors_in(browser)


def test_without_a_token_the_console_asks_for_one(cluster: Platform, console_url: str) -> None:
    page = httpx.get(f"{console_url}/console/functions", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == "/console/login?next=/console/functions"
    api = httpx.get(f"{console_url}/console/api/cluster")
    assert api.status_code == 401 and "token" in api.json()["error"]
    assert httpx.get(f"{console_url}/console/api/cluster", headers={"Authorization": "Basic abc"}).status_code == 401
    wrong = httpx.get(
        f"{console_url}/console/api/cluster", headers={"Authorization": "Bearer stk_000000000000_" + "a" * 43}
    )
    assert wrong.status_code == 401 and wrong.json()["error"] == "unknown token"
    in_url = httpx.get(f"{console_url}/console/api/cluster", params={"token": cluster.admin_token})
    assert in_url.status_code == 401 and "never the URL" in in_url.json()["error"]
    bad = httpx.post(f"{console_url}/console/api/login", json={"token": "stk_nope"})
    assert bad.status_code == 401
    guesses = [
        httpx.post(f"{console_url}/console/api/login", json={"token": f"stk_{i:012x}_" + "c" * 43}).status_code
        for i in range(12)
    ]
    assert 401 in guesses and 429 in guesses, guesses


def test_a_read_only_token_looks_but_may_not_act(cluster: Platform, console_url: str, browser: WebDriver) -> None:
    reader = cluster.stoker("token", "create", "--scope", "read", "--name", "viewer").stdout.strip()
    click(browser, "#me button")  # log out
    WebDriverWait(browser, 10).until(lambda d: "/console/login" in d.current_url)
    log_in(browser, console_url, "stk_000000000000_" + "b" * 43, succeeds=False)
    # A wrong token stays on the login page and says why.
    WebDriverWait(browser, 10).until(lambda d: "unknown token" in d.find_element(By.ID, "login-message").text)
    screenshot(browser, "login")
    log_in(browser, console_url, reader)
    open_page(browser, console_url + "/console")
    assert "viewer" in browser.find_element(By.ID, "me").text
    click(browser, 'article[data-node="runtime-0"] button[data-action="cordon"]')
    WebDriverWait(browser, 10).until(lambda d: texts(d, ".notice", "role"))
    assert "may not cordon" in texts(browser, ".notice", "role")["status"]
    assert cluster.status()["nodes"]["runtime-0"]["unschedulable"] is False
    click(browser, "#me button")
    WebDriverWait(browser, 10).until(lambda d: "/console/login" in d.current_url)
    log_in(browser, console_url, cluster.admin_token)


def test_bad_requests_get_a_clear_4xx(cluster: Platform, console_url: str) -> None:
    api = f"{console_url}/console/api"
    httpx = Client(headers={"Authorization": f"Bearer {cluster.admin_token}"}, timeout=30)
    answer = httpx.post(f"{api}/functions/hello/invoke", content=b"{not json")
    assert answer.status_code == 400 and "not valid JSON" in answer.json()["error"]
    answer = httpx.post(f"{api}/functions/nobody/invoke", json={})
    assert answer.status_code == 404 and "nobody" in answer.json()["error"]
    answer = httpx.post(f"{api}/functions/hello/prewarm", json={"count": 0})
    assert answer.status_code == 400
    answer = httpx.post(f"{api}/nodes/nowhere/cordon")
    assert answer.status_code == 404 and "no running node" in answer.json()["error"]
    answer = httpx.post(f"{api}/nodes/runtime-0/explode")
    assert answer.status_code == 404
    answer = httpx.post(f"{api}/functions/nobody/release")
    assert answer.status_code == 404
    assert httpx.get(f"{api}/invocations/no-such-id").status_code == 404
    assert httpx.get(f"{api}/runs/no-such-run").status_code == 404
    assert httpx.get(f"{console_url}/console/static/..%2Fapp.py").status_code == 404
    httpx.close()


def test_a_console_nobody_watches_stops_reading(console_url: str, browser: WebDriver) -> None:
    browser.get("about:blank")  # no page of the console is open any more
    assert_eventually(lambda: httpx.get(f"{console_url}/healthz").json()["watching"] is False, timeout_s=15)


def test_the_page_says_when_the_broker_is_gone_and_carries_on_after_its_restart(
    cluster: Platform, console_url: str, browser: WebDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs last in this module: it stops and starts the platform's broker."""
    open_page(browser, console_url + "/console/invocations")
    badge = (By.ID, "broker")
    WebDriverWait(browser, 15).until(lambda d: d.find_element(*badge).get_attribute("data-up") == "yes")
    os.killpg(cluster.pids()["broker"], signal.SIGKILL)
    WebDriverWait(browser, 15).until(lambda d: d.find_element(*badge).get_attribute("data-up") == "no")
    assert "unreachable" in browser.find_element(*badge).text
    screenshot(browser, "broker-down")
    for key in ("STOKER_HOME", "STOKER_BOOTSTRAP", "STOKER_CONTROLLER_PORT", "STOKER_KAFKA_LIBS"):
        monkeypatch.setenv(key, cluster.env[key])
    embedded.start_broker(cluster.settings)
    WebDriverWait(browser, 60).until(lambda d: d.find_element(*badge).get_attribute("data-up") == "yes")
    # The console reads again: an invocation after the restart reaches the open page.
    ident = assert_eventually(lambda: invoke(cluster, "again"), timeout_s=60, interval_s=1.0)
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, f'tr[data-invocation="{ident}"]'))
