"""The operator console (/ui) in a real browser: Debian's headless Chromium driven by Selenium through the
system's chromedriver (nothing is downloaded).

Against the session's stack (a real worker and API): a job submitted through the API appears on the jobs page
and reaches ``completed`` without a reload; another is cancelled from its button; an embedding job is searched
from its page; values from jobs are shown as text, never run.  Against a server with keys required: sign-in
with a key, a user key sees its own jobs only, the session cookie is HttpOnly and SameSite=Strict, and a form
post without the page's CSRF token is refused.  Every page is saved as a screenshot under
``tests/.screenshots/`` (ignored by git).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from werkzeug.serving import make_server

from corral.settings import Settings
from tests.helpers import EMBED_MODEL, MODEL, clean_redis, fresh_database, make_settings, submit, wait_done, with_db

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SHOTS = Path(__file__).resolve().parents[1] / ".screenshots"
XSS = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'

if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    if os.environ.get("CORRAL_BROWSER_REQUIRED"):  # .ci/run installs it: missing there is a failure
        raise RuntimeError("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.expected_conditions import staleness_of  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(arg)
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch a driver or a browser
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    SHOTS.mkdir(exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def shot(driver: WebDriver, name: str) -> None:
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def wait_until(driver: WebDriver, condition: Any, timeout: float = 60) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)


def navigate(driver: WebDriver, element: Any) -> None:
    """Click a link or submit button and wait for the next page (a click does not wait for it)."""
    page = driver.find_element(By.TAG_NAME, "html")
    element.click()
    wait_until(driver, staleness_of(page))


def text_of(driver: WebDriver, css: str) -> str:
    found = driver.find_elements(By.CSS_SELECTOR, css)
    return found[0].text if found else ""


def test_a_submitted_job_appears_and_completes_without_a_reload(browser: WebDriver, base_url: str) -> None:
    browser.get(base_url + "/ui/jobs")
    browser.execute_script("window.__sameDocument = true")
    job = submit(base_url, kind="generate", chunk_size=2, metadata={"note": XSS},
                 items=[{"custom_id": XSS, "prompt": "Say hi", "options": {"num_predict": 4, "temperature": 0}},
                        {"custom_id": "second", "prompt": "Say bye", "options": {"num_predict": 4, "temperature": 0}}])
    row = f'tr[data-job="{job["id"]}"] [data-status]'
    wait_until(browser, lambda d: text_of(d, row) == "completed", timeout=120)
    assert browser.execute_script("return window.__sameDocument") is True  # refreshed in place, not reloaded
    shot(browser, "jobs")

    navigate(browser, browser.find_element(By.LINK_TEXT, job["id"]))
    wait_until(browser, lambda d: text_of(d, "#count-succeeded") == "2")
    page = browser.find_element(By.TAG_NAME, "main").text
    assert XSS in page  # the custom id is shown as text...
    assert browser.execute_script("return window.__xss") is None  # ...and nothing in it ran
    assert browser.find_elements(By.CSS_SELECTOR, ".chart svg polyline")
    shot(browser, "job")

    # The downloads carry the same results as the API.
    cookies = {c["name"]: c["value"] for c in browser.get_cookies()}
    csv = httpx.get(f"{base_url}/ui/jobs/{job['id']}/results.csv", cookies=cookies, timeout=30)
    assert csv.status_code == 200 and csv.text.splitlines()[0].startswith("custom_id,index,state,text")
    assert len(csv.text.splitlines()) == 3


def test_cancel_from_the_job_page(browser: WebDriver, base_url: str) -> None:
    items = [{"prompt": f"Count to {n}", "options": {"num_predict": 48}} for n in range(60)]
    job = submit(base_url, kind="generate", chunk_size=2, items=items)
    browser.get(f"{base_url}/ui/jobs/{job['id']}")
    browser.find_element(By.ID, "cancel").click()
    wait_until(browser, lambda d: text_of(d, "#job-status") == "cancelled")
    state = wait_done(base_url, job["id"])
    assert state["status"] == "cancelled" and state["counts"]["cancelled"] > 0


def test_search_an_embedding_job_from_its_page(browser: WebDriver, base_url: str) -> None:
    docs = ["The cat sat on the warm windowsill.", "Quarterly revenue grew by twelve percent.",
            "Tomatoes need full sun and regular watering."]
    job = submit(base_url, kind="embed", model=EMBED_MODEL, items=[{"input": d} for d in docs])
    assert wait_done(base_url, job["id"])["status"] == "completed"
    browser.get(f"{base_url}/ui/jobs/{job['id']}")
    box = browser.find_element(By.ID, "q")
    box.send_keys("how much did sales increase")
    navigate(browser, browser.find_element(By.CSS_SELECTOR, "form[role=search] button"))
    wait_until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#hits li"))
    hits = browser.find_elements(By.CSS_SELECTOR, "#hits li q")
    assert [h.text for h in hits][0] == docs[1]
    shot(browser, "search")


def test_queue_workers_and_models_pages(browser: WebDriver, base_url: str) -> None:
    browser.get(base_url + "/ui/queue")
    worker = browser.find_element(By.CSS_SELECTOR, "#workers tbody tr")
    assert "alive" in worker.text and "CPU" in worker.text
    assert MODEL.split(":")[0] in browser.find_element(By.ID, "queue-models").text
    shot(browser, "queue")
    browser.get(base_url + "/ui/models")
    models = browser.find_element(By.ID, "model-list").text
    assert "smollm2:135m" in models and "completion" in models and "embedding" in models
    shot(browser, "models")
    browser.set_window_size(390, 844)  # a phone: the page fits, tables scroll inside themselves
    try:
        browser.get(base_url + "/ui/jobs")
        overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1
        shot(browser, "jobs-phone")
    finally:
        browser.set_window_size(1280, 900)


# -- with keys required -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """An API with CORRAL_REQUIRE_API_KEY=1 in this process (the console needs no worker to list jobs), on its
    own Redis database and SQLite file; an admin key, two user keys and a job of each user's."""
    from api import create_app
    from jobs.keys import KeyStore

    home = tmp_path_factory.mktemp("console")
    url = with_db(settings.redis, 7)
    clean_redis(url)
    own = make_settings(home, url, settings.models_path, require_api_key=True, database_url=f"sqlite:///{home / 'c.db'}")
    fresh_database(own)
    keys = KeyStore(own)
    admin, _ = keys.create("ops", admin=True)
    alice, alice_row = keys.create("alice")
    bob, bob_row = keys.create("bob")
    app = create_app(own)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_port}"
    jobs = {}
    for name, key in (("alice", alice), ("bob", bob)):
        r = httpx.post(base + "/api/jobs", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                       json={"kind": "generate", "model": MODEL, "items": [{"prompt": f"{name}'s prompt"}]})
        assert r.status_code == 202, r.text
        jobs[name] = r.json()["id"]
    try:
        yield {"base": base, "admin": admin, "alice": alice, "bob": bob, "jobs": jobs}
    finally:
        server.shutdown()
        server.server_close()
        clean_redis(url)


