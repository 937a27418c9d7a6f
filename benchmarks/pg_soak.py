"""Concurrency soak of the PostgreSQL topology: what fails when everything happens at once.

A real API process (webhook sender included) and two worker processes on PostgreSQL
(``tests.servers`` in postgres mode) take, for ``--seconds``: training clients streaming
(tiny MLPs, a NaN loss now and then, so alerts open and webhook deliveries queue), deletions
of runs (one by one, by retention) and of whole projects, blob pruning, run edits, alert-rule
edits, endpoints created, tested and deleted (a local receiver answers 200, 500 or 410 Gone,
which disables an endpoint), and dashboard reads.
Every API answer is counted by route and status; at the end the database is checked for rows a
deletion left behind (frames, results, alerts of deleted runs; endpoints, rules and live runs of
deleted projects) and for alerts open under disabled rules, the PostgreSQL log is searched for
deadlocks and errors, and the server's and workers' logs for tracebacks.

An answer is a finding when it is a 5xx other than a 503 ``database_busy`` (a lock wait past
the API's lock timeout: by design), or when PostgreSQL logged a deadlock. Lock-order bugs
show here first (session 26: a project deletion deadlocked with the worker's results).

    eval "$(bash .ci/postgres.sh)"
    python benchmarks/pg_soak.py --seconds 90 --pg-log /tmp/spectrawatch-pg-54329/server.log

``--embedded`` runs the same load against the default server (SQLite, the worker in the API
process); its 503 ``database_busy`` answers (the SQLite write lock held past the API's lock
timeout) are counted apart, as they cost clients a retry.
"""

from __future__ import annotations

import argparse
import collections
import http.server
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# before tests.servers reads it: --embedded soaks the default server (SQLite, in-process worker)
os.environ["SPECTRAWATCH_TEST_MODE"] = "embedded" if "--embedded" in sys.argv else "postgres"
sys.path[:0] = [str(Path(__file__).resolve().parents[1] / p) for p in ("", "client", "server")]

import httpx  # noqa: E402

import spectrawatch  # noqa: E402
from spectrawatch._transport import error_of  # noqa: E402
from spectrawatch_server.storage.repository import DELETED, DELETED_PROJECT_PREFIX  # noqa: E402
from tests.servers import ServerProcess, db_rows  # noqa: E402
from tests.training import Loop, client_settings  # noqa: E402

PROJECTS = ("soak-a", "soak-b", "soak-c")
RULES = ("nonfinite", "run_silent", "spectral_norm_blowup", "client_drops")
ROUTE_IDS = re.compile(r"/\d+")


