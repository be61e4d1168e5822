"""The MLflow UI as a user sees it: `wavesweep ui` over a store filled by a small study, driven by
Debian's headless Chromium (chromium + chromium-driver; no browser downloads), following the
README's column recipe ("Comparing runs in the MLflow UI") row by row as written there.

Run alone with ``python -m pytest tests/test_browser.py``. Screenshots are written to
``$WAVESWEEP_TEST_ARTIFACTS`` (default ``test-artifacts/browser`` in the repository, not committed).
Without Chromium the module is skipped locally, and fails under CI (``CI=true``), where
``.ci/run`` installs it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = [pytest.mark.browser, pytest.mark.slow]

SPEC = """
study: ui-study
base: {model: cnn, dataset: digits, eval_limit: 120, seed: 0}
fixed: {timing_batches: 1, level: 3}
space:
  wavelet: [bior1.3, haar, rbio2.2]
  percentile: [40, 60, 80]
  layout: [filter, kernel]
objectives:
  top1: maximize
sampler: {name: grid, seed: 0}   # three distinct points: a configuration drawn twice would not run twice
n_trials: 3
"""


def _need_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        msg = f"browser test needs {', '.join(missing)} (apt-get install chromium chromium-driver; pip install selenium)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def artifacts_dir() -> Path:
    out = Path(os.environ.get("WAVESWEEP_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "browser"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def filled_store(tmp_path_factory, shared_cache):
    _need_browser()
    work = tmp_path_factory.mktemp("ui-store")
    (work / "ui.yaml").write_text(SPEC)
    env = subprocess_env(work, shared_cache)
    proc = subprocess.run([sys.executable, "-m", "wavesweep", "study", "ui.yaml", "-q"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, env


@pytest.fixture(scope="module")
def server(filled_store):
    """`wavesweep ui`, as the README starts it; its URL is the line it prints once the server answers."""
    work, env = filled_store
    port = _free_port()
    log_path = work / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "wavesweep", "ui", "--port", str(port)], cwd=work, env=env,
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while f"MLflow UI: {url}" not in log_path.read_text():
        if proc.poll() is not None or time.time() > deadline:
            proc.terminate()
            pytest.fail(f"wavesweep ui did not answer on {url}: {log_path.read_text()[-2000:]}")
        time.sleep(0.2)
    assert urllib.request.urlopen(f"{url}/health", timeout=10).status == 200
    yield url
    proc.send_signal(signal.SIGINT)  # Ctrl-C: the command stops its server
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    # No background networking: this machine's network is closed, and Chromium would retry forever.
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=2200,1100"):  # fmt: skip
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def _wait_text(driver, needle: str, timeout: float = 60) -> str:
    from selenium.webdriver.common.by import By

    deadline = time.time() + timeout
    body = ""
    while time.time() < deadline:
        body = driver.find_element(By.TAG_NAME, "body").text
        if needle in body:
            return body
        time.sleep(0.5)
    raise AssertionError(f"{needle!r} not shown within {timeout} s; page text ends: {body[-1500:]}")


def _click_text(driver, text: str) -> bool:
    from selenium.webdriver.common.by import By

    for el in driver.find_elements(By.XPATH, f"//*[normalize-space(text())={json.dumps(text)}]"):
        try:
            driver.execute_script("arguments[0].click()", el)
            return True
        except Exception:  # stale or hidden element: try the next match
            continue
    return False


def _tidy(driver) -> None:
    """MLflow 3's sidebar mode for model training, and the assistant side panel closed (for the
    screenshots: the runs table and its Columns picker are the same either way)."""
    from selenium.webdriver.common.by import By

    _click_text(driver, "Model training")
    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        driver.execute_script("arguments[0].click()", button)
    time.sleep(0.5)


def _expand_all(driver) -> None:
    """Expand study -> trial -> method nesting (the plus-square button in the run-name cell)."""
    from selenium.common.exceptions import StaleElementReferenceException

    sel = "button[data-component-id$='runnamecellrenderer.tsx_46']"
    for _ in range(5):
        # read in the page in one step: the table may re-render between finding a button and reading it
        closed = driver.execute_script(
            "return [...document.querySelectorAll(arguments[0])].filter(b => b.innerHTML.includes('V4.5h1.5'))", sel
        )
        if not closed:
            return
        for b in closed:
            try:
                driver.execute_script("arguments[0].click()", b)
            except StaleElementReferenceException:  # re-rendered: found again on the next round
                continue
            time.sleep(0.3)
        time.sleep(1.0)


SECTION_PREFIX = {"Metrics": "metrics", "Parameters": "params", "Tags": "tags"}  # of the runs table's column ids


def readme_recipe() -> list[tuple[list[tuple[str, str]], str]]:
    """The README's column recipe: per table row, the ``(section, name)`` entries to click in the
    Columns picker and what the table then shows."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Comparing runs in the MLflow UI") :]
    section = section[: section.index("\n## ")]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and " › " in ln]
    assert rows, "README has no column recipe"
    out = []
    for row in rows:
        clicks, shows = (c.strip() for c in row.strip("|").split("|")[:2])
        entries = [tuple(e.split(" › ")) for e in clicks.split(", ")]
        assert all(len(e) == 2 for e in entries), row
        out.append((entries, shows))
    return out