def sign_in(driver: WebDriver, base: str, key: str) -> None:
    driver.delete_all_cookies()
    driver.get(base + "/ui/jobs")
    assert "/ui/login" in driver.current_url  # asked for a key first
    driver.find_element(By.ID, "key").send_keys(key)
    navigate(driver, driver.find_element(By.CSS_SELECTOR, "form.stack button"))
    assert driver.current_url.endswith("/ui/jobs")


def test_sign_in_with_a_key_and_see_only_your_jobs(browser: WebDriver, keyed: dict[str, Any]) -> None:
    base = keyed["base"]
    browser.delete_all_cookies()
    browser.get(base + "/ui/jobs")
    browser.find_element(By.ID, "key").send_keys("corral-not-a-key")
    navigate(browser, browser.find_element(By.CSS_SELECTOR, "form.stack button"))
    assert "not valid" in wait_until(browser, lambda d: d.find_element(By.ID, "login-error")).text
    shot(browser, "login")

    sign_in(browser, base, keyed["alice"])
    page = browser.find_element(By.TAG_NAME, "main").text
    assert keyed["jobs"]["alice"] in page and keyed["jobs"]["bob"] not in page
    assert not browser.find_elements(By.LINK_TEXT, "Keys")  # not an admin
    browser.get(f"{base}/ui/jobs/{keyed['jobs']['bob']}")
    assert "not found" in browser.find_element(By.TAG_NAME, "main").text  # as through the API
    browser.get(base + "/ui/keys")
    assert "needs an admin key" in browser.find_element(By.TAG_NAME, "main").text

    cookie = next(c for c in browser.get_cookies() if c["name"] == "corral_console")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert "corral_console" not in browser.execute_script("return document.cookie")
    assert keyed["alice"] not in cookie["value"]  # the cookie is a session id, not the key

    # A cancel posted without the page's CSRF token (as another site's form would) is refused; with it, it works.
    session = {"corral_console": cookie["value"]}
    target = f"{base}/ui/jobs/{keyed['jobs']['alice']}/cancel"
    forged = httpx.post(target, cookies=session, data={}, timeout=30)
    assert forged.status_code == 403
    status = httpx.get(f"{base}/api/jobs/{keyed['jobs']['alice']}",
                       headers={"Authorization": f"Bearer {keyed['alice']}"}).json()["status"]
    assert status == "queued"
    browser.get(f"{base}/ui/jobs/{keyed['jobs']['alice']}")
    browser.find_element(By.ID, "cancel").click()
    wait_until(browser, lambda d: text_of(d, "#job-status") == "cancelled")


