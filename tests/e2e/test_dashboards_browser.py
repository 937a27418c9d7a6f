"""Dashboards in real headless Chromium against a real ``spectrawatch server`` subprocess.

Two data sources: a database seeded through ``storage.repository`` before the server starts
(every panel kind, deterministic values), and a real short training run streaming through the
client, the ingest API and the worker while a page is open (live refresh).

Needs Debian ``chromium`` + ``chromium-driver`` and ``selenium`` (``.ci/install_chromium.sh``);
skips only when no Chromium binary can be found. Screenshots of every page go to
``$SPECTRAWATCH_TEST_ARTIFACTS`` (default: pytest's temp dir).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.e2e.dashboard_data import (
    ALERT_STEP,
    CROSSING_STEP,
    LAYERS,
    MODULES,
    NAN_ACTIVATIONS_FROM,
    NAN_FROM,
    RULES_PROJECT,
    STEPS,
    WARNING_STEP,
    SeededRun,
    seed,
    seed_nonfinite,
    seed_open_alert,
    seed_rules,
)
from tests.factories import make_run
from tests.servers import ServerProcess, create_token, wait_until

pytestmark = pytest.mark.e2e

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)
PAGE_TIMEOUT = 60.0


def find_chromium() -> tuple[str, str] | None:
    """``(chromium, chromedriver)`` paths, or None when this machine has no Chromium."""
    browser = next(
        (
            p
            for p in (
                shutil.which("chromium"),
                shutil.which("chromium-browser"),
                "/usr/bin/chromium",
            )
            if p and Path(p).exists()
        ),
        None,
    )
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None
    )
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = Path(os.environ.get("SPECTRAWATCH_TEST_ARTIFACTS", tmp_path_factory.mktemp("screens")))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium (via chromedriver) for the module, with browser logs enabled."""
    found = find_chromium()
    if found is None:
        pytest.skip("chromium/chromedriver not installed (run .ci/install_chromium.sh)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:  # chromium is here, so this is a broken setup, not a skip
        pytest.fail("selenium is not installed: run .ci/install_chromium.sh")
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=found[1]))
    driver.set_page_load_timeout(PAGE_TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, SeededRun]]:
    data_dir = tmp_path_factory.mktemp("dash") / "server"
    runs = seed(data_dir)
    proc = ServerProcess(data_dir).start()
    try:
        yield proc, runs
    finally:
        proc.stop()


def console_errors(driver: Any) -> list[str]:
    """SEVERE browser-log entries (JS exceptions, failed loads) since the last call."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def wait_js(driver: Any, script: str, timeout: float = PAGE_TIMEOUT) -> Any:
    """Poll ``return <script>`` until truthy; returns that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script("return " + script)
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {script!r}")


def open_page(driver: Any, url: str) -> None:
    """Load ``url`` and wait for the dashboard script's first render (or its error state)."""
    driver.get(url)
    state = wait_js(driver, "document.body.dataset.ready")
    errors = driver.execute_script("return window.SW ? window.SW.errors : []")
    assert state == "1", f"page failed: {errors}"


PANELS_JS = """
return Array.from(document.querySelectorAll('#panels section.panel')).map(function (n) {
  var gd = n.querySelector('.plot');
  var rendered = !!(gd && gd.querySelector('.main-svg'));
  return {id: n.dataset.panel, state: n.dataset.state, rendered: rendered,
          empty: n.querySelector('.empty').textContent,
          traces: (gd && gd.data) ? gd.data.map(function (t) {
            return {name: t.name, type: t.type, n: (t.x || []).length,
                    key: t.legendgroup === 'phases',
                    nz: t.z ? t.z.length : 0, finite: (t.y || []).filter(function (v) {
                      return v !== null && isFinite(v); }).length};
          }) : [],
          shapes: (gd && gd.layout) ? (gd.layout.shapes || []).map(function (s) {
            return {type: s.type, x0: s.x0, x1: s.x1}; }) : [],
          title: (gd && gd.layout && gd.layout.title) ? gd.layout.title.text : ''};
});
"""


def panels(driver: Any) -> dict[str, dict[str, Any]]:
    return {p["id"]: p for p in driver.execute_script(PANELS_JS)}


def screenshot(driver: Any, artifacts: Path, name: str) -> None:
    driver.save_screenshot(str(artifacts / f"{name}.png"))


def check_plotted(
    panel: dict[str, Any], names: set[str] | None = None, min_points: int = 1
) -> None:
    assert panel["state"] == "plot", panel
    assert panel["rendered"], f"{panel['id']}: no SVG rendered"
    got = {t["name"] for t in panel["traces"]}
    if names is not None:
        assert names <= got, f"{panel['id']}: traces {got}, expected {names}"
    for t in panel["traces"]:
        if t["type"] != "heatmap" and not t["key"]:  # a phase's legend key holds no data
            assert t["n"] >= min_points, f"{panel['id']}/{t['name']}: {t['n']} points"


# --- seeded server ---------------------------------------------------------------------------


def test_runs_page_lists_filters_and_links(browser: Any, seeded: Any, artifacts: Path) -> None:
    server, runs = seeded
    browser.get(server.url + "/")
    rows = wait_js(browser, "document.querySelectorAll('table.runs tbody tr').length")
    assert rows == 3
    alert_link = browser.find_element("css selector", f"tr[data-run='{runs.run_id}'] a.alerts")
    assert alert_link.text == "1"
    screenshot(browser, artifacts, "runs")
    browser.get(server.url + "/projects/demo?q=base")
    assert wait_js(browser, "document.querySelectorAll('table.runs tbody tr').length") == 1
    browser.find_element("link text", "baseline").click()
    wait_until(lambda: browser.current_url.endswith(f"/runs/{runs.other_run_id}"), 20)
    wait_js(browser, "document.body.dataset.ready")
    assert console_errors(browser) == []


def test_runs_list_shows_last_values_and_flags_a_run_gone_nan(
    browser: Any, seeded: Any, artifacts: Path
) -> None:
    """A run that hit NaN read "finished" with an alert count and no results: the list shows
    each run's last loss and accuracy (the picker offering every logged scalar) and a NaN/Inf
    badge, titled with where, on the run whose loss went non-finite."""
    server, _ = seeded
    api = f"{server.url}/api/v1"
    ids = {}
    for name, last in (("fine", 0.125), ("diverged", math.nan)):
        run = httpx.post(f"{api}/runs", json={"project": "summaries", "name": name}, timeout=30)
        ids[name] = run.json()["id"]
        points = [{"step": t, "name": "loss", "value": 2.0 - t / 100} for t in range(0, 60, 10)]
        points += [
            {"step": 60, "name": "loss", "value": last},
            {"step": 60, "name": "val_acc", "value": 0.875},
            {"step": 60, "name": "lr", "value": 1e-3},
        ]
        body = json.dumps(points)  # NaN as the client sends it
        headers = {"Content-Type": "application/json"}
        sent = httpx.post(f"{api}/runs/{ids[name]}/scalars", content=body, headers=headers)
        assert sent.status_code == 202, sent.text
    stats = {"nonfinite_scalars": {"loss": {"step": 60, "value": "nan"}}}
    httpx.post(f"{api}/runs/{ids['diverged']}/client-stats", json=stats, timeout=30)
    browser.get(server.url + "/projects/summaries")
    wait_js(browser, "document.querySelectorAll('table.runs tbody tr').length === 2")
    heads = browser.execute_script(
        "return Array.from(document.querySelectorAll('table.runs th.last-value'))"
        ".map(function (th) { return th.textContent; })"
    )
    assert heads == ["loss", "val_acc"]
    cells = browser.execute_script(
        "return Array.from(document.querySelectorAll('table.runs tbody tr')).map(function (tr) {"
        " return Array.from(tr.querySelectorAll('td.last-value'))"
        ".map(function (td) { return td.textContent.trim(); }); })"
    )
    assert cells == [["NaN/Inf", "0.875"], ["0.125", "0.875"]]
    flag = browser.find_element("css selector", f"tr[data-run='{ids['diverged']}'] .nonfinite-flag")
    assert flag.text == "NaN/Inf"
    assert flag.get_attribute("title") == "NaN/Inf: loss (nan) from step 60"
    assert (
        browser.find_elements("css selector", f"tr[data-run='{ids['fine']}'] .nonfinite-flag") == []
    )
    picked = browser.execute_script(
        "return Array.from(document.getElementById('summary-columns').options)"
        ".map(function (o) { return o.value + (o.selected ? '*' : ''); })"
    )
    assert picked == ["loss*", "lr", "val_acc*"]
    screenshot(browser, artifacts, "runs-summary")
    browser.get(server.url + "/projects/summaries?summary=lr&sort=summary:lr")
    wait_js(browser, "document.querySelectorAll('table.runs th.last-value').length === 1")
    assert browser.find_element("css selector", "table.runs th.last-value").text == "lr"
    assert console_errors(browser) == []


def test_long_run_name_does_not_break_status_badges(browser: Any, seeded: Any) -> None:
    """A 200-character run name squeezes the other columns: the status badges stay one line
    (they wrapped mid-word, "finishe / d", with the cells' ``overflow-wrap: anywhere``)."""
    server, _ = seeded
    name = "ünïcødé-" + "very-long-run-name-" * 10
    created = httpx.post(
        f"{server.url}/api/v1/runs", json={"project": "long-names", "name": name}, timeout=30
    )
    assert created.status_code == 201, created.text
    scalar = [{"step": 12_345_678, "name": "loss", "value": 1.0}]
    run_id = created.json()["id"]
    httpx.post(f"{server.url}/api/v1/runs/{run_id}/scalars", json=scalar, timeout=30)
    browser.set_window_size(900, 1000)  # a laptop half-screen: the name takes what it can
    try:
        browser.get(server.url + "/projects/long-names")
        wait_js(browser, "document.querySelectorAll('table.runs tbody tr').length")
        check_one_line_cells(browser)
    finally:
        browser.set_window_size(1400, 1000)


def check_one_line_cells(browser: Any) -> None:
    lines = browser.execute_script(
        "return Array.from(document.querySelectorAll('table.runs .badge'))"
        ".map(function (b) { return b.getClientRects().length; })"
    )
    assert lines == [1], lines
    # the short cells too: id, last step, age, last seen ("27m" broke as "27" / "m")
    texts = browser.execute_script(
        "return [2, 6, 7, 8].map(function (n) {"
        " var td = document.querySelector('table.runs tbody td:nth-child(' + n + ')');"
        " var r = document.createRange(); r.selectNodeContents(td.firstChild);"
        " return [td.textContent.trim(), r.getClientRects().length]; })"
    )
    assert texts[1][0] == "12345678", texts
    assert [n for _, n in texts] == [1] * 4, texts


BROKEN_TOKENS_JS = """
var out = [];
document.querySelectorAll('td, th').forEach(function (cell) {
  var walk = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
  for (var node = walk.nextNode(); node; node = walk.nextNode()) {
    var text = node.textContent.trim();
    if (!text || /\\s/.test(text)) { continue; }
    var r = document.createRange(); r.selectNodeContents(node);
    var tops = new Set(Array.from(r.getClientRects())
      .map(function (x) { return Math.round(x.top); }));
    if (tops.size > 1) { out.push(text); }
  }
});
return out;
"""


