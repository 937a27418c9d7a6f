"""Time to interactive of the run overview and the layer heatmap for a large run, in Chromium.

A run of ``--layers`` x ``--steps`` per-layer metric points (``htsr.alpha``, 1M rows by
default) plus model-level SED series (3 windows x gap/edge/phase), the early-warning series and
two scalars, all at every step, is written into a fresh SQLite database; a real
``spectrawatch server`` subprocess serves it; headless Chromium loads each page ``--repeats``
times. "Interactive" is ``SW.interactiveMs``: ``performance.now()`` (ms since navigation start)
when the ``Plotly.react`` of every panel in the viewport has resolved, i.e. the plots a reader
sees drawn and their click/hover handlers bound (the plots below the fold follow, one per task;
``SW.allDrawnMs``, when every plot is drawn, is reported too). The figure-API response time
(server side, via httpx) is reported alongside.

    .venv/bin/python benchmarks/dashboard_load.py --layers 100 --steps 10000 --repeats 5
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spectrawatch_server.storage import result_store  # noqa: E402
from tests.dashboard_seed import done_frame, migrated, new_run  # noqa: E402
from tests.e2e.test_dashboards_browser import CHROMIUM_FLAGS, find_chromium  # noqa: E402
from tests.servers import ServerProcess  # noqa: E402

ACTIVATION_METRICS = ("eigentrack.entropy", "eigentrack.effective_rank")


def seed_big(data_dir: Path, layers: int, steps: int, activations: bool = False) -> int:
    """Write the benchmark run; returns its id. Bulk inserts through the DB-API (fast), in step
    order like the worker (each weights frame stores every layer at one step). With
    ``activations``, every layer also has the :data:`ACTIVATION_METRICS` at every step (the
    activations page: one figure per descriptor, one line per layer)."""
    engine, sessions = migrated(data_dir)
    with sessions.begin() as s:
        run_id = new_run(s, "bench", f"big-{layers}x{steps}")
        frame_id = done_frame(s, run_id, steps - 1, 0).id
        result_store.upsert_scalars(
            s,
            run_id,
            [(t, "loss", 2.0 * math.exp(-t / (steps / 5)) + 0.01) for t in range(steps)]
            + [
                (t, "val_acc", 1 / (1 + math.exp(-(t - 0.7 * steps) / (steps / 100))))
                for t in range(steps)
            ],
        )
    sql = (
        "INSERT INTO metric (run_id, frame_id, analysis, layer, name, step, value)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)"
    )
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        names = [f"blocks.{i // 4}.{('q', 'k', 'v', 'mlp')[i % 4]}" for i in range(layers)]
        for t in range(steps):  # step-major, as the worker writes: one frame = all layers
            cur.executemany(
                sql,
                [
                    (
                        run_id,
                        frame_id,
                        "htsr",
                        layer,
                        "htsr.alpha",
                        t,
                        2 + 3 * math.exp(-t / steps) + 0.01 * i,
                    )
                    for i, layer in enumerate(names)
                ],
            )
            if activations:  # a spike every 997 steps: extremes a plot must keep
                cur.executemany(
                    sql,
                    [
                        (run_id, frame_id, "activations", layer, m, t, v)
                        for i, layer in enumerate(names)
                        for j, m in enumerate(ACTIVATION_METRICS)
                        for v in [(1 + j) * (3 + math.sin(t / 50 + i) + (5 if t % 997 == i else 0))]
                    ],
                )
        model = []
        for t in range(steps):
            phase = 1.0 if t < steps * 0.3 else (2.0 if t < steps * 0.6 else 3.0)
            for w in (16, 32, 64):
                gap = 1 + 4 * min(1.0, t / (0.3 * steps)) * (1 if t < 0.6 * steps else 0.3)
                model += [
                    ("sed", f"sed.gap_ratio.w{w}", t, gap),
                    ("sed", f"sed.edge.w{w}", t, 2.0),
                    ("sed", f"sed.phase.w{w}", t, phase),
                ]
            model += [
                ("sed", "grok.warning_score", t, min(1.0, t / (0.5 * steps))),
                ("sed", "grok.imminent", t, 1.0 if t >= 0.5 * steps else 0.0),
            ]
        cur.executemany(sql, [(run_id, frame_id, a, "__model__", n, t, v) for a, n, t, v in model])
        raw.commit()
    finally:
        raw.close()
    with sessions.begin() as s:  # the rows went in around the repository: count the series
        result_store.rebuild_metric_series(s, run_id)
    engine.dispose()
    return run_id


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=100)
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--activations",
        action="store_true",
        help=f"also seed {', '.join(ACTIVATION_METRICS)} per layer and time the activations page",
    )
    ap.add_argument(
        "--data-dir", type=Path, default=None, help="reuse/keep the seeded database here"
    )
    args = ap.parse_args()
    found = find_chromium()
    if found is None:
        print("chromium/chromedriver not found: run .ci/install_chromium.sh", file=sys.stderr)
        return 2
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="sw-dash-bench-"))
    db = data_dir / "spectrawatch.db"
    t0 = time.perf_counter()
    run_id = 1 if db.exists() else seed_big(data_dir, args.layers, args.steps, args.activations)
    print(f"seeded in {time.perf_counter() - t0:.1f} s: {data_dir}")
    server = ServerProcess(data_dir).start()
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=found[1]))
    results: dict[str, dict[str, list[float]]] = {}
    try:
        pages = {
            "overview": (
                f"/runs/{run_id}",
                f"/api/v1/dashboards/runs/{run_id}/overview?max_points=1400",
            ),
            "layer heatmap": (
                f"/runs/{run_id}/layers?metric=htsr.alpha",
                f"/api/v1/dashboards/runs/{run_id}/layers?metric=htsr.alpha",
            ),
        }
        if args.activations:
            pages["activations"] = (
                f"/runs/{run_id}/activations",
                f"/api/v1/dashboards/runs/{run_id}/activations",
            )
        with httpx.Client(base_url=server.url, timeout=120) as client:
            for name, (page, api) in pages.items():
                r = results.setdefault(
                    name,
                    {"tti": [], "all": [], "api": [], "kb": [], "fetch_end": [], "scripts": []},
                )
                for i in range(args.repeats + 1):
                    t = time.perf_counter()
                    resp = client.get(api)
                    api_ms = (time.perf_counter() - t) * 1000
                    driver.get(server.url + page)
                    deadline = time.monotonic() + 120
                    while not driver.execute_script("return document.body.dataset.ready"):
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"{name}: page never became ready")
                        time.sleep(0.02)
                    tti = float(driver.execute_script("return SW.interactiveMs"))
                    all_drawn = float(driver.execute_script("return SW.allDrawnMs"))
                    timing = driver.execute_script("return SW.timing")
                    state = driver.execute_script("return document.body.dataset.ready")
                    if state != "1":
                        raise RuntimeError(f"{name}: {driver.execute_script('return SW.errors')}")
                    if i == 0:
                        print(f"{name}: first (cold) load {tti:.0f} ms, api {api_ms:.0f} ms")
                        continue  # warm-up: browser cache, SQLite page cache
                    r["tti"].append(tti)
                    r["all"].append(all_drawn)
                    r["fetch_end"].append(float(timing["fetchEnd"]))
                    r["scripts"].append(float(timing["scriptsDone"] or 0.0))
                    r["api"].append(api_ms)
                    r["kb"].append(len(resp.content) / 1024)
    finally:
        driver.quit()
        server.stop()
    print(f"\n{args.layers} layers x {args.steps} steps, median of {args.repeats} warm loads\n")
    print(
        "| page | time to interactive (ms) | all plots drawn (ms) | scripts parsed (ms)"
        " | figures received (ms) | figure API alone (ms) | payload (KiB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        med = {k: statistics.median(v) for k, v in r.items()}
        print(
            f"| {name} | {med['tti']:.0f} (min {min(r['tti']):.0f}, max {max(r['tti']):.0f})"
            f" | {med['all']:.0f} | {med['scripts']:.0f} | {med['fetch_end']:.0f}"
            f" | {med['api']:.0f} | {med['kb']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
