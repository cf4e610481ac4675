"""The harvest file reader and the component browser: `store.read` round trips on hand-made harvests, the HTML's
embedded data, and the page itself in headless Chromium (list, search, sort, cards, links, charts, console)."""

from __future__ import annotations

import json
import re
import sqlite3

import fake_harvest
import pytest
from browser import by, card_id, load, open_row, shown_ids, wait

from spdjax.interpret import report, store


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{"tokens" | "features": (harvest dict, harvest file, report file)}."""
    d = tmp_path_factory.mktemp("harvests")
    out = {}
    for kind, harvest in (("tokens", fake_harvest.token_harvest()), ("features", fake_harvest.feature_harvest())):
        db = fake_harvest.write(d / f"{kind}.sqlite", harvest)
        out[kind] = (harvest, db, report.write_report(store.read(db), d / f"{kind}.html", f"{kind} harvest"))
    return out


@pytest.mark.parametrize("kind", ["tokens", "features"])
def test_read_round_trip(files, kind):
    harvest, db, _ = files[kind]
    assert store.read(db) == harvest
    assert store.read_meta(db) == harvest["meta"]


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no harvest file"):
        store.read(tmp_path / "missing.sqlite")
    (tmp_path / "notes.txt").write_text("not a database, just text " * 100)
    with pytest.raises(ValueError, match="not a readable harvest file"):
        store.read(tmp_path / "notes.txt")
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as con:
        con.execute("CREATE TABLE meta (key TEXT, value TEXT)")
    con.close()
    with pytest.raises(ValueError, match=r"not a harvest file \(missing tables"):
        store.read_meta(other)


def test_read_path_with_uri_characters(tmp_path):
    db = fake_harvest.write(tmp_path / "odd?name#1%20.sqlite", fake_harvest.feature_harvest())
    assert store.read(db)["meta"]["input_kind"] == "features"


def _embedded(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="harvest-data">(.*?)</script>', page, re.S)
    return json.loads(m.group(1))


def test_html_embeds_data(files):
    harvest, _, path = files["tokens"]
    page = path.read_text()
    assert _embedded(page) == harvest
    assert page.count("<script") == 3  # plotly.js once, the data, the app
    assert fake_harvest.EVIL not in page and "<\\/script><b>x" in page
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_html_non_finite_and_missing_meta():
    harvest = fake_harvest.feature_harvest()
    harvest["meta"] = {"tau": float("nan")}
    harvest["components"][0]["mean_ci"] = float("inf")
    data = _embedded(report.report_html(harvest, "<odd & title>"))
    assert data["meta"]["tau"] is None and data["components"][0]["mean_ci"] is None
    assert "<title>&lt;odd &amp; title&gt;</title>" in report.report_html(harvest, "<odd & title>")


# ---- in the browser ----

def _check_common(d, harvest, url, shot):
    """List, search, sort, row click, co-active link, #c=ID on load, charts, console, screenshot."""
    By = by()
    comps = harvest["components"]
    n = len(comps)
    d.get_log("browser")  # drop earlier pages' messages
    load(d, url, n)
    assert not d.find_element(By.ID, "card").is_displayed()
    assert len(d.find_elements(By.CSS_SELECTOR, "#summary .js-plotly-plot")) >= 2
    assert d.find_element(By.ID, "row-count").text == f"{n} of {n} components"

    site = comps[-1]["site"]
    search = d.find_element(By.ID, "search")
    search.send_keys(site)
    assert shown_ids(d) == [c["id"] for c in comps if c["site"] == site]
    search.clear()
    search.send_keys("no such text anywhere")
    assert shown_ids(d) == []
    search.clear()
    search.send_keys(" ")  # `clear()` fires no input event; this one does
    assert len(shown_ids(d)) == n

    th = d.find_element(By.CSS_SELECTOR, '#component-list th[data-sort="mean_ci"]')
    by_ci = [c["id"] for c in sorted(comps, key=lambda c: (c["mean_ci"], c["id"]))]
    th.click()
    assert shown_ids(d) == by_ci
    th.click()
    assert shown_ids(d) == [c["id"] for c in sorted(comps, key=lambda c: (-c["mean_ci"], c["id"]))]
    assert "sort-desc" in th.get_attribute("class")

    c = comps[0]
    card = open_row(d, c["id"])
    title = d.find_element(By.ID, "card-title").text
    assert c["site"] in title and f"/ {c['idx']}" in title
    wait(d, lambda: card.find_elements(By.CSS_SELECTOR, "#card-hist.js-plotly-plot .main-svg"))
    other = c["coactive"][0]["other"]
    card.find_element(By.CSS_SELECTOR, f'a.coactive-link[data-id="{other}"]').click()
    wait(d, lambda: card_id(d) == other)
    assert d.execute_script("return location.hash") == f"#c={other}"

    last = comps[-1]["id"]
    load(d, f"{url}#c={last}", n)
    wait(d, lambda: d.find_element(By.ID, "card").is_displayed() and card_id(d) == last)
    assert d.find_elements(By.CSS_SELECTOR, "#card .js-plotly-plot")
    d.find_element(By.ID, "card-close").click()
    assert not d.find_element(By.ID, "card").is_displayed()
    card = open_row(d, c["id"])

    severe = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe
    assert d.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    return card