def emulate_width(driver: Any, width: int) -> None:
    """Lay pages out ``width`` CSS pixels wide (a phone under 500: mobile); 0: the window's."""
    if not width:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        return
    metrics = {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": width < 500}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)


def test_table_cells_keep_words_numbers_and_buttons_whole(browser: Any, seeded: Any) -> None:
    """At 1024 px, the alerts page's and the runs list's cells broke words and numbers
    mid-token ("resolve|d", "acknowl|edge", "0.0|01": ``overflow-wrap: anywhere`` let the
    table squeeze a column below one word); a wide table scrolls in its box instead."""
    server, runs = seeded
    emulate_width(browser, 1024)
    try:
        open_page(browser, f"{server.url}/runs/{runs.run_id}/alerts")
        assert browser.execute_script(BROKEN_TOKENS_JS) == []
        status = browser.execute_script(
            "var td = Array.from(document.querySelectorAll('#table-alerts td'))"
            ".find(function (c) { return c.textContent === 'resolved'; });"
            "var r = document.createRange(); r.selectNodeContents(td);"
            "return r.getClientRects().length;"
        )
        assert status == 1
        heads = browser.execute_script(
            "return Array.from(document.querySelectorAll('#table-alerts th')).map(function (th)"
            " { return [th.textContent, getComputedStyle(th).textAlign]; })"
        )
        assert heads[0][1] == "right", heads  # step: a number column, aligned as its numbers
        config = {f"k{i}": 0.001 * i for i in range(12)}
        created = httpx.post(
            f"{server.url}/api/v1/runs",
            json={"project": "wide-config", "name": "lr-sweep-0.001", "config": config},
            timeout=30,
        )
        assert created.status_code == 201, created.text
        cols = "&".join(f"cols=k{i}" for i in range(12))
        browser.get(f"{server.url}/projects/wide-config?{cols}")
        wait_js(browser, "document.querySelectorAll('table.runs tbody tr').length")
        assert browser.execute_script(BROKEN_TOKENS_JS) == []
        assert browser.execute_script(
            "return document.documentElement.scrollWidth <= window.innerWidth"
        )
    finally:
        emulate_width(browser, 0)


def test_pages_fit_a_phone_with_a_one_line_header(browser: Any, seeded: Any) -> None:
    """At 390 px the sticky header took 105 px (the nav on 4 lines, "page updated" on 5), the
    runs, alerts and rules pages were 487-705 px wide, and an error page 980 px (no viewport)
    without a header: now each fits the screen (wide tables scroll in their box)."""
    server, runs = seeded
    emulate_width(browser, 390)
    measure = (
        "return [document.documentElement.scrollWidth,"
        " document.querySelector('header.top').getBoundingClientRect().height]"
    )
    try:
        for path, ready in (
            (f"/runs/{runs.run_id}/alerts", True),
            (f"/runs/{runs.run_id}/layers", True),
            ("/projects/demo/alert-rules", True),
            ("/projects/demo", False),
            ("/runs/99999999", False),
            ("/alert-rules", False),
        ):
            if ready:
                open_page(browser, server.url + path)
            else:
                browser.get(server.url + path)
            width, header = browser.execute_script(measure)
            assert width <= 390, (path, width)
            assert header <= 48, (path, header)
        assert browser.find_element("css selector", "header.top nav a").text == "Runs"
    finally:
        emulate_width(browser, 0)
        console_errors(browser)  # the 404 page's own load, asked for


def test_overview_scalars_sed_phases_and_markers(
    browser: Any, seeded: Any, artifacts: Path
) -> None:
    server, runs = seeded
    open_page(browser, f"{server.url}/runs/{runs.run_id}")
    got = panels(browser)
    check_plotted(got["loss"], {"loss"}, 200)
    check_plotted(got["accuracy"], {"val_acc", "train_acc"}, 200)
    check_plotted(got["sed_gap"], {"w16", "w32"}, 200)
    phases = {f"phase: {p}" for p in ("rise", "plateau", "collapse")}
    assert phases <= {t["name"] for t in got["sed_gap"]["traces"] if t["key"]}  # legend keys
    check_plotted(got["sed_edge"], {"w16", "w32"})
    check_plotted(got["warning"], {"grok.warning_score", "grok.imminent"})
    check_plotted(got["update_ratio"], {"norm.update_ratio"}, 100)
    assert (
        browser.execute_script(
            "return document.querySelector('#panel-update_ratio .plot').layout.yaxis.type"
        )
        == "log"
    )
    # a line plot's y axis toggles between log and linear, and stays so when the page refreshes
    toggle = "#panel-update_ratio .modebar-btn[data-title='Log / linear y axis']"
    browser.execute_script(f"document.querySelector({toggle!r}).click()")
    y_type = "return document.querySelector('#panel-update_ratio .plot').layout.yaxis.type"
    assert browser.execute_script(y_type) == "linear"
    renders = browser.execute_script("return SW.renders")
    browser.execute_async_script("SW.reload().then(arguments[0])")
    assert browser.execute_script("return SW.renders") == renders + 1
    assert browser.execute_script(y_type) == "linear"
    browser.execute_script(f"document.querySelector({toggle!r}).click()")
    assert browser.execute_script(y_type) == "log"
    rects = [s for s in got["sed_gap"]["shapes"] if s["type"] == "rect"]
    assert [(r["x0"], r["x1"]) for r in rects] == [
        (0, 60),
        (60, 120),
        (120, 199),
    ]  # rise/plateau/collapse
    lines = {s["x0"] for s in got["loss"]["shapes"] if s["type"] == "line"}
    crossing = CROSSING_STEP - 1  # the seeded sigmoid passes 0.9 one step before its design point
    assert {WARNING_STEP, crossing, 150} <= lines  # warning, val_acc crossing, the open alert
    summary = browser.find_element("id", "summary").text
    assert f"early warning at step {WARNING_STEP}" in summary
    assert (
        "evidence: weight-norm turnaround at step 40, commutator defect above its baseline at "
        f"step {WARNING_STEP}"
    ) in summary
    assert f"lead time {crossing - WARNING_STEP} steps" in summary
    client = browser.find_element("id", "client-stats")
    assert client.text == (
        "client: 120 frames sent, 3 dropped, 2 spooled, 1 error, update sketch every 100 steps"
    )
    assert client.get_attribute("class") == "client warn"
    assert "out of memory" in client.get_attribute("title")
    screenshot(browser, artifacts, "overview")
    assert console_errors(browser) == []


def test_heatmap_click_opens_layer_drilldown(browser: Any, seeded: Any, artifacts: Path) -> None:
    server, runs = seeded
    open_page(browser, f"{server.url}/runs/{runs.run_id}/layers?metric=htsr.alpha")
    heat = panels(browser)["heatmap"]
    check_plotted(heat)
    assert heat["traces"][0]["type"] == "heatmap"
    assert heat["traces"][0]["n"] == len(STEPS)
    assert heat["traces"][0]["nz"] == len(LAYERS)
    assert (
        browser.execute_script("return document.getElementById('control-metric').value")
        == "htsr.alpha"
    )
    screenshot(browser, artifacts, "layers")
    from selenium.webdriver.common.action_chains import ActionChains

    drag = browser.find_element("css selector", "#panel-heatmap .nsewdrag")
    ActionChains(browser).move_to_element(drag).click().perform()
    wait_until(lambda: "/layers/" in browser.current_url, 20)
    assert "metric=htsr.alpha" in browser.current_url
    assert "step=" in browser.current_url
    wait_js(browser, "document.body.dataset.ready")
    layer = browser.find_element("id", "layer-name").text
    assert layer in LAYERS
    got = panels(browser)
    check_plotted(got["esd"], min_points=10)
    assert any(t["name"].startswith("power law \u03b1=") for t in got["esd"]["traces"])
    axis = browser.execute_script(
        "return document.querySelector('#panel-esd .plot').layout.xaxis.type"
    )
    assert axis == "log"
    check_plotted(got["mp"])
    assert any(t["name"].startswith("Marchenko") for t in got["mp"]["traces"])
    check_plotted(got["traps"], min_points=10)
    assert [t["name"] for t in got["traps"]["traces"]] == ["ESD", "ESD of the shuffled weight"]
    check_plotted(got["alpha"], {"htsr.alpha", "farms.alpha"}, len(STEPS))
    check_plotted(got["update"], {"norm.update_ratio"}, len(STEPS))
    assert (
        browser.execute_script(
            "return document.querySelector('#panel-update .plot').layout.yaxis.type"
        )
        == "log"
    )
    assert got["esd_farms"]["state"] == "empty"  # the seeded payloads carry no FARMS ESD
    screenshot(browser, artifacts, "layer")
    assert console_errors(browser) == []


def test_drilldown_step_is_url_state(browser: Any, seeded: Any) -> None:
    server, runs = seeded
    open_page(browser, f"{server.url}/runs/{runs.run_id}/layers/blocks.1.mlp?step=55")
    assert browser.execute_script("return document.getElementById('control-step').value") == "50"
    assert "@ step 50" in panels(browser)["esd"]["title"]
    browser.execute_script(
        "var s = document.getElementById('control-step'); s.value = '120';"
        "s.dispatchEvent(new Event('change'));"
    )
    wait_until(lambda: "@ step 120" in panels(browser)["esd"]["title"], 20)
    assert "step=120" in browser.current_url
    assert console_errors(browser) == []


def test_back_and_forward_step_through_control_choices(browser: Any, seeded: Any) -> None:
    """A control choice is a history entry: Back shows the previous metric (it left the page,
    the choices were replaced in place), Forward the next; each is the URL's state."""
    server, runs = seeded
    base = f"{server.url}/runs/{runs.run_id}/layers"
    open_page(browser, base + "?metric=htsr.alpha")
    browser.execute_script(
        "var s = document.getElementById('control-metric'); s.value = 'farms.alpha';"
        "s.dispatchEvent(new Event('change'));"
    )
    title = "return (document.querySelector('#panels .plot').layout.title || {}).text"
    wait_until(lambda: browser.execute_script(title).startswith("farms.alpha"), 20)
    assert browser.current_url == base + "?metric=farms.alpha"
    browser.back()
    wait_until(lambda: browser.execute_script(title).startswith("htsr.alpha"), 20)
    assert browser.current_url == base + "?metric=htsr.alpha"
    control = "return document.getElementById('control-metric').value"
    assert browser.execute_script(control) == "htsr.alpha"
    browser.forward()
    wait_until(lambda: browser.execute_script(title).startswith("farms.alpha"), 20)
    assert browser.execute_script(control) == "farms.alpha"


def test_activations_alerts_and_compare_pages(browser: Any, seeded: Any, artifacts: Path) -> None:
    server, runs = seeded
    open_page(browser, f"{server.url}/runs/{runs.run_id}/activations")
    got = panels(browser)
    check_plotted(got["eigentrack-eigentrack.entropy"], set(LAYERS), len(STEPS))
    check_plotted(got["eigentrack-eigentrack.outliers"], set(LAYERS))
    screenshot(browser, artifacts, "activations")

    open_page(browser, f"{server.url}/runs/{runs.run_id}/alerts")
    check_plotted(panels(browser)["timeline"], {"warning", "info"})
    titles = browser.execute_script(
        "return Array.from(document.querySelectorAll('#panel-timeline .modebar-btn'))"
        ".map(function (b) { return b.getAttribute('data-title'); })"
    )
    assert "Download data as CSV" in titles
    assert "Log / linear y axis" not in titles  # its rows are rules, not values
    # its CSV: rule and layer apart, as stored (the row labels are escaped "rule layer")
    csv = browser.execute_script(
        "return SW.figureCsv(document.querySelector('#panel-timeline .plot'))"
    ).split("\n")
    assert csv[0] == "severity,rule,layer,status,step"
    assert f"warning,heavy_tail_out_of_range,blocks.1.mlp,open,{ALERT_STEP}" in csv
    assert f"info,grokking_imminent,,resolved,{CROSSING_STEP}" in csv
    assert wait_js(browser, "document.querySelector('#table-alerts table').dataset.rows") == "2"
    deliveries = browser.find_element("id", "table-deliveries").text
    assert "alert.opened" in deliveries
    assert "delivered" in deliveries
    screenshot(browser, artifacts, "alerts")

    open_page(
        browser,
        f"{server.url}/compare?runs={runs.run_id},{runs.other_run_id}&names=loss,htsr.alpha&layer=head",
    )
    got = panels(browser)
    two = {f"#{runs.run_id} grokking-demo", f"#{runs.other_run_id} baseline"}
    check_plotted(got["compare-loss"], two, 200)
    check_plotted(got["compare-htsr.alpha"], two, len(STEPS))
    assert "head" in got["compare-htsr.alpha"]["title"]
    screenshot(browser, artifacts, "compare")
    assert console_errors(browser) == []


def test_compare_panels_of_names_alike_but_for_punctuation_are_two(
    browser: Any, seeded: Any
) -> None:
    """``train/loss`` and ``train_loss`` were one DOM id (``/`` became ``_``): two panels came
    from the API and the page showed one."""
    server, _ = seeded
    with httpx.Client(base_url=f"{server.url}/api/v1") as api:
        run_id = make_run(api, project="punct", name="p")
        rows = [
            {"step": s, "name": n, "value": v * (s + 1)}
            for s in range(20)
            for n, v in (("train/loss", 1.0), ("train_loss", -1.0), ("train·2f·loss", 2.0))
        ]
        api.post(f"/runs/{run_id}/scalars", json=rows).raise_for_status()
    names = "train%2Floss,train_loss,train%C2%B72f%C2%B7loss"
    open_page(browser, f"{server.url}/compare?runs={run_id}&names={names}")
    got = panels(browser)
    assert set(got) == {"compare-train/loss", "compare-train_loss", "compare-train·2f·loss"}
    for name, panel in got.items():
        check_plotted(panel, min_points=20)
        assert panel["title"].startswith(name.removeprefix("compare-")), panel
    ids = browser.execute_script(
        "return Array.from(document.querySelectorAll('#panels section')).map(function (n) {"
        " return n.id; })"
    )
    assert len(set(ids)) == 3, ids
    assert console_errors(browser) == []


def test_compare_metric_with_a_comma_in_its_name_can_be_picked(browser: Any, seeded: Any) -> None:
    """Picking ``a,b`` in the metrics control wrote ``names=a,b``, which the API split: the
    page drew its default metrics. Each choice is its own ``names`` parameter now."""
    server, _ = seeded
    with httpx.Client(base_url=f"{server.url}/api/v1") as api:
        run_id = make_run(api, project="comma", name="c")
        rows = [
            {"step": s, "name": n, "value": 1.0 + s} for s in range(10) for n in ("loss", "a,b")
        ]
        api.post(f"/runs/{run_id}/scalars", json=rows).raise_for_status()
    open_page(browser, f"{server.url}/compare?runs={run_id}")
    assert set(panels(browser)) == {"compare-loss"}
    before = renders(browser)
    browser.execute_script(
        "var s = document.getElementById('control-names');"
        "Array.prototype.forEach.call(s.options, function (o) {"
        " o.selected = o.value === 'a,b' || o.value === 'loss'; });"
        "s.dispatchEvent(new Event('change'));"
    )
    rerendered(browser, before)
    assert set(panels(browser)) == {"compare-a,b", "compare-loss"}
    query = parse_qs(urlsplit(browser.current_url).query)
    assert query["names"] == ["a,b", "loss"]
    browser.refresh()  # the URL alone draws the same
    wait_js(browser, "document.body.dataset.ready === '1'")
    assert set(panels(browser)) == {"compare-a,b", "compare-loss"}
    assert console_errors(browser) == []


def test_compare_says_which_runs_past_its_cap_it_left_out(browser: Any, seeded: Any) -> None:
    server, _ = seeded
    with httpx.Client(base_url=f"{server.url}/api/v1") as api:
        ids = [make_run(api, project="cap", name=f"r{i}") for i in range(9)]
    open_page(browser, f"{server.url}/compare?runs={','.join(map(str, ids))}")
    notice = browser.find_element("id", "notice")
    assert notice.is_displayed()
    assert notice.text.startswith(f"1 run left out (#{ids[-1]})"), notice.text
    assert "at most 8 runs" in notice.text
    open_page(browser, f"{server.url}/compare?runs={ids[0]}")
    assert not browser.find_elements("id", "notice")
    assert console_errors(browser) == []


def test_compare_without_runs_says_how_to_pick_them(browser: Any, seeded: Any) -> None:
    """``/compare`` with no runs (typed, bookmarked) is an empty state, not an error banner
    with the API's raw 422 JSON and a 422 in the console."""
    server, _ = seeded
    console_errors(browser)
    open_page(browser, f"{server.url}/compare")
    got = panels(browser)
    assert [p["state"] for p in got.values()] == ["empty"], got
    assert "No runs picked" in next(iter(got.values()))["empty"]
    assert browser.find_element("id", "banner").get_attribute("hidden") is not None
    assert console_errors(browser) == []


LEGEND_JS = """
return Array.from(document.querySelectorAll('#panels .plot')).map(function (gd) {
  var texts = Array.from(gd.querySelectorAll('.legend .legendtext')).map(function (t) {
    return t.getBoundingClientRect().top; });
  return {rows: new Set(texts.map(Math.round)).size, legendTop: Math.min.apply(null, texts),
          titleBottom: gd.querySelector('.xtitle').getBoundingClientRect().bottom,
          bottom: gd.getBoundingClientRect().bottom,
          legendBottom: gd.querySelector('.legend').getBoundingClientRect().bottom};
});
"""


def test_legend_of_many_runs_stays_clear_of_the_axis_title(browser: Any, seeded: Any) -> None:
    """A legend that wraps to several rows sits under the x-axis title, not over it (Plotly
    places it at a fraction of a plot area it shrinks for the legend's rows)."""
    server, _ = seeded
    ids = []
    for i in range(5):
        run = httpx.post(
            f"{server.url}/api/v1/runs",
            json={"project": "legend", "name": f"run-{i}-" + "long-name-" * 6},
            timeout=30,
        ).json()
        rows = [{"step": s, "name": "loss", "value": 1 / (s + i + 1)} for s in range(20)]
        posted = httpx.post(f"{server.url}/api/v1/runs/{run['id']}/scalars", json=rows, timeout=30)
        assert posted.status_code < 300, posted.text
        ids.append(str(run["id"]))
    open_page(browser, f"{server.url}/compare?runs={','.join(ids)}&names=loss")
    (plot,) = browser.execute_script(LEGEND_JS)
    assert plot["rows"] >= 2, plot
    assert plot["legendTop"] >= plot["titleBottom"], plot
    assert plot["legendBottom"] <= plot["bottom"] + 1, plot
    # measured again after a window resize: a one-row legend that wraps in a narrower window
    # goes under the axis title, and back where it was once the window is wide again (it
    # stayed where the narrow window had put it, over the axis title)
    open_page(browser, f"{server.url}/compare?runs={','.join(ids[:2])}&names=loss")
    (first,) = browser.execute_script(LEGEND_JS)
    assert first["rows"] == 1, first
    size = browser.get_window_size()

    def clear_of_title(plot: dict[str, float]) -> bool:
        return (
            plot["legendTop"] >= plot["titleBottom"]
            and plot["legendBottom"] <= plot["bottom"] + 1
            and plot["bottom"] - plot["legendBottom"] < 30  # no room left for other rows
        )

    def as_first(plot: dict[str, float]) -> bool:
        keys = ("legendTop", "legendBottom", "bottom")
        return all(
            abs(plot[k] - plot["titleBottom"] - first[k] + first["titleBottom"]) < 2 for k in keys
        )

    try:
        for width, settled in ((700, clear_of_title), (size["width"], as_first)):
            browser.set_window_size(width, size["height"])
            deadline = time.monotonic() + 10
            while True:  # Plotly's own resize comes first, the page's measure after it
                (plot,) = browser.execute_script(LEGEND_JS)
                if settled(plot) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert settled(plot), (width, first, plot)
            assert plot["rows"] == (2 if width == 700 else 1), plot
    finally:
        browser.set_window_size(size["width"], size["height"])


FETCH_LOG_JS = """
window.SW_POLL_MS = {live: 300, idle: 300};
window.swFetches = [];
var realFetch = window.fetch;
window.fetch = function (url) {
  window.swFetches.push(new URL(String(url), location.href).pathname);
  return realFetch.apply(this, arguments);
};
"""


def test_compare_polls_run_states_refetches_on_change_and_adds_a_run(
    browser: Any, seeded: Any
) -> None:
    """Once every compared run has ended the compare page asks only for the runs' states, and
    draws again when one changes (resumed, ended); it used to refetch its whole figure at every
    poll. Its "add a run" control offers the other runs of the project. Polls shortened to
    0.3 s (``window.SW_POLL_MS``), requests counted by wrapping ``fetch``."""
    server, _ = seeded
    ids: list[int] = []
    for name in ("a", "b", "c"):
        with httpx.Client(base_url=f"{server.url}/api/v1") as api:
            run = make_run(api, project="poll", name=name)
        rows = [{"step": s, "name": "loss", "value": 1 / (s + len(ids) + 1)} for s in range(20)]
        assert httpx.post(f"{server.url}/api/v1/runs/{run}/scalars", json=rows).status_code < 300
        ended = httpx.patch(f"{server.url}/api/v1/runs/{run}", json={"status": "finished"})
        assert ended.status_code == 200, ended.text
        ids.append(run)
    script = browser.execute_cdp_cmd(
        "Page.addScriptToEvaluateOnNewDocument", {"source": FETCH_LOG_JS}
    )
    try:
        open_page(browser, f"{server.url}/compare?runs={ids[0]},{ids[1]}&names=loss")

        def figures() -> int:
            paths = browser.execute_script("return window.swFetches")
            return sum(p.endswith("/dashboards/compare") for p in paths)

        def state_polls() -> int:
            paths = browser.execute_script("return window.swFetches")
            return sum(p.endswith((f"/runs/{ids[0]}", f"/runs/{ids[1]}")) for p in paths)

        wait_js(browser, "window.swFetches.length >= 9")  # 4 polls of both runs' states
        assert figures() == 1, browser.execute_script("return window.swFetches")
        assert state_polls() >= 8

        # resumed: drawn again and polled as live; ended again: drawn once more, then quiet
        for status, badge in (("running", "live · "), ("finished", "page updated")):
            before = figures()
            r = httpx.patch(f"{server.url}/api/v1/runs/{ids[1]}", json={"status": status})
            assert r.status_code == 200, r.text
            wait_js(browser, f"document.body.dataset.renders > {before}", timeout=15)
            assert browser.find_element("id", "live").text.startswith(badge)
        drawn = figures()
        time.sleep(1.5)
        assert figures() == drawn

        options = browser.execute_script(
            "return Array.from(document.querySelectorAll('#control-add option'))"
            ".map(function (o) { return [o.value, o.textContent]; })"
        )
        assert options == [["", "—"], [str(ids[2]), f"#{ids[2]} c (finished)"]], options
        browser.execute_script(
            "var s = document.getElementById('control-add'); s.value = arguments[0];"
            "s.dispatchEvent(new Event('change'));",
            str(ids[2]),
        )
        wait_js(browser, "document.querySelectorAll('#panels .plot .legendtext').length === 3")
        query = parse_qs(urlsplit(browser.current_url).query)
        assert query["runs"] == [",".join(map(str, ids))], browser.current_url
        check_plotted(
            panels(browser)["compare-loss"], {f"#{i} {n}" for i, n in zip(ids, "abc", strict=True)}
        )
        assert browser.find_elements("id", "control-add") == []  # no run of the project left
        assert console_errors(browser) == []
    finally:
        browser.execute_cdp_cmd(
            "Page.removeScriptToEvaluateOnNewDocument", {"identifier": script["identifier"]}
        )


def test_compare_shows_the_runs_configs_differing_keys_first(browser: Any, seeded: Any) -> None:
    """The compare page named the runs and their states, never their configs: a table now has
    one column per run, its status and tags, then the config keys whose values differ
    (highlighted), the identical ones folded under a button."""
    server, _ = seeded
    ids = []
    for lr, tags in ((0.001, ["base"]), (0.01, ["base", "hi-lr"])):
        config = {"lr": lr, "optimizer": {"name": "adamw", "betas": [0.9, 0.95]}, "seed": 0}
        created = httpx.post(
            f"{server.url}/api/v1/runs",
            json={"project": "configs", "name": f"lr{lr}", "config": config, "tags": tags},
        )
        assert created.status_code == 201, created.text
        ids.append(created.json()["id"])
    open_page(browser, f"{server.url}/compare?runs={ids[0]},{ids[1]}")
    rows_js = (
        "return Array.from(document.querySelectorAll('#config-table tr')).filter(function (r) {"
        " return !r.closest('tbody[hidden]'); }).map(function (r) {"
        " return [r.className].concat(Array.from(r.cells).map(function (c) {"
        " return c.textContent; })); })"
    )
    rows = browser.execute_script(rows_js)
    assert rows == [
        ["", "key", f"#{ids[0]} lr0.001", f"#{ids[1]} lr0.01"],
        ["", "status", "running", "running"],
        ["differs", "tags", "base", "base, hi-lr"],
        ["differs", "lr", "0.001", "0.01"],
        ["toggle", "show 3 keys identical in every run"],
    ], rows
    browser.find_element("id", "config-toggle").click()
    rows = browser.execute_script(rows_js)
    assert rows[-3:] == [
        ["", "optimizer.betas", "[0.9, 0.95]", "[0.9, 0.95]"],
        ["", "optimizer.name", "adamw", "adamw"],
        ["", "seed", "0", "0"],
    ], rows
    # a refresh (the runs' states polled) keeps the identical keys open
    browser.execute_async_script("SW.reload().then(arguments[0])")
    assert browser.find_element("id", "config-toggle").text.startswith("hide 3 keys")
    assert console_errors(browser) == []


def tensorboard_ema(values: list[float | None], weight: float) -> list[float | None]:
    """TensorBoard's debiased EMA (``vz_line_chart2``): the reference of the smoothing slider
    on evenly spaced steps; a non-finite point is kept as it is and not counted."""
    last, count, out = 0.0, 0, []
    for v in values:
        if v is None or not math.isfinite(v):
            out.append(v)
            continue
        last = last * weight + (1 - weight) * v
        count += 1
        out.append(last / (1 - weight**count))
    return out


def test_smoothing_slider_draws_an_ema_over_the_faint_raw_line(browser: Any, seeded: Any) -> None:
    """No smoothing for noisy loss curves: a slider (``smooth`` in the URL) now draws each line
    of the overview and compare pages as TensorBoard's debiased EMA, the raw line faint behind;
    gaps stay gaps and uneven steps weigh by their distance."""
    server, runs = seeded
    open_page(browser, f"{server.url}/runs/{runs.run_id}?smooth=0.9")
    # the EMA itself: TensorBoard's on even steps
    ys: list[float | None] = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    xs = list(range(0, 80, 10))
    got = browser.execute_script("return SW.ema(arguments[0], arguments[1], 0.9)", xs, ys)
    assert got == pytest.approx(tensorboard_ema(ys, 0.9), rel=1e-12)
    assert browser.execute_script("return SW.ema([0, 1, 2], [1, 2, 3], 0)") == [1, 2, 3]
    # a gap (null, NaN) stays one; the point after it weighs the past by 0.9 per step spanned
    got = browser.execute_script(  # WebDriver's JSON has no NaN: set in the page
        "return SW.ema([0, 1, 2, 3, 4], [3, null, NaN, 1, 2], 0.9)"
    )
    assert got[1:3] == [None, None]
    w3 = 0.9**3
    acc, decay = (0.1 * 3) * w3 + (1 - w3) * 1, 0.9 * w3
    assert got[3] == pytest.approx(acc / (1 - decay), rel=1e-12)
    assert got[4] == pytest.approx((acc * 0.9 + 0.1 * 2) / (1 - decay * 0.9), rel=1e-12)
    # uneven steps: a point 10 mean steps after the last weighs the past by 0.9^10, not 0.9
    got = browser.execute_script("return SW.ema([0, 1, 2, 12], [0, 0, 0, 1], 0.9)")
    w1, w3 = 0.9 ** (1 / 4), 0.9 ** (10 / 4)  # the mean step: 12 / 3
    assert got[-1] == pytest.approx((1 - w3) / (1 - 0.9 * w1 * w1 * w3), rel=1e-12)

    def loss_traces() -> list[dict[str, Any]]:
        return browser.execute_script(
            "return document.querySelector('#panel-loss .plot').data.map(function (t) {"
            " return {name: t.name, opacity: t.opacity, legend: t.showlegend,"
            " smoothed: !!t.swSmoothed, color: t.line.color, y: t.y}; })"
        )

    raw, smooth = loss_traces()
    assert (raw["opacity"], raw["legend"], raw["smoothed"]) == (0.25, False, False)
    assert (smooth["name"], smooth["smoothed"]) == ("loss", True)
    assert raw["color"] == smooth["color"]
    assert smooth["y"] == pytest.approx(tensorboard_ema(raw["y"], 0.9), rel=1e-3)
    assert browser.find_element("id", "control-smooth").get_attribute("value") == "0.9"
    csv = browser.execute_script("return SW.figureCsv(document.querySelector('#panel-loss .plot'))")
    assert len(csv.strip().split("\n")) == 1 + len(raw["y"])  # the raw points only
    # the slider back to 0: the raw line alone, and the URL forgets it
    browser.execute_script(
        "var s = document.getElementById('control-smooth'); s.value = '0';"
        "s.dispatchEvent(new Event('input'));"
    )
    wait_js(browser, "SW.smoothings >= 1")
    assert [t["smoothed"] for t in loss_traces()] == [False]
    assert "smooth" not in browser.current_url
    # compare: one smoothed line per run
    both = f"{runs.run_id},{runs.other_run_id}"
    open_page(browser, f"{server.url}/compare?runs={both}&names=loss&smooth=0.6")
    flags = browser.execute_script(
        "return document.querySelector('#panel-compare-loss .plot').data.map(function (t) {"
        " return !!t.swSmoothed; })"
    )
    assert flags == [False, True, False, True], flags
    assert console_errors(browser) == []


def test_layers_and_overview_say_what_a_metric_is_and_link_the_docs(
    browser: Any, seeded: Any
) -> None:
    """The layers page offered 60+ metric keys with no word on what they are: the chosen one's
    definition and "how to read it" (docs/metrics.md) show above the heatmap, linked to the
    metrics reference; the overview's panels fold theirs, and shade the update ratio's healthy
    range."""
    server, runs = seeded
    open_page(browser, f"{server.url}/runs/{runs.run_id}/layers?metric=htsr.alpha")
    box = browser.find_element("css selector", "#panel-heatmap details.metric-help")
    assert box.get_attribute("open") is not None
    assert "What htsr.alpha is and how to read it" in box.text
    assert "How to read it: 2-6: typical of well-trained layers" in box.text
    assert "Healthy range (shaded on line charts): 2-6" in box.text
    link = box.find_element("css selector", ".docs a")
    assert link.get_attribute("href").endswith("/metrics-reference#htsr.alpha")
    link.click()
    wait_until(lambda: "/metrics-reference" in browser.current_url, 20)
    row = browser.find_element("css selector", "tr:target")
    assert row.get_attribute("id") == "htsr.alpha"
    assert "well-trained" in row.text

    open_page(browser, f"{server.url}/runs/{runs.run_id}")
    ratio = browser.find_element("css selector", "#panel-update_ratio details.metric-help")
    assert ratio.get_attribute("open") is None  # folded on the overview
    assert ratio.find_element("css selector", "summary").text == (
        "What norm.update_ratio is and how to read it"
    )
    band = browser.execute_script(
        "return document.querySelector('#panel-update_ratio .plot').layout.shapes"
        ".filter(function (s) { return s.type === 'rect'; }).map(function (s) {"
        " return [s.y0, s.y1, s.label.text]; })"
    )
    assert band == [[3e-4, 3e-3, "healthy: about 1e-3: the update ratio often quoted as healthy"]]
    assert (
        browser.find_elements("css selector", "#panel-loss details.metric-help:not([hidden])") == []
    )
    assert console_errors(browser) == []


def test_a_loss_gone_nan_is_marked_where_its_line_ends(
    browser: Any, seeded: Any, tmp_path: Path
) -> None:
    """A NaN/Inf scalar is stored as a gap, so its line just stops; the client reports each
    scalar's first non-finite step in its stats, and the overview marks it: a red point named
    "loss: nan from step 20" at the last finite value, and a note on the panel."""
    import spectrawatch
    from tests.training import client_settings

    server, _ = seeded
    mon = spectrawatch.Monitor()
    mon.init(**client_settings(tmp_path, server.url, "gone-nan", project="nanloss"))
    for step in range(30):
        loss = 1.0 / (step + 1) if step < 20 else float("nan" if step < 25 else "inf")
        mon.log({"loss": loss, "val_acc": step / 30}, step=step)
    assert mon.finish(timeout=60)
    open_page(browser, f"{server.url}/runs/{mon.run_id}")
    (panel,) = [
        p for p in panels(browser).values() if any(t["name"] == "loss" for t in p["traces"])
    ]
    marks = [t for t in panel["traces"] if t["name"].startswith("loss: ")]
    assert [(t["name"], t["n"]) for t in marks] == [("loss: nan from step 20", 1)], panel
    point = browser.execute_script(
        "var gd = document.querySelector('#panel-' + arguments[0] + ' .plot');"
        "var t = gd.data.filter(function (d) { return d.name.indexOf('loss: ') === 0; })[0];"
        "return [t.x[0], t.y[0], t.line.color];",
        panel["id"],
    )
    assert point[:2] == [20, pytest.approx(1 / 20)], point
    note = browser.find_element("css selector", f"#panel-{panel['id']} .note")
    assert note.is_displayed()
    assert "loss became nan at step 20" in note.text, note.text
    assert console_errors(browser) == []


def test_a_tall_heatmap_has_its_step_axis_on_top_too(browser: Any, seeded: Any) -> None:
    """A heatmap of many layers (16 px a row: 201 layers are 3,376 px) had its step axis only
    at the bottom; it has one above the rows too, following the bottom one's zoom."""
    server, _ = seeded
    with httpx.Client(base_url=f"{server.url}/api/v1", timeout=30) as api:
        run_id = make_run(api, project="tall", name="deep")
        rows = [
            {"step": step, "layer": f"blocks.{i}.weight", "name": "htsr.alpha", "value": 2 + i / 40}
            for i in range(60)
            for step in (10, 20, 30, 40)
        ]
        r = api.post(f"/runs/{run_id}/metrics", json={"source": "import", "rows": rows})
        assert r.status_code == 202, r.text
    open_page(browser, f"{server.url}/runs/{run_id}/layers?metric=htsr.alpha")
    ticks = browser.execute_script(
        "var gd = document.querySelector('#panel-heatmap .plot');"
        "var area = gd.querySelector('.nsewdrag').getBoundingClientRect();"
        "function labels(sel) { return Array.from(gd.querySelectorAll(sel)).map(function (t) {"
        "  var r = t.getBoundingClientRect(); return [t.textContent, r.bottom - area.top,"
        "  r.top - area.bottom]; }); }"
        "return {top: labels('.x2tick text'), bottom: labels('.xtick text')};"
    )
    assert [t[0] for t in ticks["top"]] == [t[0] for t in ticks["bottom"]], ticks
    assert {"10", "40"} <= {t[0] for t in ticks["top"]}, ticks
    assert all(-30 < t[1] <= 0 for t in ticks["top"]), ticks  # just above the first row
    assert all(0 <= t[2] < 30 for t in ticks["bottom"]), ticks
    assert console_errors(browser) == []


def test_api_error_banner_shows_the_message_not_json(browser: Any, seeded: Any) -> None:
    """A figure request the API refuses shows its message, not the raw error JSON."""
    server, _ = seeded
    browser.get(f"{server.url}/compare?runs=99999")
    assert wait_js(browser, "document.body.dataset.ready") == "error"
    banner = browser.find_element("id", "banner").text
    assert banner == "Could not load this page: 404: run 99999 does not exist", banner


def test_empty_run_shows_empty_states(browser: Any, seeded: Any, artifacts: Path) -> None:
    server, runs = seeded
    for path in ("", "/layers", "/activations", "/alerts"):
        open_page(browser, f"{server.url}/runs/{runs.empty_run_id}{path}")
        got = panels(browser)
        assert got
        assert all(p["state"] == "empty" for p in got.values()), got
        assert all(p["empty"] for p in got.values()), got
    screenshot(browser, artifacts, "empty-run")
    browser.get(f"{server.url}/runs/987654")
    console_errors(browser)  # the 404 document itself is logged as a failed load: expected
    assert "run 987654 does not exist" in browser.page_source  # an error page, not JSON
    assert browser.find_element("link text", "All runs")


def test_png_and_csv_downloads(browser: Any, seeded: Any) -> None:
    server, runs = seeded
    open_page(browser, f"{server.url}/runs/{runs.run_id}")
    png = browser.execute_async_script(
        "var done = arguments[0];"
        "Plotly.toImage(document.querySelector('#panel-loss .plot'), {format: 'png', width: 600,"
        " height: 300}).then(done);"
    )
    assert png.startswith("data:image/png;base64,")
    assert len(png) > 5000
    csv = browser.execute_script("return SW.figureCsv(document.querySelector('#panel-loss .plot'))")
    lines = csv.strip().split("\n")
    assert lines[0] == "series,x,y"
    assert len(lines) == 201
    assert lines[1].startswith("loss,0,")
    assert browser.execute_script(
        "return !!document.querySelector('#panel-loss [data-title=\"Download data as CSV\"]')"
    )
    # no "Share chart..." to Plotly Cloud (plotly.js 4 shows it unless told not to)
    buttons = browser.execute_script(
        "return Array.from(document.querySelectorAll('#panel-loss .modebar-btn'))"
        ".map(function (b) { return b.getAttribute('data-title'); })"
    )
    assert "Download data as CSV" in buttons
    assert not [b for b in buttons if b and "Share" in b]
    open_page(browser, f"{server.url}/runs/{runs.run_id}/layers?metric=farms.alpha")
    titles = browser.execute_script(
        "return Array.from(document.querySelectorAll('#panel-heatmap .modebar-btn'))"
        ".map(function (b) { return b.getAttribute('data-title'); })"
    )
    assert "Download data as CSV" in titles
    assert "Log / linear y axis" not in titles  # a heatmap's y axis is its layers
    csv = browser.execute_script(
        "return SW.figureCsv(document.querySelector('#panel-heatmap .plot'))"
    )
    assert csv.split("\n")[0] == "layer,step,value"
    assert len(csv.strip().split("\n")) == 1 + len(LAYERS) * len(STEPS)
    # a metric spanning decades is coloured by its log, and its CSV still holds the values
    open_page(
        browser, f"{server.url}/runs/{runs.run_id}/layers?metric=conditioning.condition_number"
    )
    assert "log colour scale" in panels(browser)["heatmap"]["title"]
    csv = browser.execute_script(
        "return SW.figureCsv(document.querySelector('#panel-heatmap .plot'))"
    )
    first = csv.strip().split("\n")[1].split(",")
    assert first[:2] == [LAYERS[0], "0"]
    assert float(first[2]) == 1.0  # 10 ** (0 + 0 / 100), not its log
    assert console_errors(browser) == []


# --- live: a real training run while the page is open ----------------------------------------

TRAINING = r"""
import sys, time, torch
from torch import nn
import spectrawatch

url, steps, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
x = torch.randn(512, 32)
y = x[:, :4].argmax(1)
mon = spectrawatch.Monitor(url=url, project="live", run="live-run", window=8, frame_steps=4)
every = {"update": 1, "weights": 10, "theta": 0, "activations": 0, "defect": 0}
mon.attach(model, opt, every=every)
for step in range(steps):
    loss = nn.functional.cross_entropy(model(x[:384]), y[:384])
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        acc = (model(x[384:]).argmax(1) == y[384:]).float().mean().item()
    mon.log({"loss": loss.item(), "val_acc": acc}, step=step)
    time.sleep(pause)
mon.finish()
"""


XSS = '<img src=x onerror="window.__xss=1">'


def test_user_strings_are_escaped_not_executed(browser: Any, seeded: Any) -> None:
    """Run names, tags and config values are shown as text, never run as HTML/JS (issue 12)."""
    server, _ = seeded
    created = httpx.post(
        f"{server.url}/api/v1/runs",
        json={
            "project": "xss-probe",
            "name": XSS,
            "tags": [XSS, "<script>window.__xss=1</script>"],
            "config": {"note": XSS, XSS: "<b>bold</b>"},
        },
        timeout=30,
    )
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]
    for path in (
        "/projects/xss-probe",
        "/projects/xss-probe?cols=note&cols=" + quote(XSS, safe=""),
        f"/runs/{run_id}",
        f"/runs/{run_id}/layers",
        f"/compare?runs={run_id}",
    ):
        browser.get(server.url + path)
        wait_js(browser, "document.body.dataset.ready || document.readyState === 'complete'")
        time.sleep(0.5)  # give an injected onerror handler the chance to fire
        assert browser.execute_script("return window.__xss === undefined"), path
        injected = browser.execute_script(
            "return document.querySelectorAll('img[src=\"x\"]').length + Array.from("
            "document.querySelectorAll('b')).filter(function (b) {"
            " return b.textContent === 'bold'; }).length"
        )
        assert injected == 0, path
    browser.get(server.url + "/projects/xss-probe")
    wait_js(browser, "document.querySelectorAll('table.runs tbody tr').length")
    assert XSS in browser.find_element("css selector", "table.runs").text
    browser.get(server.url + "/projects/xss-probe?cols=note")
    wait_js(browser, "document.querySelectorAll('table.runs tbody tr').length")
    assert browser.find_element("css selector", "table.runs td.config").text == XSS