def _poll(read, ok, timeout: float = 30, step: float = 0.1):
    """``read()`` again every ``step`` s until ``ok(value)`` or ``timeout`` s have passed; the last
    value either way (the caller asserts on it, so a page that never gets there still fails)."""
    deadline = time.time() + timeout
    value = read()
    while not ok(value) and time.time() < deadline:
        time.sleep(step)
        value = read()
    return value


def _click_column(driver, section: str, name: str) -> None:
    """In the Columns picker, search ``name`` and click the entry named exactly ``name`` under the
    picker's section ``section`` ("Tags (2)" is section Tags), as the README tells a user to.

    Each step waits for what it needs on the page (the picker open, the entry listed, the picker
    closed), not for a fixed time: 2.4 s of fixed sleeps per column were 19 s of this module."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    search = "input[placeholder='Search columns']"
    driver.find_elements(By.CSS_SELECTOR, "[data-testid='column-selection-dropdown']")[0].click()
    boxes = _poll(lambda: driver.find_elements(By.CSS_SELECTOR, search), bool)
    assert boxes, "the Columns picker did not open"
    boxes[0].send_keys(name)

    def find() -> tuple[object | None, list[str]]:
        """``(the entry's node or None, every entry listed as "section › name")``, from the tree as
        it is now (the search narrows it while it re-renders: a stale node means read it again)."""
        try:
            current, listed = None, []
            tree = driver.find_element(By.CSS_SELECTOR, "[data-testid='column-selector-tree']")
            for node in tree.find_elements(By.CSS_SELECTOR, ".du-bois-light-tree-treenode"):
                title = node.find_element(By.CSS_SELECTOR, ".du-bois-light-tree-title").text.strip()
                if not node.find_elements(By.CSS_SELECTOR, ".du-bois-light-tree-switcher-noop"):  # a section heading
                    current = re.sub(r"\s*\(\d+\)$", "", title)
                    continue
                listed.append(f"{current} › {title}")
                if current == section and title == name:
                    return node.find_element(By.CSS_SELECTOR, ".du-bois-light-tree-node-content-wrapper"), listed
            return None, listed
        except StaleElementReferenceException:
            return None, ["(the tree re-rendered while it was read)"]

    def click_it() -> tuple[bool, list[str]]:
        hit, listed = find()
        if hit is None:
            return False, listed
        try:
            driver.execute_script("arguments[0].click()", hit)
        except StaleElementReferenceException:  # re-rendered between finding and clicking: find it again
            return False, listed
        return True, listed

    clicked, listed = _poll(click_it, lambda r: r[0])
    assert clicked, f"{section} › {name} not in the Columns picker; it lists {listed}"
    ActionChains(driver).send_keys(Keys.ESCAPE).perform()
    _poll(lambda: driver.find_elements(By.CSS_SELECTOR, search), lambda boxes: not boxes, timeout=5)  # closed


def _header(driver) -> tuple[dict[str, str], set[str]]:
    """The runs table's columns ``{column id: header text}`` and its section headings.

    The grid re-renders its header for a while after a column is added: an element found may be
    replaced before its text is read (a stale element), so the whole header is read again then."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def read() -> tuple[dict[str, str], set[str]]:
        cols = {e.get_attribute("col-id"): e.text.strip() for e in driver.find_elements(By.CSS_SELECTOR, ".ag-header-cell")}
        groups = {e.text.strip() for e in driver.find_elements(By.CSS_SELECTOR, ".ag-header-group-cell")} - {""}
        return cols, groups

    for _ in range(9):
        try:
            return read()
        except StaleElementReferenceException:
            time.sleep(0.5)
    return read()  # a tenth try; a stale element now fails the test


def test_study_runs_listed_with_method_and_wavelet(server, browser, filled_store):
    client = MlflowClient(filled_store[1]["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("wavesweep")
    browser.get(f"{server}/#/experiments/{exp.experiment_id}/runs")
    _wait_text(browser, "study ui-study")
    _tidy(browser)
    _expand_all(browser)
    expected: dict[str, str] = {}
    for entries, shows in readme_recipe():  # the README's table, row by row, as written
        for section, name in entries:
            _click_column(browser, section, name)
        names = {name for _, name in entries}
        if shows.startswith("no "):  # the table re-renders after a click: read it once it shows the change (or in 30 s)
            cols, groups = _poll(lambda: _header(browser), lambda h: not names & set(h[0].values()))
        else:
            cols, groups = _poll(lambda: _header(browser), lambda h: names <= set(h[0].values()) and entries[0][0] in h[1])
        if shows.startswith("no "):  # "no Dataset, Source, Models columns"
            for section, name in entries:
                assert name not in cols.values(), (name, cols)
            continue
        m = re.fullmatch(r"column `([^`]+)` under \*(\w+)\*", shows)
        assert m and len(entries) == 1 and entries[0] == (m.group(2), m.group(1)), shows
        expected[f"{SECTION_PREFIX[m.group(2)]}.`{m.group(1)}`"] = m.group(1)
        assert m.group(2) in groups, (m.group(2), groups)
    cols, groups = _header(browser)
    chosen = {k: v for k, v in cols.items() if k.split(".")[0] in SECTION_PREFIX.values()}
    # exactly the recipe's columns: tags.`method` (not params.`method`), metrics.`top1` (not base_top1, ...)
    assert chosen == expected == {"tags.`method`": "method", "params.`wavelet`": "wavelet", "params.`layout`": "layout",
                                  "metrics.`top1`": "top1", "metrics.`compression_ratio`": "compression_ratio"}, chosen  # fmt: skip
    assert {"Metrics", "Parameters", "Tags"} <= groups
    _expand_all(browser)
    body = _wait_text(browser, "dwt ")
    browser.save_screenshot(str(artifacts_dir() / "runs-table.png"))
    trials = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("method") == "trial"]
    assert len(trials) == 3
    for t in trials:
        assert t.info.run_name in body  # every trial of the study is listed
        wavelet = t.data.params["wavelet"]
        assert f"dwt {wavelet} " in body and f"magnitude (matched to {wavelet} " in body
    assert "method" in body and "wavelet" in body  # the chosen columns are shown...
    lines = body.splitlines()
    assert "magnitude" in lines and "random" in lines  # ...with the method values in their cells
    assert any(l in {"bior1.3", "haar", "rbio2.2"} for l in lines)


SCROLL_DOWN = """for (const e of document.querySelectorAll('*'))
    if (e.scrollHeight > e.clientHeight + 10 && ['auto', 'scroll'].includes(getComputedStyle(e).overflowY)) e.scrollTop += 400;"""


def test_compare_view_of_dwt_and_matched_magnitude(server, browser, filled_store):
    client = MlflowClient(filled_store[1]["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("wavesweep")
    trial = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("method") == "trial")
    kids = {r.data.tags["method"]: r for r in client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{trial.info.run_id}'")}  # fmt: skip
    ids = [kids["dwt"].info.run_id, kids["magnitude"].info.run_id]
    query = urllib.parse.urlencode({"runs": json.dumps(ids), "experiments": json.dumps([exp.experiment_id])})
    browser.get(f"{server}/#/compare-runs?{query}")
    from selenium.webdriver.common.by import By

    body = _wait_text(browser, kids["dwt"].info.run_name)
    _tidy(browser)
    assert kids["magnitude"].info.run_name in body
    browser.save_screenshot(str(artifacts_dir() / "compare-dwt-vs-magnitude.png"))
    # The metric rows sit in a scrolled table: read them from the DOM, then scroll to the
    # headline rows for a second screenshot.
    # (the metric list is virtualised: rows below its fold are not in the DOM yet, so the page and
    # the list, each a scrolled element, are scrolled down a step at a time until the row is there)
    deadline = time.time() + 60
    while "compression_ratio" not in (text := browser.execute_script("return document.body.textContent")):
        assert time.time() < deadline, "compare view never listed the compression_ratio metric"
        browser.execute_script(SCROLL_DOWN)
        time.sleep(0.5)
    for key in ("coeff_sparsity", "compression_ratio"):
        assert key in text
    # "Show diff only" on the metrics (the second toggle; the first is the parameters') leaves the
    # rows where dwt and its matched magnitude run differ; scroll the page (not the table, whose
    # name and value columns scroll separately) to that section for the screenshot.
    toggles = browser.find_elements(By.XPATH, "//*[normalize-space(text())='Show diff only']")
    assert len(toggles) >= 2, "compare view has no 'Show diff only' toggle for metrics"
    browser.execute_script("arguments[0].click()", toggles[1])
    time.sleep(1.0)
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'})", toggles[1])
    time.sleep(0.5)
    browser.save_screenshot(str(artifacts_dir() / "compare-metrics-diff.png"))
    text = browser.execute_script("return document.body.textContent")
    assert "top1" in text  # dwt and magnitude differ in accuracy here, so top1 is among the diff rows
    # matched budget: both runs show the same pruned fraction, as logged
    frac = kids["dwt"].data.metrics["pruned_fraction"]
    assert frac == kids["magnitude"].data.metrics["pruned_fraction"] or abs(frac - kids["magnitude"].data.metrics["pruned_fraction"]) < 2e-3