def test_an_admin_sees_everyone_and_manages_keys(browser: WebDriver, keyed: dict[str, Any]) -> None:
    base = keyed["base"]
    sign_in(browser, base, keyed["admin"])
    page = browser.find_element(By.TAG_NAME, "main").text
    assert keyed["jobs"]["alice"] in page and keyed["jobs"]["bob"] in page
    navigate(browser, browser.find_element(By.LINK_TEXT, "Keys"))
    browser.find_element(By.ID, "key-name").send_keys(XSS)
    navigate(browser, browser.find_element(By.CSS_SELECTOR, "form.inline button"))
    new_key = browser.find_element(By.ID, "new-key").text
    assert new_key.startswith("corral-")
    assert XSS in browser.find_element(By.ID, "key-list").text and browser.execute_script("return window.__xss") is None
    shot(browser, "keys")
    r = httpx.get(base + "/api/tags", headers={"Authorization": f"Bearer {new_key}"})
    assert r.status_code == 200  # the key shown once works

    def row(d: WebDriver) -> Any:
        return next(r for r in d.find_elements(By.CSS_SELECTOR, "#key-list tbody tr") if r.get_attribute("data-key") == XSS)

    row(browser).find_element(By.CSS_SELECTOR, "button.danger").click()
    browser.switch_to.alert.accept()  # "Revoke the key ...?"
    wait_until(browser, lambda d: "revoked" in row(d).text)
    assert httpx.get(base + "/api/tags", headers={"Authorization": f"Bearer {new_key}"}).status_code == 401

    navigate(browser, browser.find_element(By.CSS_SELECTOR, "form.signout button"))
    assert "/ui/login" in browser.current_url
    browser.get(base + "/ui/jobs")
    assert "/ui/login" in browser.current_url  # signed out for good


def test_screenshots_are_kept_out_of_git() -> None:
    ignored = (Path(__file__).resolve().parents[2] / ".gitignore").read_text()
    assert "tests/.screenshots/" in ignored.splitlines()