@pytest.mark.slow
def test_live_page_updates_while_training_runs(
    browser: Any, tmp_path: Path, artifacts: Path
) -> None:
    server = ServerProcess(tmp_path / "server").start()
    env = {**os.environ, "SPECTRAWATCH_SPOOL_DIR": str(tmp_path / "spool")}
    log_path = tmp_path / "trainer.log"
    with open(log_path, "wb") as log:
        trainer = subprocess.Popen(
            [sys.executable, "-c", TRAINING, server.url, "70", "0.25"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    api = httpx.Client(base_url=server.url + "/api/v1", timeout=10)
    try:

        def loss_points() -> int:
            return int(
                browser.execute_script(
                    "var gd = document.querySelector('#panel-loss .plot');"
                    "return gd && gd.data ? gd.data[0].x.length : 0;"
                )
            )

        run_id: list[int] = []

        def run_has_scalars() -> bool:
            found = api.get("/runs", params={"project": "live"})
            if found.status_code != 200 or not found.json():
                return False
            run_id[:] = [found.json()[0]["id"]]
            return bool(api.get(f"/runs/{run_id[0]}/scalars", params={"name": "loss"}).json())

        wait_until(run_has_scalars, 90, 0.5)
        open_page(browser, f"{server.url}/runs/{run_id[0]}")
        browser.execute_script("window.__sameDocument = true;")
        first, renders = loss_points(), int(browser.execute_script("return SW.renders"))
        wait_until(lambda: loss_points() >= first + 10, 60, 0.5)
        assert browser.execute_script("return window.__sameDocument === true")  # no reload
        assert int(browser.execute_script("return SW.renders")) > renders
        assert "live" in browser.find_element("id", "live").text
        screenshot(browser, artifacts, "live-overview")
        assert trainer.wait(180) == 0, log_path.read_text()

        def analysed() -> bool:
            run = api.get(f"/runs/{run_id[0]}").json()
            return (
                run["status"] != "running"
                and not run["frames"].get("pending")
                and not run["frames"].get("running")
            )

        wait_until(analysed, 120, 1.0)
        catalog = {m["name"] for m in api.get(f"/runs/{run_id[0]}/metrics/catalog").json()}
        assert catalog, "the worker stored no metrics"
        open_page(browser, f"{server.url}/runs/{run_id[0]}/layers")
        heat = panels(browser)["heatmap"]
        check_plotted(heat)
        assert heat["traces"][0]["nz"] >= 1
        screenshot(browser, artifacts, "live-layers")
        windows = {n.rsplit(".", 1)[1] for n in catalog if n.startswith("sed.gap_ratio.w")}
        if windows:  # SED needs a full window of update rows: present once enough steps ran
            open_page(browser, f"{server.url}/runs/{run_id[0]}")
            check_plotted(panels(browser)["sed_gap"], windows)
            screenshot(browser, artifacts, "live-overview-finished")
        assert console_errors(browser) == []
        print(json.dumps(sorted(catalog)))
    finally:
        api.close()
        if trainer.poll() is None:
            trainer.kill()
        trainer.wait()
        server.stop()


def test_pages_of_a_server_requiring_auth_ask_for_a_token(browser: Any, tmp_path: Path) -> None:
    """With auth on, a run page asks for a token (its load error used to replace the prompt at
    once, leaving no way to give one), then reads with it; another project's run is not found,
    and a refused token (revoked) is asked for again. The runs list, served without rows (it
    was a notice only), lists the token's project's runs."""
    data_dir = tmp_path / "secured"
    tokens = {project: create_token(data_dir, project) for project in ("mine", "theirs")}
    server = ServerProcess(data_dir, args=["--require-auth"]).start()
    banner = "document.getElementById('banner').textContent"
    try:
        ids = {}
        for project, token in tokens.items():
            headers = {"Authorization": f"Bearer {token}"}
            with httpx.Client(base_url=f"{server.url}/api/v1", headers=headers) as api:
                ids[project] = make_run(
                    api, project=project, name=f"{project}-run", config={"opt": {"lr": 0.1}}
                )
        browser.get(f"{server.url}/runs/{ids['mine']}")
        wait_js(browser, "document.body.dataset.ready === 'error'")
        assert "requires an API token" in browser.execute_script("return " + banner)
        browser.find_element("id", "token-input").send_keys(tokens["mine"])
        browser.find_element("css selector", "#banner button").click()
        wait_js(browser, "document.body.dataset.ready === '1'")
        assert "mine-run" in browser.title

        browser.get(f"{server.url}/runs/{ids['theirs']}")
        wait_js(browser, "document.body.dataset.ready === 'error'")
        text = browser.execute_script("return " + banner)
        assert f"404: run {ids['theirs']} does not exist" in text  # as for a missing run
        assert "theirs-run" not in browser.page_source

        browser.execute_script("window.localStorage.setItem('spectrawatch.token', 'sw_revoked')")
        browser.get(f"{server.url}/runs/{ids['mine']}")
        wait_js(browser, "document.body.dataset.ready === 'error'")
        assert "refused the stored API token" in browser.execute_script("return " + banner)
        assert browser.find_elements("id", "token-input")

        # the runs list: served without rows, filled with the token's project's runs
        browser.get(f"{server.url}/")
        wait_js(browser, "document.getElementById('runs-token-prompt').dataset.shown === '1'")
        assert "was refused" in browser.find_element("id", "runs-token-prompt").text
        browser.execute_script("window.localStorage.clear()")
        browser.get(f"{server.url}/")
        browser.find_element("id", "runs-token-input").send_keys(tokens["mine"])
        browser.find_element("css selector", "#runs-token-prompt button").click()
        wait_js(browser, "document.body.dataset.runs === '1'")
        table = browser.find_element("id", "runs-table").text
        assert "mine-run" in table
        assert "theirs-run" not in browser.page_source
        assert not browser.find_element("id", "runs-locked").is_displayed()
        # config columns: the picker learns the keys from the table fetched with the token
        keys = "Array.from(document.getElementById('config-columns').options).map(o => o.value)"
        assert wait_js(browser, keys) == ["opt.lr"]
        browser.get(f"{server.url}/?cols=opt.lr&sort=config:opt.lr")
        wait_js(browser, "document.body.dataset.runs === '1'")
        cells = browser.find_elements("css selector", "table.runs td.config")
        assert [c.text for c in cells] == ["0.1"]
        # the compare page's config table, read with the token
        open_page(browser, f"{server.url}/compare?runs={ids['mine']}")
        config = browser.find_element("id", "config-table").get_attribute("textContent")
        assert "opt.lr0.1" in config, config  # one run: its keys folded (none differs)
        # another project's list, or none: said so, not a token prompt again and again
        for project in ("theirs", "nonexistent"):
            browser.get(f"{server.url}/projects/{project}")
            wait_js(browser, "document.getElementById('runs-locked').dataset.refused === '404'")
            notice = browser.find_element("id", "runs-locked").text
            assert notice == "No such project, or not one this token may see (HTTP 404)."
            assert "theirs-run" not in browser.page_source
    finally:
        browser.execute_script("window.localStorage.clear()")
        console_errors(browser)  # the 401 and 404 loads above, not for later tests
        server.stop()


def test_alerts_page_acknowledges_an_alert_and_the_runs_list_stops_counting_it(
    browser: Any, tmp_path: Path, artifacts: Path
) -> None:
    """A finished run's open alert stayed red in the runs list for good: the alerts page's
    button acknowledges it (``PATCH /alerts/{id}``), the row says who, the runs list and the
    overview count 0; the button then takes it back."""
    data_dir = tmp_path / "acked"
    run_id, alert_id = seed_open_alert(data_dir)
    server = ServerProcess(data_dir).start()
    button = f"document.querySelector(\"button.ack[data-alert='{alert_id}']\")"
    try:
        rows = "document.querySelectorAll('table.runs tbody tr').length"
        link = f"tr[data-run='{run_id}'] a.alerts"
        browser.get(f"{server.url}/projects/acked")
        assert wait_js(browser, rows) == 1
        assert browser.find_element("css selector", link).text == "1"
        open_page(browser, f"{server.url}/runs/{run_id}/alerts")
        assert wait_js(browser, button + ".textContent") == "acknowledge"
        renders = int(wait_js(browser, "document.body.dataset.renders"))
        browser.execute_script(button + ".click()")
        wait_js(browser, f"Number(document.body.dataset.renders) > {renders} || null")
        assert wait_js(browser, button + ".textContent") == "unacknowledge"
        assert "anonymous" in browser.find_element("id", "table-alerts").text
        screenshot(browser, artifacts, "alerts-acknowledged")
        alert = httpx.get(f"{server.url}/api/v1/runs/{run_id}/alerts").json()[0]
        assert (alert["status"], alert["acknowledged_by"]) == ("open", "anonymous")
        browser.get(f"{server.url}/projects/acked")
        assert wait_js(browser, rows) == 1
        assert not browser.find_elements("css selector", link)  # 0: nothing needs attention
        open_page(browser, f"{server.url}/runs/{run_id}/alerts")
        browser.execute_script(button + ".click()")
        wait_js(browser, button + ".textContent === 'acknowledge' || null")
        alert = httpx.get(f"{server.url}/api/v1/runs/{run_id}/alerts").json()[0]
        assert alert["acknowledged_at"] is None
        assert console_errors(browser) == []
    finally:
        server.stop()


def test_pages_of_a_run_gone_nan_say_where_and_why_its_data_stops(
    browser: Any, tmp_path: Path, artifacts: Path
) -> None:
    """Weights NaN from step 70 of 120: the heatmap and the drill-down ended at step 60 without
    a word; now each shows a note and a line at the first non-finite step, and the overview's
    summary names it."""
    data_dir = tmp_path / "nan"
    run_id = seed_nonfinite(data_dir)
    server = ServerProcess(data_dir).start()
    # a page's note (said once, above the panels), or a panel's (the heatmap, compare)
    note = "document.querySelector('.page-note:not([hidden]), #panels .note:not([hidden])')"
    try:
        open_page(browser, f"{server.url}/runs/{run_id}/layers")
        text = wait_js(browser, note + ".textContent")
        assert f"weights non-finite (NaN/Inf) from step {NAN_FROM}" in text
        assert browser.find_element("css selector", "#panels .note").is_displayed()
        heat = panels(browser)["heatmap"]
        assert {"type": "line", "x0": NAN_FROM, "x1": NAN_FROM} in heat["shapes"]
        screenshot(browser, artifacts, "nan-heatmap")
        open_page(browser, f"{server.url}/runs/{run_id}/layers/{LAYERS[0]}")
        assert f"from step {NAN_FROM} in {LAYERS[0]}" in wait_js(browser, note + ".textContent")
        open_page(browser, f"{server.url}/runs/{run_id}")
        summary = browser.find_element("id", "summary").text
        assert f"non-finite (NaN/Inf) from step {NAN_ACTIVATIONS_FROM}" in summary  # the first
        # the compare page marks it too (it drew the line ending at step 60, unexplained)
        open_page(browser, f"{server.url}/compare?runs={run_id}&names=htsr.alpha&layer={LAYERS[0]}")
        compare = panels(browser)["compare-htsr.alpha"]
        assert {"type": "line", "x0": NAN_FROM, "x1": NAN_FROM} in compare["shapes"]
        assert f"#{run_id}: non-finite from step {NAN_FROM}" in annotations(browser, compare)
        text = wait_js(browser, note + ".textContent")
        assert f"weights non-finite (NaN/Inf) from step {NAN_FROM} in {LAYERS[0]}" in text
        # the activations page: the module's lines stopped at step 30 without a word
        open_page(browser, f"{server.url}/runs/{run_id}/activations")
        text = wait_js(browser, note + ".textContent")
        assert (
            f"activations non-finite (NaN/Inf) from step {NAN_ACTIVATIONS_FROM} in {MODULES[1]}"
            in text
        )
        shown = "document.querySelectorAll('.page-note:not([hidden]), #panels .note:not([hidden])')"
        assert browser.execute_script(f"return {shown}.length") == 1  # once, not per figure
        entropy = panels(browser)["eigentrack-eigentrack.entropy"]
        assert {"type": "line", "x0": NAN_ACTIVATIONS_FROM, "x1": NAN_ACTIVATIONS_FROM} in entropy[
            "shapes"
        ]
        assert console_errors(browser) == []
    finally:
        server.stop()


def annotations(driver: Any, panel: dict[str, Any]) -> list[str]:
    """The texts written on a panel's plot (marker labels)."""
    return list(
        driver.execute_script(
            "var gd = document.getElementById(SW.domId(arguments[0])).querySelector('.plot');"
            "return (gd.layout.annotations || []).map(function (a) { return a.text; });",
            panel["id"],
        )
    )


def test_scalars_non_finite_from_the_first_step_and_on_the_compare_page_are_marked(
    browser: Any, seeded: Any, tmp_path: Path
) -> None:
    """A loss NaN from its first logged step drew nothing at all (no finite value, so no line
    whose end a point could mark): the overview marks it with a red line at that step and a
    note. The compare page marked no onset: it marks both runs', a red point where one's line
    ends and a red line for the other, and says so."""
    import spectrawatch
    from tests.training import client_settings

    server, _ = seeded
    ids = {}
    for name, nan_from in (("nan-at-20", 20), ("nan-from-0", 0)):
        mon = spectrawatch.Monitor()
        mon.init(**client_settings(tmp_path / name, server.url, name, project="nanstart"))
        for step in range(30):
            loss = 1.0 / (step + 1) if step < nan_from else float("nan")
            mon.log({"loss": loss, "val_acc": step / 30}, step=step)
        assert mon.finish(timeout=60)
        ids[name] = mon.run_id
    late, early = ids["nan-at-20"], ids["nan-from-0"]

    open_page(browser, f"{server.url}/runs/{early}")
    loss = panels(browser)["loss"]
    assert loss["state"] == "plot", loss  # was the empty state: "No loss logged yet"
    assert {"type": "line", "x0": 0, "x1": 0} in loss["shapes"]
    assert "loss: nan from step 0" in annotations(browser, loss)
    note = browser.find_element("css selector", "#panel-loss .note")
    assert note.is_displayed()
    assert "loss was nan from its first logged step, 0" in note.text, note.text
    assert "no line to draw" in note.text
    # over the run's steps (an x-axis of -1..6 around the line, a log axis of nothing, before)
    axis = browser.execute_script(
        "var gd = document.querySelector('#panel-loss .plot');"
        "return [gd.layout.xaxis.range, gd.layout.yaxis.type];"
    )
    assert axis[0][0] < 0 < 29 < axis[0][1], axis
    assert axis[1] == "linear", axis

    open_page(browser, f"{server.url}/compare?runs={late},{early}&names=loss")
    compare = panels(browser)["compare-loss"]
    names = {t["name"] for t in compare["traces"]}
    assert f"#{late} nan-at-20: nan from step 20" in names, names
    assert {"type": "line", "x0": 0, "x1": 0} in compare["shapes"]
    assert f"#{early} loss: nan from step 0" in annotations(browser, compare)
    text = browser.find_element("css selector", "#panel-compare-loss .note").text
    assert f"#{late} nan-at-20: loss became nan at step 20" in text, text
    assert f"#{early} nan-from-0: loss was nan from its first logged step, 0" in text, text
    assert console_errors(browser) == []


LOCAL_TIME = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d GMT\+5:30$"


def test_times_are_local_with_the_zone_and_the_header_says_when_the_run_started(
    browser: Any, seeded: Any
) -> None:
    """The deliveries table printed ISO UTC with microseconds, the live badge local time
    without a zone, and no page said when a run started: every time is now the browser's
    local time in one format with its zone (UTC in the tooltip), the run header included."""
    import re

    server, runs = seeded
    browser.execute_cdp_cmd("Emulation.setTimezoneOverride", {"timezoneId": "Asia/Kolkata"})
    try:
        open_page(browser, f"{server.url}/runs/{runs.run_id}/alerts")
        run = httpx.get(f"{server.url}/api/v1/runs/{runs.run_id}").json()
        started = browser.find_element("id", "run-started")
        assert re.match(LOCAL_TIME, started.text), started.text
        assert started.get_attribute("title").endswith("(UTC)")
        assert started.get_attribute("datetime")[:19] == run["created_at"][:19]
        assert re.match(LOCAL_TIME, browser.find_element("id", "run-seen").text)
        cells = browser.find_elements("css selector", "#table-deliveries td time")
        assert cells, "no time cells in the deliveries table"
        for cell in cells:
            assert re.match(LOCAL_TIME, cell.text), cell.text
            assert "UTC" in cell.get_attribute("title")
        help_text = browser.find_element("css selector", "#table-deliveries .help").text
        assert "local time" in help_text
        badge = browser.find_element("id", "live").text
        assert re.search(r"\d\d:\d\d:\d\d GMT\+5:30$", badge), badge
        # the runs list's relative ages carry the same local time as their tooltip
        browser.get(server.url + "/")
        age = f"tr[data-run='{runs.run_id}'] td.age time"
        title = wait_js(browser, f'document.querySelector("{age}").title')
        assert re.match(LOCAL_TIME, title), title
        assert console_errors(browser) == []
    finally:
        browser.execute_cdp_cmd("Emulation.setTimezoneOverride", {"timezoneId": ""})


RULES_JS = """
return Array.from(document.querySelectorAll('table.rules tbody tr')).map(function (tr) {
  var problem = tr.querySelector('.rule-problem');
  return {name: tr.dataset.rule, enabled: tr.querySelector('.rule-toggle').checked,
          origin: tr.querySelector('td.origin').textContent,
          open: Number(tr.querySelector('td.open-alerts').textContent),
          condition: tr.querySelector('td.condition').firstChild.textContent,
          layers: tr.querySelector('td.layers').textContent,
          problem: problem ? problem.textContent : null};
});
"""


def rule_rows(driver: Any) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in driver.execute_script(RULES_JS)}


def rerendered(driver: Any, before: int) -> None:
    """Wait for the rules table drawn again after a write (``data-renders`` past ``before``)."""
    wait_js(driver, f"Number(document.body.dataset.renders) > {before}")


def renders(driver: Any) -> int:
    return int(driver.execute_script("return Number(document.body.dataset.renders)"))


def check_rules_page(
    browser: Any, server: ServerProcess, run_id: int, token: str | None, artifacts: Path
) -> None:
    """The rules page of ``seed_rules``' project, reached from the runs list: every rule with
    its state and open alerts; switch one off, a 422 shown in the editor, a customized default
    reset. Each write checked through the API."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    api = httpx.Client(base_url=f"{server.url}/api/v1", headers=headers, timeout=30)

    def stored(rule: str) -> dict[str, Any]:
        listed = api.get(f"/projects/{RULES_PROJECT}/alert-rules")
        assert listed.status_code == 200, listed.text
        (row,) = [r for r in listed.json() if r["name"] == rule]
        return dict(row)

    with api:
        browser.get(f"{server.url}/projects/{RULES_PROJECT}")
        console_errors(browser)  # a page of an earlier test's server, stopped under it
        browser.find_element("id", "rules-link").click()
        if token is not None:  # a fresh browser: the page asks for the token
            wait_js(browser, "document.body.dataset.ready === 'error'")
            browser.find_element("id", "token-input").send_keys(token)
            browser.find_element("css selector", "#banner button").click()
        wait_js(browser, "document.body.dataset.ready === '1'")
        assert browser.current_url.endswith(f"/projects/{RULES_PROJECT}/alert-rules")
        rows = rule_rows(browser)
        assert rows["alpha_out_of_range"] == {
            "name": "alpha_out_of_range",
            "enabled": True,
            "origin": "default",
            "open": 2,  # the resolved one is not counted
            "condition": "htsr.alpha < 2 or > 6 (hysteresis 0.1)",
            "layers": "*",
            "problem": None,
        }
        assert rows["spectral_norm_blowup"]["origin"] == "customized"
        assert rows["spectral_norm_blowup"]["condition"].startswith("norm.spectral ≥ 20 times")
        assert rows["old_custom"]["origin"] == "custom"
        assert not rows["old_custom"]["enabled"]
        assert "renamed_param: unknown rule parameter" in rows["old_custom"]["problem"]
        screenshot(browser, artifacts, "rules" + ("-auth" if token else ""))

        # switch alpha_out_of_range off: the API says so, and its open alerts are resolved
        before = renders(browser)
        browser.find_element(
            "css selector", "tr[data-rule='alpha_out_of_range'] .rule-toggle"
        ).click()
        rerendered(browser, before)
        assert stored("alpha_out_of_range")["enabled"] is False
        row = rule_rows(browser)["alpha_out_of_range"]
        assert (row["enabled"], row["open"]) == (False, 0), row

        # the rule whose stored params no longer validate cannot be switched on: the API's
        # message in the banner, and the checkbox back off (the table read again)
        before = renders(browser)
        browser.find_element("css selector", "tr[data-rule='old_custom'] .rule-toggle").click()
        rerendered(browser, before)
        banner = browser.find_element("id", "banner").text
        assert "Could not change rule old_custom: 422: params.renamed_param" in banner, banner
        assert rule_rows(browser)["old_custom"]["enabled"] is False
        assert stored("old_custom")["enabled"] is False

        # a bad parameter: the API's 422 message in the editor, nothing stored
        browser.find_element(
            "css selector", "tr[data-rule='spectral_norm_blowup'] .rule-edit-button"
        ).click()
        area = browser.find_element("css selector", "tr[data-rule='spectral_norm_blowup'] textarea")
        area.clear()
        area.send_keys('{"factor": "big"}')
        browser.find_element(
            "css selector", "tr[data-rule='spectral_norm_blowup'] .rule-save"
        ).click()
        error = wait_js(
            browser,
            "(function () { var e = document.querySelector("
            "\"tr[data-rule='spectral_norm_blowup'] .rule-error\");"
            " return e && !e.hidden && e.textContent; })()",
        )
        assert error == "422: params.factor: must be a finite number, got 'big'", error
        assert stored("spectral_norm_blowup")["params"]["factor"] == 20.0
        # a good one
        area.clear()
        area.send_keys('{"factor": 15}')
        before = renders(browser)
        browser.find_element(
            "css selector", "tr[data-rule='spectral_norm_blowup'] .rule-save"
        ).click()
        rerendered(browser, before)
        assert stored("spectral_norm_blowup")["params"]["factor"] == 15

        # reset the customized default (the confirm dialog answered yes)
        browser.execute_script("window.confirm = function () { return true; };")
        before = renders(browser)
        browser.find_element(
            "css selector", "tr[data-rule='spectral_norm_blowup'] .rule-reset"
        ).click()
        rerendered(browser, before)
        reset = stored("spectral_norm_blowup")
        assert (reset["customized"], reset["params"]["factor"]) == (False, 10.0), reset
        assert rule_rows(browser)["spectral_norm_blowup"]["origin"] == "default"
        assert not browser.find_elements(
            "css selector", "tr[data-rule='spectral_norm_blowup'] .rule-reset"
        )

        # the run's alerts page links to the rules
        open_page(browser, f"{server.url}/runs/{run_id}/alerts")
        link = browser.find_element("id", "rules-link")
        assert link.get_attribute("href") == f"{server.url}/projects/{RULES_PROJECT}/alert-rules"
        # the browser logs the 422 answer as a failed load: nothing else
        errors = [e for e in console_errors(browser) if "422 (Unprocessable Entity)" not in e]
        if token is not None:
            errors = [e for e in errors if "401 (Unauthorized)" not in e]
        assert errors == []


def test_alert_rules_page_lists_switches_and_resets_rules(
    browser: Any, tmp_path: Path, artifacts: Path
) -> None:
    """An anonymous loopback server: the page's writes are same-origin and go through; the
    same write from another site's page (its ``Origin``) is refused and changes nothing."""
    data_dir = tmp_path / "rules"
    run_id = seed_rules(data_dir)
    server = ServerProcess(data_dir).start()
    try:
        check_rules_page(browser, server, run_id, None, artifacts)
        refused = httpx.patch(
            f"{server.url}/api/v1/projects/{RULES_PROJECT}/alert-rules/nonfinite",
            json={"enabled": False},
            headers={"Origin": "http://evil.example"},
            timeout=30,
        )
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "cross_origin"
        rules = httpx.get(
            f"{server.url}/api/v1/projects/{RULES_PROJECT}/alert-rules", timeout=30
        ).json()
        assert [r["enabled"] for r in rules if r["name"] == "nonfinite"] == [True]
    finally:
        server.stop()


def test_alert_rules_page_of_a_server_requiring_auth_writes_with_the_token(
    browser: Any, tmp_path: Path, artifacts: Path
) -> None:
    """With auth on the page asks for the token, then reads and writes with it; a token of
    another project finds no such project; a ``read`` token sees every page and a refused
    change shows the API's 403 message."""
    data_dir = tmp_path / "rules-auth"
    run_id = seed_rules(data_dir)
    token = create_token(data_dir, RULES_PROJECT)
    other = create_token(data_dir, "elsewhere")
    server = ServerProcess(data_dir, args=["--require-auth"]).start()
    try:
        # the server's origin, whose storage holds the token: the browser may still be on its
        # first page (data:, when this test runs alone), which has no localStorage at all
        browser.get(f"{server.url}/health")
        browser.execute_script("window.localStorage.clear()")
        check_rules_page(browser, server, run_id, token, artifacts)
        browser.execute_script(f"window.localStorage.setItem('spectrawatch.token', '{other}')")
        browser.get(f"{server.url}/projects/{RULES_PROJECT}/alert-rules")
        wait_js(browser, "document.body.dataset.ready === 'error'")
        banner = browser.find_element("id", "banner").text
        assert f"404: project '{RULES_PROJECT}' does not exist" in banner, banner
        # a read token views every page; a rule change it may not make shows the API's 403
        reader = create_token(data_dir, RULES_PROJECT, role="read")
        browser.execute_script(f"window.localStorage.setItem('spectrawatch.token', '{reader}')")
        for page in ("", f"projects/{RULES_PROJECT}"):  # runs lists, filled with the token
            browser.get(f"{server.url}/{page}")
            wait_js(browser, "document.body.dataset.runs === '1'")
            assert not browser.find_element("id", "runs-locked").is_displayed()
        for page in (f"runs/{run_id}", f"runs/{run_id}/layers", f"runs/{run_id}/alerts"):
            open_page(browser, f"{server.url}/{page}")
        open_page(browser, f"{server.url}/projects/{RULES_PROJECT}/alert-rules")
        enabled = rule_rows(browser)["alpha_out_of_range"]["enabled"]
        browser.find_element(
            "css selector", "tr[data-rule='alpha_out_of_range'] .rule-toggle"
        ).click()
        banner = wait_js(
            browser,
            "(function () { var b = document.getElementById('banner');"
            " return !b.hidden && b.textContent.indexOf('403') >= 0 && b.textContent; })()",
        )
        needed = "Could not change rule alpha_out_of_range: 403: this needs a token with role"
        assert f"{needed} 'admin' or above; this token's role is 'read'" in banner, banner
        wait_js(  # the page shows the server's state again
            browser,
            "document.querySelector(\"tr[data-rule='alpha_out_of_range'] .rule-toggle\")"
            f".checked === {'true' if enabled else 'false'}",
        )
        rules = httpx.get(
            f"{server.url}/api/v1/projects/{RULES_PROJECT}/alert-rules",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        ).json()
        assert [r["enabled"] for r in rules if r["name"] == "alpha_out_of_range"] == [enabled]
    finally:
        server.stop()  # first: a failing clear below must not leave it running
        browser.execute_script("try { window.localStorage.clear(); } catch (e) {}")
        console_errors(browser)  # the 401, 403 and 404 loads above, not for later tests
        browser.get("about:blank")  # the rules page polls: none left polling a stopped server


def test_alert_rules_page_refreshes_without_overwriting_an_edit(
    browser: Any, tmp_path: Path
) -> None:
    """The rules page polls its rules (0.3 s here, ``window.SW_POLL_MS.rules``) as the run
    pages poll their run: a rule switched off elsewhere shows without a reload, an opened
    parameters box stays open; while a rule's editor is open nothing is drawn over it, and the
    change shows once the editor is closed."""
    data_dir = tmp_path / "rules-poll"
    seed_rules(data_dir)
    server = ServerProcess(data_dir).start()
    script = browser.execute_cdp_cmd(
        "Page.addScriptToEvaluateOnNewDocument", {"source": "window.SW_POLL_MS = {rules: 300};"}
    )
    rule_url = f"{server.url}/api/v1/projects/{RULES_PROJECT}/alert-rules/nonfinite"

    def nonfinite_shown(enabled: bool) -> None:
        wait_js(
            browser,
            "(function () { var t = document.querySelector("
            "\"tr[data-rule='nonfinite'] .rule-toggle\");"
            f" return t && t.checked === {str(enabled).lower()}; }})()",
            timeout=15,
        )

    try:
        browser.get(f"{server.url}/projects/{RULES_PROJECT}/alert-rules")
        console_errors(browser)  # an earlier test's page polling its server, stopped under it
        wait_js(browser, "document.body.dataset.ready === '1'")
        assert rule_rows(browser)["nonfinite"]["enabled"] is True
        browser.find_element(
            "css selector", "tr[data-rule='alpha_out_of_range'] details summary"
        ).click()
        assert httpx.patch(rule_url, json={"enabled": False}, timeout=30).status_code == 200
        nonfinite_shown(False)  # no reload
        assert browser.execute_script(
            "return document.querySelector(\"tr[data-rule='alpha_out_of_range'] details\").open"
        )
        drawn = renders(browser)
        polls = browser.execute_script("return window.SW.polls")
        wait_js(browser, f"window.SW.polls >= {polls + 3}", timeout=15)
        assert renders(browser) == drawn  # nothing changed: nothing drawn again

        # an edit in progress: the table is not drawn over the user's typing
        browser.find_element(
            "css selector", "tr[data-rule='spectral_norm_blowup'] .rule-edit-button"
        ).click()
        area = browser.find_element("css selector", "tr[data-rule='spectral_norm_blowup'] textarea")
        area.clear()
        area.send_keys('{"factor": 1')
        assert httpx.patch(rule_url, json={"enabled": True}, timeout=30).status_code == 200
        polls = browser.execute_script("return window.SW.polls")
        time.sleep(1.5)
        assert area.get_attribute("value") == '{"factor": 1'
        assert rule_rows(browser)["nonfinite"]["enabled"] is False  # not drawn yet
        area.send_keys("2}")
        assert area.get_attribute("value") == '{"factor": 12}'
        browser.find_element(
            "css selector", "tr[data-rule='spectral_norm_blowup'] form button:not(.rule-save)"
        ).click()  # cancel: the next poll draws the change
        nonfinite_shown(True)
        assert browser.execute_script("return window.SW.polls") > polls
        assert console_errors(browser) == []
    finally:
        browser.execute_cdp_cmd(
            "Page.removeScriptToEvaluateOnNewDocument", {"identifier": script["identifier"]}
        )
        browser.get("about:blank")  # no page left polling the server stopped next
        console_errors(browser)
        server.stop()


ODD_PROJECT = "team a b#1?x=%2F&é"
ODD_RUN = "run #2 ?q=%20 ü"


def test_names_with_url_characters_link_and_load_end_to_end(browser: Any, seeded: Any) -> None:
    """A project and a run named with ``#``, ``?``, ``%``, ``&``, spaces and non-ASCII
    (``/`` is refused at creation: names are URL segments) are reached from the runs list:
    the project's page filters to it, its rules page loads its rules, the run's pages name it,
    and the compare page offers it."""
    server, _ = seeded
    with httpx.Client(base_url=f"{server.url}/api/v1") as api:
        run_id = make_run(api, project=ODD_PROJECT, name=ODD_RUN)
        refused = api.post("/runs", json={"project": "team/a", "name": "r"})
        assert refused.status_code == 422, refused.text
    browser.get(server.url + "/")
    console_errors(browser)  # an earlier test's page polling its server, stopped under it
    wait_js(browser, "document.querySelectorAll('table.runs tbody tr').length")
    browser.find_element("css selector", f"tr[data-run='{run_id}'] td:nth-child(4) a").click()
    wait_js(browser, "document.querySelectorAll('table.runs tbody tr').length === 1")
    assert browser.find_element("css selector", "h1").text == f"Project {ODD_PROJECT}"
    assert browser.find_element("css selector", "table.runs tbody a").text == ODD_RUN
    browser.find_element("id", "rules-link").click()
    wait_js(browser, "document.body.dataset.ready === '1'")
    assert browser.find_element("id", "rules-project").text == ODD_PROJECT
    assert len(rule_rows(browser)) > 3
    # the filters form submits to the project's own page, the name intact
    browser.get(server.url + "/")
    wait_js(browser, "document.querySelectorAll('table.runs tbody tr').length")
    browser.find_element("css selector", f"tr[data-run='{run_id}'] td:nth-child(4) a").click()
    wait_js(browser, "document.querySelectorAll('table.runs tbody tr').length === 1")
    # the page before the submit already shows one row: mark it, and wait for the next page
    browser.execute_script("document.body.dataset.beforeSubmit = '1'")
    browser.find_element("css selector", "#filters button[type=submit]").click()
    wait_js(
        browser,
        "document.body && !document.body.dataset.beforeSubmit"
        " && document.readyState === 'complete'"
        " && document.querySelectorAll('table.runs tbody tr').length === 1",
    )
    assert browser.find_element("css selector", "h1").text == f"Project {ODD_PROJECT}"
    open_page(browser, f"{server.url}/runs/{run_id}/alerts")
    assert ODD_RUN in browser.find_element("id", "run-title").text
    assert ODD_RUN in browser.title
    browser.find_element("id", "rules-link").click()
    wait_js(browser, "document.body.dataset.ready === '1'")
    assert browser.find_element("id", "rules-project").text == ODD_PROJECT
    assert console_errors(browser) == []


def test_rules_page_of_a_project_named_dot_loads_its_rules(browser: Any, seeded: Any) -> None:
    """The page fetched ``/api/v1/dashboards/projects/./alert-rules``, which the browser
    resolves to ``/projects/alert-rules``: it asks with ``?project=`` now."""
    server, _ = seeded
    engine = create_engine(f"sqlite:///{server.data_dir / 'spectrawatch.db'}")
    with engine.begin() as conn:  # stored before such names were refused
        conn.execute(
            text("INSERT INTO project (name, created_at) VALUES ('.', '2025-01-01 00:00:00')")
        )
    engine.dispose()
    browser.get(f"{server.url}/alert-rules?project=.")
    ready = wait_js(browser, "document.body.dataset.ready")
    assert ready == "1", browser.execute_script("return SW.errors")
    assert browser.find_element("id", "rules-project").text == "."
    assert len(rule_rows(browser)) > 3
    assert console_errors(browser) == []


def test_api_docs_pages_render_from_the_servers_own_files(browser: Any, seeded: Any) -> None:
    """``/docs`` (Swagger UI) and ``/redoc`` render the API's operations with no script from
    another origin (this machine has no internet: FastAPI's CDN defaults left them blank);
    their content security policy refuses ReDoc's footer logo from ``cdn.redoc.ly``."""
    proc, _ = seeded
    resources = "performance.getEntriesByType('resource').map(function (e) { return e.name; })"
    console_errors(browser)  # clear earlier pages' entries
    browser.get(f"{proc.url}/docs")
    assert wait_js(browser, "document.querySelectorAll('.opblock').length") > 20
    assert all(u.startswith(proc.url) for u in browser.execute_script("return " + resources))
    assert console_errors(browser) == []
    browser.get(f"{proc.url}/redoc")
    wait_js(browser, "document.querySelector('[data-section-id^=\"operation/\"]')")
    scripts = browser.execute_script(
        "return Array.from(document.scripts).map(function (s) { return s.src; })"
    )
    assert all(s == "" or s.startswith(proc.url) for s in scripts), scripts
    errors = console_errors(browser)
    assert all("cdn.redoc.ly" in e and "Content Security Policy" in e for e in errors), errors


def test_overview_step_charts_zoom_together_and_buttons_say_csv_and_log(
    browser: Any, seeded: Any
) -> None:
    """Each chart had its own step range and zoomed alone; the CSV and log buttons were a grey
    square and a signal icon. The step charts share one range, a zoom on one sets the others',
    a double-click puts them all back; the buttons read "CSV" and "log"."""
    server, runs = seeded
    open_page(browser, f"{server.url}/runs/{runs.run_id}")
    ranges_js = (
        "return Array.from(document.querySelectorAll('#panels .plot[data-shared-x=\"1\"]'))"
        ".filter(function (gd) { return gd._fullLayout; })"
        ".map(function (gd) { return gd._fullLayout.xaxis.range.map(Math.round); });"
    )
    start = browser.execute_script(ranges_js)
    assert len(start) >= 2
    assert all(r == start[0] for r in start), start
    browser.execute_script(
        "var gd = document.querySelector('#panels .plot[data-shared-x=\"1\"]');"
        "Plotly.relayout(gd, {'xaxis.range': [2, 5]});"
    )
    shared = "Array.from(document.querySelectorAll('#panels .plot[data-shared-x=\"1\"]'))"
    wait_js(  # the others follow the zoomed one
        browser,
        shared + ".every(function (gd) { return gd._fullLayout.xaxis.range.join() === '2,5'; })",
    )
    browser.execute_script(
        "var gd = document.querySelectorAll('#panels .plot[data-shared-x=\"1\"]')[1];"
        "Plotly.relayout(gd, {'xaxis.autorange': true});"
    )
    want = ",".join(map(str, start[0]))
    wait_js(  # a reset on any puts them all back on the page's range
        browser,
        shared + ".every(function (gd) { return gd._fullLayout.xaxis.range.map(Math.round)"
        f".join() === '{want}'; }})",
    )
    # after a refresh (a live run's, every few seconds) the same zoom links again: the range
    # last synced was remembered and a zoom to it was taken for an echo
    zoom = (
        "var gd = document.querySelector('#panels .plot[data-shared-x=\"1\"]');"
        "Plotly.relayout(gd, {'xaxis.range': [2, 5]});"
    )
    browser.execute_script(zoom)
    every_zoomed = (
        shared + ".every(function (gd) { return gd._fullLayout.xaxis.range.join() === '2,5'; })"
    )
    wait_js(browser, every_zoomed)
    browser.execute_script("SW.reload();")
    wait_js(
        browser,
        shared + ".every(function (gd) { return gd._fullLayout.xaxis.range.map(Math.round)"
        f".join() === '{want}'; }})",
    )
    browser.execute_script(zoom)
    wait_js(browser, every_zoomed)
    words = browser.execute_script(
        "return Array.from(document.querySelectorAll('#panels .sw-modebar-text'))"
        ".map(function (s) { return s.textContent; });"
    )
    assert {"CSV", "log"} <= set(words), words
    assert console_errors(browser) == []
