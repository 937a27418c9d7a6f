"""Cost of the client's overall request deadline (one daemon thread per request) on the sender.

Starts a real ``spectrawatch server`` (SQLite, embedded worker), then posts the same scalar
batch with the client's ``Api`` alternately through its deadline-bounded ``_send`` and through
a direct ``httpx`` call (the code before the deadline existed), ``--rounds`` rounds of
``--requests`` each, and prints the median request latency of both. The training thread never
makes these calls (the sender thread does), so this is sender throughput, not step time.

    PYTHONPATH=client:server .venv/bin/python benchmarks/request_deadline_cost.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx

from spectrawatch._transport import API, Api


def _direct(self: Api, method: str, path: str, content: bytes | None, **kwargs: Any) -> Any:
    return self._client.request(method, API + path, content=content, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=18995)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--rows", type=int, default=50, help="scalars per request")
    args = parser.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    with tempfile.TemporaryDirectory() as data:
        cmd = [sys.executable, "-m", "spectrawatch", "server", "--port", str(args.port)]
        server = subprocess.Popen(
            [*cmd, "--data-dir", data], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        try:
            for _ in range(300):
                try:
                    if httpx.get(f"{url}/api/v1/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            api = Api(url)
            api.create_project("bench")
            run_id = api.create_run("bench", "deadline")["id"]
            rows = [{"step": i, "name": "loss", "value": 1.0} for i in range(args.rows)]
            bounded = Api._send
            medians: dict[str, list[float]] = {"deadline thread": [], "direct": []}
            for _ in range(args.rounds):
                for name, send in (("deadline thread", bounded), ("direct", _direct)):
                    Api._send = send  # type: ignore[method-assign]
                    times = []
                    for _ in range(args.requests):
                        t0 = time.perf_counter()
                        api.post_scalars(run_id, rows)
                        times.append(time.perf_counter() - t0)
                    medians[name].append(statistics.median(times))
            Api._send = bounded  # type: ignore[method-assign]
            api.close()
        finally:
            server.terminate()
            server.wait(30)
    load = os.getloadavg()[0]
    print(f"load average {load:.2f}; {args.rounds} rounds x {args.requests} requests")
    for name, values in medians.items():
        ms = [round(v * 1e3, 2) for v in values]
        print(f"{name:>16}: median {statistics.median(values) * 1e3:.2f} ms  rounds {ms}")


if __name__ == "__main__":
    main()
