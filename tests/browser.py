"""A headless Chromium for the tests that read rendered pages (the component browser), driven by the
system's chromedriver through Selenium (never Selenium Manager's downloads), and small helpers.

Missing browser pieces skip those tests, or fail them when SPDJAX_REQUIRE_BROWSER=1 (as .ci/run sets)."""

from __future__ import annotations

import os
import re
import shutil

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


@pytest.fixture(scope="session")
def driver():
    """A headless Chromium driven by the system's chromedriver (never Selenium Manager's downloads)."""
    chromium = next(filter(None, map(shutil.which, BROWSERS)), None)
    chromedriver = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        webdriver = None
    missing = [name for name, ok in (("chromium", chromium), ("chromedriver", chromedriver), ("selenium", webdriver))
               if not ok]
    if missing:
        msg = (f"browser tests need {', '.join(missing)} (Debian: apt-get install chromium chromium-driver; "
               "pip install -e '.[test]')")
        if os.environ.get("SPDJAX_REQUIRE_BROWSER") == "1":
            pytest.fail(msg + "; SPDJAX_REQUIRE_BROWSER=1 requires them")
        pytest.skip(msg)
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--allow-file-access-from-files"):
        opts.add_argument(arg)
    opts.binary_location = chromium
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(executable_path=chromedriver), options=opts)
    d.set_page_load_timeout(30)
    yield d
    d.quit()


def by():
    from selenium.webdriver.common.by import By
    return By


def wait(d, cond, timeout=10):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait
    wait = WebDriverWait(d, timeout, poll_frequency=0.05, ignored_exceptions=(StaleElementReferenceException,))
    return wait.until(lambda _: cond())


def load(d, url, n):
    """Loads `url` fresh (also when only the hash differs) and waits for the n component rows."""
    d.get("about:blank")
    d.get(url)
    wait(d, lambda: d.execute_script("return document.body.dataset.ready") == "1"
          and len(d.find_elements(by().CSS_SELECTOR, "#component-list tr.component-row")) == n)


def shown_ids(d):
    rows = d.find_elements(by().CSS_SELECTOR, "#component-list tr.component-row")
    return [int(r.get_attribute("data-id")) for r in rows if r.is_displayed()]


def card_id(d):
    # read in one script: the card's elements are rebuilt when it switches
    m = re.match(r"#(-?\d+) ", d.execute_script("return document.getElementById('card-title')?.textContent || ''"))
    return int(m.group(1)) if m else None


def open_row(d, cid):
    d.find_element(by().CSS_SELECTOR, f'#component-list tr.component-row[data-id="{cid}"]').click()
    card = d.find_element(by().ID, "card")
    wait(d, lambda: card.is_displayed() and card_id(d) == cid)
    assert "open" in card.get_attribute("class").split()
    return card


def check_report(d, path, shot) -> dict:
    """Open a written report (`file://path`): the component list is filled, the card of its most frequent
    component opens and shows a highlighted token example (token inputs) or a feature example; saves a
    screenshot to `shot`. Returns that component."""
    By = by()
    d.get("about:blank")
    d.get(path.resolve().as_uri())
    wait(d, lambda: d.execute_script("return document.body.dataset.ready") == "1", timeout=30)
    comps = d.execute_script("return JSON.parse(document.getElementById('harvest-data').textContent).components")
    assert comps and len(d.find_elements(By.CSS_SELECTOR, "#component-list tr.component-row")) == len(comps)
    best = max(comps, key=lambda c: (c["frequency"], -c["id"]))
    card = open_row(d, best["id"])
    if best["examples"]["top"] and "tokens" in best["examples"]["top"][0]:
        wait(d, lambda: any(e.is_displayed() for e in card.find_elements(By.CSS_SELECTOR, "span.tok.hl")))
    else:
        wait(d, lambda: any(e.is_displayed() for e in card.find_elements(By.CSS_SELECTOR, ".feature-example")))
    severe = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe
    assert d.save_screenshot(str(shot)) and shot.read_bytes().startswith(b"\x89PNG")
    return best
