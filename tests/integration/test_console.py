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

import contextlib
import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from werkzeug.serving import make_server

from corral.cpu_kernels import choose_here, generation_level
from corral.modelstore.store import ModelStore
from corral.settings import Settings
from harness.stack import fresh_database
from tests.helpers import (
    EMBED_MODEL,
    MODEL,
    Registry,
    clean_redis,
    cli,
    make_corpus,
    make_settings,
    submit,
    wait_done,
    with_db,
)

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SHOTS = Path(__file__).resolve().parents[1] / ".screenshots"
XSS = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'

HAVE_BROWSER = os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)
if not HAVE_BROWSER and os.environ.get("CORRAL_BROWSER_REQUIRED"):  # .ci/run installs it: missing there fails
    raise RuntimeError("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
pytestmark = pytest.mark.skipif(
    not HAVE_BROWSER, reason=f"needs Debian's chromium and chromium-driver at {CHROMIUM} and {CHROMEDRIVER} "
    "(apt-get install -y chromium chromium-driver; .ci/run installs them)",
)

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.expected_conditions import staleness_of  # noqa: E402
from selenium.webdriver.support.select import Select  # noqa: E402
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
    wait_until(driver, lambda d: gone(page))


def gone(element: Any) -> bool:
    """``staleness_of``, also when ChromeDriver reports the replaced page's node as an inspector error ("Node
    with given id does not belong to the document") instead of a stale reference, as it did in a CI run."""
    try:
        return bool(staleness_of(element)(None))
    except WebDriverException as exc:
        if "does not belong to the document" in str(exc):
            return True
        raise


def texts(driver: WebDriver, css: str) -> list[str]:
    """The text of every element ``css`` matches, read in one step: the live parts are replaced every 2 s, so an
    element found in one call may be gone by the next."""
    found: list[str] = driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]), e => e.innerText.trim())", css)
    return found


def text_of(driver: WebDriver, css: str) -> str:
    found = texts(driver, css)
    return found[0] if found else ""


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
    assert texts(browser, "#hits li q")[0] == docs[1]
    shot(browser, "search")


def test_a_collection_page_shows_its_documents_failures_and_searches_them(browser: WebDriver, base_url: str,
                                                                        tmp_path: Path) -> None:
    docs = make_corpus(tmp_path)
    store_id = cli(base_url, "collection", "create", "console-docs").stdout.strip()
    synced = cli(base_url, "collection", "sync", "console-docs", str(docs), "--include", "*", "--interval", "0.2")
    assert synced.exit_code == 0, synced.output
    browser.get(f"{base_url}/ui/collections")
    navigate(browser, browser.find_element(By.LINK_TEXT, "console-docs"))
    assert browser.current_url.endswith(f"/ui/collections/{store_id}")
    assert "4 completed" in text_of(browser, "#live p") and "1 failed" in text_of(browser, "#live p")
    assert texts(browser, "#failed td")[0] == "ignored.bin"
    assert "rockets.md" in texts(browser, "#documents td")
    browser.find_element(By.ID, "q").send_keys("kerosene")
    Select(browser.find_element(By.ID, "mode")).select_by_value("text")
    navigate(browser, browser.find_element(By.CSS_SELECTOR, "form[role=search] button"))
    hits = wait_until(browser, lambda d: texts(d, "#hits li .cid"))
    assert hits[0].startswith("rockets.md [")
    shot(browser, "collection")


def test_queue_workers_and_models_pages(browser: WebDriver, base_url: str) -> None:
    browser.get(base_url + "/ui/queue")
    worker = text_of(browser, "#workers tbody tr")
    assert "alive" in worker and "CPU" in worker
    # The llama.cpp kernel level the worker runs with: the generation level make install picked for this CPU
    # (this worker serves the chat model too).
    best = choose_here()
    if best is not None:
        assert f"({generation_level(best.flags(), best).name} kernels)" in worker
    assert re.search(r"\b\d+ of [1-9]\d*\b", worker)  # slots busy of the loaded chat model's slots
    assert MODEL.split(":")[0] in text_of(browser, "#queue-models")
    shot(browser, "queue")
    browser.get(base_url + "/ui/models")
    models = text_of(browser, "#model-list")
    assert "smollm2:135m" in models and "completion" in models and "embedding" in models
    row = next(r for r in texts(browser, "#model-list tbody tr") if r.startswith("smollm2:135m"))
    assert "@" in row.split("\t")[-1]  # loaded on the worker (cpu-<pid>@<host>)
    shot(browser, "models")
    # Keyboard: the first Tab reaches the skip link, the next ones the navigation, in reading order.
    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys(Keys.TAB)
    assert browser.switch_to.active_element.text == "Skip to content"
    focused = []
    for _ in range(5):
        browser.switch_to.active_element.send_keys(Keys.TAB)
        focused.append(browser.switch_to.active_element.text)
    assert focused == ["Jobs", "Collections", "Queue & workers", "Models", "Keys"]
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


def test_pull_and_create_from_the_models_page(browser: WebDriver, keyed: dict[str, Any], local_registry: Registry,
                                              settings: Settings) -> None:
    store = ModelStore(settings.models_path)
    gguf = store.get(MODEL).model_path.read_bytes()
    local_registry.publish("library/console-pull:latest", gguf[:-1] + bytes([gguf[-1] ^ 9]))  # a new file to download
    pulled, made = f"{local_registry.host}/library/console-pull:latest", "console-made:latest"
    sign_in(browser, keyed["base"], keyed["admin"])
    browser.get(keyed["base"] + "/ui/models")
    try:
        browser.find_element(By.ID, "pull-name").send_keys(pulled)
        browser.find_element(By.NAME, "insecure").click()
        browser.find_element(By.CSS_SELECTOR, "form[action$='/pull'] button").click()
        wait_until(browser, lambda d: text_of(d, "form[action$='/pull'] output").startswith(("Done", "Error")))
        assert text_of(browser, "form[action$='/pull'] output") == "Done: success"
        bar = browser.find_element(By.CSS_SELECTOR, "form[action$='/pull'] progress")
        assert float(bar.get_attribute("value")) == float(bar.get_attribute("max")) == len(gguf)  # bytes, as pulled

        browser.find_element(By.ID, "create-name").send_keys(made)
        modelfile = browser.find_element(By.ID, "modelfile")
        modelfile.clear()
        modelfile.send_keys("FROM smollm2:135m\nSYSTEM You answer in one word.")
        browser.find_element(By.CSS_SELECTOR, "form[action$='/create'] button").click()
        wait_until(browser, lambda d: text_of(d, "form[action$='/create'] output").startswith(("Done", "Error")))
        assert text_of(browser, "form[action$='/create'] output") == "Done: success"
        assert store.get(made).config.get("model_format") == "gguf"
        assert "You answer in one word." in json.dumps(httpx.post(
            keyed["base"] + "/api/show", json={"model": made}, headers={"Authorization": f"Bearer {keyed['admin']}"},
        ).json()["system"])
        # The list refreshes by itself with both.
        listed = lambda d: {r.split("\t")[0] for r in texts(d, "#model-list tbody tr")}  # noqa: E731
        wait_until(browser, lambda d: {made, pulled} <= listed(d))
        shot(browser, "models-changed")

        # A user key sees no forms, and the routes refuse it.
        sign_in(browser, keyed["base"], keyed["alice"])
        browser.get(keyed["base"] + "/ui/models")
        assert not browser.find_elements(By.ID, "pull-name")
    finally:
        for name in (pulled, made):
            with contextlib.suppress(Exception):
                store.delete(name)