class Receiver(http.server.BaseHTTPRequestHandler):
    """``/ok`` answers 200, ``/flaky`` 500, ``/gone`` 410."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        code = {"/ok": 200, "/flaky": 500, "/gone": 410}.get(self.path, 404)
        self.send_response(code)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


class Tally:
    """API answers by (method, route, status, error code); thread-safe."""

    def __init__(self) -> None:
        self.counts: collections.Counter[tuple[str, str, int, str]] = collections.Counter()
        self.examples: dict[tuple[str, str, int, str], str] = {}
        self.lock = threading.Lock()

    def call(self, api: httpx.Client, method: str, path: str, **kw: Any) -> httpx.Response | None:
        try:
            resp = api.request(method, path, **kw)
        except httpx.HTTPError as exc:
            self._add((method, ROUTE_IDS.sub("/N", path), 0, type(exc).__name__), str(exc))
            return None
        code = error_of(resp)[0] if resp.status_code >= 400 else ""
        self._add((method, ROUTE_IDS.sub("/N", path), resp.status_code, code), resp.text[:300])
        return resp

    def _add(self, key: tuple[str, str, int, str], example: str) -> None:
        with self.lock:
            self.counts[key] += 1
            self.examples.setdefault(key, example)


def stream(url: str, root: Path, stop: threading.Event, seed: int) -> int:
    """Training runs one after another until ``stop``; returns the steps trained."""
    rng, steps, i = random.Random(seed), 0, 0
    while not stop.is_set():
        i += 1
        m = spectrawatch.Monitor()
        project = rng.choice(PROJECTS)
        m.init(**client_settings(root / f"c{seed}-{i}", url, f"r{seed}-{i}", project=project))
        loop = Loop(m)
        for _ in range(rng.randint(20, 60)):
            loop.run(1)
            if rng.random() < 0.05:
                m.log({"loss": math.nan}, step=loop.step)
            if stop.is_set():
                break
        m.finish(timeout=10)
        steps += loop.step
    return steps


def churn(url: str, receiver: str, tally: Tally, stop: threading.Event, seed: int) -> None:
    """Deletions, rule edits, endpoints and reads, at random, until ``stop``."""
    rng = random.Random(seed)
    with httpx.Client(base_url=f"{url}/api/v1", timeout=30) as api:

        def a_webhook() -> int | None:
            """The id of an endpoint picked at random, if there is one."""
            hooks = tally.call(api, "GET", "/webhooks")
            if hooks is None or not hooks.is_success or not hooks.json():
                return None
            return int(rng.choice(hooks.json())["id"])

        while not stop.wait(rng.uniform(0.1, 0.6)):
            project = rng.choice(PROJECTS)
            runs = tally.call(api, "GET", "/runs", params={"project": project})
            ids = [r["id"] for r in runs.json()] if runs is not None and runs.is_success else []
            action = rng.random()
            if action < 0.15 and ids:
                tally.call(api, "DELETE", f"/runs/{rng.choice(ids)}")
            elif action < 0.22:
                tally.call(api, "DELETE", f"/projects/{project}")
            elif action < 0.40:
                rule = rng.choice(RULES)
                body = {"enabled": rng.random() < 0.7}
                tally.call(api, "PATCH", f"/projects/{project}/alert-rules/{rule}", json=body)
            elif action < 0.55:
                path = rng.choice(["/ok", "/flaky", "/gone"])
                body = {"project": project, "url": f"{receiver}{path}"}
                tally.call(api, "POST", "/webhooks", json=body)
            elif action < 0.65:
                if (hook := a_webhook()) is not None:
                    tally.call(api, "DELETE", f"/webhooks/{hook}")
            elif action < 0.70:
                body = {"older_than_days": 0, "project": project, "limit": 3}
                tally.call(api, "POST", "/runs/bulk-delete", json=body)
            elif action < 0.75:
                tally.call(api, "POST", "/blobs/prune", json={"older_than_days": 0})
            elif action < 0.80:
                if (hook := a_webhook()) is not None:
                    tally.call(api, "POST", f"/webhooks/{hook}/test")
            elif action < 0.85 and ids:
                body = {"tags": [f"t{rng.randint(0, 9)}"], "summary": {"soak": rng.random()}}
                tally.call(api, "PATCH", f"/runs/{rng.choice(ids)}", json=body)
            elif ids:
                run_id = rng.choice(ids)
                tally.call(api, "GET", f"/runs/{run_id}/metrics/catalog")
                tally.call(api, "GET", f"/runs/{run_id}/alerts")
                tally.call(api, "GET", f"/dashboards/runs/{run_id}/activations")


# rows a deletion must not leave behind, whatever ran beside it: each count must be 0
INVARIANTS = {
    **{
        f"{table} rows of deleted runs": f"SELECT count(*) FROM {table} t JOIN run r "
        f"ON r.id = t.run_id WHERE r.status = '{DELETED}'"
        for table in ("frame", "metric", "metric_series", "spectrum", "scalar", "alert")
    },
    **{
        f"{table} rows of deleted projects": f"SELECT count(*) FROM {table} t JOIN project p "
        f"ON p.id = t.project_id WHERE p.name LIKE '{DELETED_PROJECT_PREFIX}%'"
        for table in ("webhook", "alert_rule")
    },
    "live runs in deleted projects": "SELECT count(*) FROM run r JOIN project p ON p.id = "
    f"r.project_id WHERE p.name LIKE '{DELETED_PROJECT_PREFIX}%' AND r.status != '{DELETED}'",
    "open alerts under disabled rules": "SELECT count(*) FROM alert a JOIN run r "
    "ON r.id = a.run_id JOIN alert_rule ar ON ar.project_id = r.project_id "
    "AND ar.rule = a.rule WHERE a.status = 'open' AND NOT ar.enabled",
}


def log_findings(path: Path, offset: int) -> dict[str, list[str]]:
    """Deadlocks and other ERROR lines PostgreSQL logged past ``offset``."""
    if not path.exists():
        return {}
    with path.open("rb") as f:
        f.seek(offset)
        lines = f.read().decode("utf-8", "replace").splitlines()
    found: dict[str, list[str]] = collections.defaultdict(list)
    for i, line in enumerate(lines):
        if "ERROR:" in line:
            what = line.split("ERROR:", 1)[1].strip()
            context = [
                x.strip() for x in lines[i + 1 : i + 8] if "Process" in x or "STATEMENT" in x
            ]
            found[re.sub(r"\d+", "N", what)[:120]].append(" | ".join(context)[:600])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--churners", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embedded", action="store_true", help="SQLite, in-process worker")
    parser.add_argument("--logs", type=Path, default=Path("/tmp/sw-soak-logs"), help="kept here")
    parser.add_argument(
        "--pg-log", type=Path, default=Path("/tmp/spectrawatch-pg-54329/server.log")
    )
    args = parser.parse_args()

    pg_offset = args.pg_log.stat().st_size if args.pg_log.exists() else 0
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    receiver = f"http://127.0.0.1:{httpd.server_address[1]}"
    with tempfile.TemporaryDirectory(prefix="sw-soak-") as tmp:
        root = Path(tmp)
        env = {"SPECTRAWATCH_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1"}
        server = ServerProcess(root / "server", env=env).start()
        tally, stop = Tally(), threading.Event()
        steps: list[int] = []
        threads = [
            threading.Thread(
                target=lambda s=s: steps.append(stream(server.url, root, stop, args.seed + s))
            )
            for s in range(args.clients)
        ] + [
            threading.Thread(
                target=churn, args=(server.url, receiver, tally, stop, args.seed + 100 + s)
            )
            for s in range(args.churners)
        ]
        started = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(args.seconds)
        stop.set()
        for t in threads:
            t.join(120)
        took = time.monotonic() - started
        logs = [server.log_path, *(w.log_path for w in server.workers)]
        broken = {what: db_rows(server.data_dir, query)[0][0] for what, query in INVARIANTS.items()}
        server.stop()
        args.logs.mkdir(parents=True, exist_ok=True)
        tracebacks = {}
        for log in logs:
            if log.exists():
                tracebacks[log.name] = log.read_text(errors="replace").count("Traceback")
                shutil.copy(log, args.logs / log.name)
    httpd.shutdown()

    findings = 0
    answers = sum(tally.counts.values())
    print(f"{took:.0f} s, {sum(steps)} training steps by {args.clients} clients, {answers} answers")
    print("| method | route | status | code | answers |")
    print("| --- | --- | --- | --- | --- |")
    for (method, route, status, code), n in sorted(tally.counts.items()):
        print(f"| {method} | {route} | {status} | {code} | {n} |")
    for key, n in sorted(tally.counts.items()):
        if key[2] == 0 or (key[2] >= 500 and key[3] != "database_busy"):
            findings += n
            print(f"FINDING {key} x{n}: {tally.examples[key]}")
    logged = {} if args.embedded else log_findings(args.pg_log, pg_offset)
    for what, contexts in sorted(logged.items()):
        print(f"postgres ERROR x{len(contexts)}: {what}")
        print(f"    e.g. {contexts[0]}")
        findings += len(contexts) if "deadlock" in what else 0
    print(f"tracebacks in the server's and workers' logs ({args.logs}): {json.dumps(tracebacks)}")
    for what, count in broken.items():
        print(f"{'FINDING ' if count else ''}{what}: {count}")
        findings += count
    busy = sum(n for key, n in tally.counts.items() if key[3] == "database_busy")
    print(f"503 database_busy answers: {busy}")
    print(f"findings: {findings}")


if __name__ == "__main__":
    main()