def test_browser_tokens(driver, files, tmp_path):
    By = by()
    harvest, _, path = files["tokens"]
    card = _check_common(driver, harvest, path.as_uri(), tmp_path / "tokens.png")
    # card 0 is open: its first top example holds EVIL, shown as text
    assert card.find_element(By.CSS_SELECTOR, "span.tok.hl").is_displayed()
    toks = card.find_elements(By.CSS_SELECTOR, "#card-examples-top span.tok")
    assert fake_harvest.EVIL in [t.get_attribute("textContent") for t in toks]
    assert not card.find_elements(By.CSS_SELECTOR, ".example b")
    center = card.find_element(By.CSS_SELECTOR, "#card-examples-top span.tok.center")
    assert center.get_attribute("title").startswith("CI 0.95")
    assert card.find_element(By.CSS_SELECTOR, "#card-attention.js-plotly-plot")
    assert card.find_element(By.CSS_SELECTOR, "#card-tokens-input").text.count("\n") >= 3
    links = card.find_elements(By.CSS_SELECTOR, "#card-cluster a.cluster-link")
    assert sorted(int(a.get_attribute("data-id")) for a in links) == [1, 3]
    assert "not harvested" in card.find_element(By.ID, "card-cluster").text
    target = int(links[0].get_attribute("data-id"))
    links[0].click()
    wait(driver, lambda: card_id(driver) == target)
    driver.find_element(By.ID, "search").send_keys("cat")  # only component 1's token statistics hold it
    assert shown_ids(driver) == [1]


def test_browser_features(driver, files, tmp_path):
    By = by()
    harvest, _, path = files["features"]
    card = _check_common(driver, harvest, path.as_uri(), tmp_path / "features.png")
    assert card.find_element(By.CSS_SELECTOR, "#card-one-hot.js-plotly-plot")
    assert card.find_element(By.CSS_SELECTOR, "#card-weight.js-plotly-plot")
    first = card.find_element(By.CSS_SELECTOR, "#card-examples-top .feature-example").text
    assert "feature 0 = 0.9" in first and "CI 0.97" in first
    assert not card.find_elements(By.CSS_SELECTOR, "span.tok")
    assert not driver.find_elements(By.CSS_SELECTOR, '#component-list th[data-sort="tokens"]')


def test_browser_minimal(driver, tmp_path):
    """A harvest with no meta and a bare component still renders, and an unknown `#c=ID` says so."""
    By = by()
    harvest = {"meta": {}, "components": [{"id": 0, "site": "s", "idx": 0, "mean_ci": 0.5, "cluster": 3}]}
    url = report.write_report(harvest, tmp_path / "minimal.html", "minimal").as_uri()
    driver.get_log("browser")
    load(driver, f"{url}#c=0", 1)
    wait(driver, lambda: card_id(driver) == 0)
    assert "not in this harvest" in driver.find_element(By.ID, "card-cluster").text
    load(driver, f"{url}#c=7", 1)
    wait(driver, lambda: "not in this harvest" in driver.find_element(By.ID, "card").text)
    assert "no eval losses" in driver.find_element(By.ID, "summary").text
    assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
