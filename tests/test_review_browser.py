"""End to end in a real browser: headless Chromium (Debian's chromium + chromium-driver) drives the real
`edge-agent review` server over a real screened site: worklist, top case with image and heatmap, keyboard
navigation, verdict, worklist and database, CSV export, quarantine. Screenshots go to tmp_path, and also to
$REVIEW_SCREENSHOTS (e.g. docs/review) when that is set."""
from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import pytest

pytest.importorskip("flask", reason="the review app needs the [review] extra (Flask)")
selenium = pytest.importorskip("selenium", reason="selenium is in the [test] extra")

from conftest import rows  # noqa: E402
from review_server import start_review  # noqa: E402
from review_site import make_site  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run "
           "installs them when it runs as root): not installed here")


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1440,1000",
              "--no-first-run", "--disable-extensions", "--disable-background-networking",
              f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def shot(driver, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 1000
    out = os.environ.get("REVIEW_SCREENSHOTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(out) / path.name)


def natural_width(driver, css: str) -> int:
    return int(driver.execute_script(
        "var i = document.querySelector(arguments[0]); return i && i.complete ? i.naturalWidth : 0;", css))


def test_review_in_a_real_browser(dirs, tmp_path, procs, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from edge_agent.bundle import default_bundle_path

    bundle = default_bundle_path()  # the shipped bundle: format 3, real heatmaps of a real model
    site = make_site(dirs, bundle, more_quarantine=True)
    proc, url = start_review(dirs, bundle, tmp_path / "review.log")
    procs.append(proc)
    wait = WebDriverWait(browser, 60)

    # worklist: risk order, counts
    browser.get(url)
    wait.until(EC.presence_of_element_located((By.ID, "worklist")))
    top = rows(site.db, "SELECT id FROM results ORDER BY needs_review DESC, coalesce(p_high_risk, -1) DESC, "
                        "id DESC LIMIT 2")
    links = browser.find_elements(By.CSS_SELECTOR, "#worklist a.case-link")
    assert [int(a.text) for a in links[:2]] == [top[0][0], top[1][0]]
    assert "flagged, not yet reviewed" in browser.find_element(By.ID, "counts").text
    assert browser.find_elements(By.XPATH, "//script[contains(., 'alert')]") == []  # the <script> name is text
    shot(browser, tmp_path, "worklist")

    # the top case: image and heatmap (or the sentence why there is none) render
    links[0].click()
    wait.until(EC.presence_of_element_located((By.ID, "verdict")))
    wait.until(lambda d: natural_width(d, "#photo") > 0)
    wait.until(lambda d: natural_width(d, "#heatmap") > 0)  # computed on demand from the feature output
    heat = browser.find_element(By.ID, "heatmap")
    photo = browser.find_element(By.ID, "photo")
    assert 0 < heat.size["height"] <= photo.size["height"] + 1  # over the centre square the model saw
    browser.execute_script("var o = document.getElementById('opacity'); o.value = 70;"
                           "o.dispatchEvent(new Event('input'));")
    assert browser.execute_script("return document.getElementById('heatmap').style.opacity") == "0.7"
    shot(browser, tmp_path, "case")  # the predicted class's map at 70 %
    Select(browser.find_element(By.ID, "heatclass")).select_by_value("mel")
    wait.until(lambda d: d.find_element(By.ID, "heatmap").get_attribute("src").endswith("/mel.png"))
    wait.until(lambda d: natural_width(d, "#heatmap") > 0)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#bars rect")) == 7
    browser.set_window_size(820, 1180)  # a tablet, portrait: the columns stack, nothing is cut off
    wait.until(lambda d: d.execute_script("return window.innerWidth") <= 820)
    assert browser.execute_script("return document.documentElement.scrollWidth - document.documentElement.clientWidth") <= 0
    shot(browser, tmp_path, "case-tablet")
    browser.set_window_size(1440, 1000)

    # keyboard: right arrow = next case in the worklist, left arrow = back
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_RIGHT)
    wait.until(lambda d: d.current_url.rstrip("/").endswith(f"/case/{top[1][0]}"))
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_LEFT)
    wait.until(lambda d: d.current_url.rstrip("/").endswith(f"/case/{top[0][0]}"))
    wait.until(EC.presence_of_element_located((By.ID, "verdict")))

    # the verdict
    browser.find_element(By.CSS_SELECTOR, "input[name=agree][value=disagree]").click()
    Select(browser.find_element(By.ID, "diagnosis")).select_by_value("nv")
    browser.find_element(By.CSS_SELECTOR, "input[name=action][value=follow_up]").click()
    browser.find_element(By.NAME, "note").send_keys("regular network, <b>benign</b> pattern")
    browser.find_element(By.ID, "reviewer").send_keys("Dr. Browser")
    browser.find_element(By.ID, "save").click()
    wait.until(EC.presence_of_element_located((By.ID, "saved")))
    assert "Dr. Browser" in browser.find_element(By.ID, "history").text
    got = rows(site.db, "SELECT * FROM reviews")
    assert [(g["result_id"], g["agree"], g["diagnosis"], g["action"], g["reviewer"]) for g in got] == \
        [(top[0][0], 0, "nv", "follow_up", "Dr. Browser")]
    assert got[0]["note"] == "regular network, <b>benign</b> pattern"

    # ... in the worklist
    browser.get(url)
    row = browser.find_element(By.XPATH, f"//table[@id='worklist']//tr[td/a[text()='{top[0][0]}']]")
    assert "disagree: nv" in row.text and "follow-up" in row.text

    # CSV export (fetched by the page itself: same origin, same cookies)
    csv_text = browser.execute_async_script(
        "var done = arguments[0]; fetch(document.getElementById('export-csv').href)"
        ".then(r => r.text()).then(done, e => done('ERROR ' + e));")
    header, *lines = csv_text.strip().splitlines()
    assert "diagnosis" in header.split(",") and len(lines) == len(rows(site.db, "SELECT id FROM results"))
    assert any("Dr. Browser" in line and ",nv," in line for line in lines)

    # quarantine with the header view
    browser.get(url + "quarantine")
    wait.until(EC.presence_of_element_located((By.ID, "quarantine")))
    assert "not a supported image" in browser.find_element(By.ID, "quarantine").text
    browser.find_element(By.CSS_SELECTOR, "#quarantine td.name a").click()
    wait.until(EC.presence_of_element_located((By.ID, "header-info")))
    assert "Header declares" in browser.find_element(By.ID, "header-info").text
    browser.get(url + "quarantine")
    shot(browser, tmp_path, "quarantine")

    # nothing the page loaded came from anywhere but the app
    origins = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(o.startswith(url) for o in origins), origins
    # the review app never changed results
    conn = sqlite3.connect(site.db)
    assert conn.execute("SELECT count(*) FROM results").fetchone()[0] == 9
    conn.close()
