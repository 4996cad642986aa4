"""The status page in a real browser: Debian's chromium (headless) driven by selenium, against a real `ibc local`.

A started model must appear on its node's bar with its memory within 2 s, a 429 must appear among the
last refusals, and the page must fit a phone's width. `IBC_UPDATE_SCREENSHOTS=1` writes the screenshots
docs/status.md shows (docs/status-page.png, docs/status-page-phone.png); otherwise they go to the test's
temporary folder. chromium and chromium-driver come from tests/browser/install-chromium.sh (`make test`
runs it); under CI=true a missing browser fails the test instead of skipping it.
"""

import os
import shutil
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.test_local_mode import MESSAGES, _config, local_factory  # noqa: F401 (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.browser]

DOCS = Path(__file__).resolve().parents[2] / "docs"
APPEAR_SECONDS = 2.0  # the page polls /status every second: anything new shows within two polls
DESKTOP = (1100, 860)
PHONE = (390, 1500)  # CSS pixels of a common phone, tall enough to show every section


def _tools():
    """(chromium, chromedriver, selenium webdriver module), or a skip (a failure under CI=true)."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
    except ImportError:
        webdriver = None
    missing = [
        name for name, found in (("chromium", chromium), ("chromedriver", driver), ("selenium", webdriver)) if not found
    ]
    if missing:
        message = f"{', '.join(missing)} missing: run bash tests/browser/install-chromium.sh (make test does)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return chromium, driver, webdriver


@pytest.fixture
def browser():
    chromium, driver_path, webdriver = _tools()
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={DESKTOP[0]},{DESKTOP[1]}",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _wait_for(driver, css, *, text=(), timeout=APPEAR_SECONDS):
    """The first element matching `css` whose text holds every string in `text`, within `timeout`; else fail."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while True:
        try:
            for element in driver.find_elements(By.CSS_SELECTOR, css):
                if all(t in element.text for t in text):
                    return element
        except StaleElementReferenceException:  # the page redrew between find and read
            pass
        if time.monotonic() > deadline:
            shown = [e.text for e in driver.find_elements(By.CSS_SELECTOR, css)]
            raise AssertionError(f"no {css} with {text} within {timeout:g}s; shown: {shown}")
        time.sleep(0.05)


def _shot(driver, name, tmp_path):
    target = DOCS / name if os.environ.get("IBC_UPDATE_SCREENSHOTS") else tmp_path / name
    assert driver.save_screenshot(str(target)), target
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_page_shows_a_started_model_and_a_refusal(browser, local_factory, tmp_path):  # noqa: F811 (fixture)
    server = local_factory(_config(cooldown_ab="10m", cooldown_c="10m", startup_delay="0.3"))
    browser.get(f"{server.url}/")
    _wait_for(browser, '.node[data-node="shadow"]', text=("0 of 128Gi used",), timeout=10)

    started = httpx.post(f"{server.url}/models/model-a/start", params={"wait": "20"}, timeout=30)
    assert started.status_code == 200, started.text
    began = time.monotonic()
    _wait_for(browser, '.seg[data-model="model-a"]', text=("80Gi",))
    _wait_for(browser, 'tr[data-model="model-a"][data-state="ready"]', text=("80Gi", "shadow"))
    assert time.monotonic() - began <= APPEAR_SECONDS

    with pytest.raises(openai.RateLimitError):
        server.client().chat.completions.create(model="model-b", messages=MESSAGES)
    began = time.monotonic()
    refusal = _wait_for(browser, '.refusal[data-model="model-b"]', text=("insufficient_memory", "48Gi available"))
    assert "model-a" in refusal.text  # what blocks it
    assert time.monotonic() - began <= APPEAR_SECONDS

    server.client().chat.completions.create(model="model-c", messages=MESSAGES)  # fits beside model-a
    _wait_for(browser, '.seg[data-model="model-c"]', text=("16Gi",))
    _wait_for(browser, 'tr[data-model="model-c"][data-state="ready"]', text=("0 / 4096",))  # none held, of --queue-size
    _wait_for(browser, '.node[data-node="shadow"]', text=("96Gi of 128Gi used", "32Gi free"))
    _shot(browser, "status-page.png", tmp_path)

    browser.set_window_size(*PHONE)
    _wait_for(browser, 'tr[data-model="model-c"][data-state="ready"]')
    overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a phone"
    _shot(browser, "status-page-phone.png", tmp_path)
