"""Time from a triggering frame's ingest to the signed webhook arriving at a receiver.

A real ``spectrawatch server`` (SQLite, embedded worker, default poll intervals) and a local
``http.server`` receiver. Each round posts a weight frame with a NaN (opens a ``nonfinite``
episode, one ``alert.opened`` delivery), then a finite frame (resolves it). Latency is measured
from just before the POST of the NaN frame to the receiver's arrival time, and every received
message is verified with ``spectrawatch.webhooks.verify``. Target (issue 8): < 2 s.

    .venv/bin/python -m benchmarks.alerts_latency --rounds 20
"""

from __future__ import annotations

import argparse
import http.server
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from spectrawatch.webhooks import verify
from spectrawatch.wire import FrameKind, encode_frame
from tests.servers import ServerProcess, wait_until


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--size", type=int, default=256, help="weight matrix is (size, size)")
    args = parser.parse_args()

    arrivals: list[tuple[float, bytes, dict[str, str]]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            arrivals.append((time.monotonic(), body, dict(self.headers.items())))
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *a: Any) -> None:
            pass

    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(
            Path(tmp), env={"SPECTRAWATCH_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1"}
        ).start()
        try:
            latencies = run(server, receiver, arrivals, args.rounds, args.size)
        finally:
            server.stop()
            receiver.shutdown()
    lat = sorted(latencies)
    p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]
    print(f"rounds={len(lat)} size={args.size}x{args.size}")
    print(
        f"ingest->webhook latency: median {statistics.median(lat):.3f} s, p95 {p95:.3f} s, "
        f"max {lat[-1]:.3f} s, min {lat[0]:.3f} s"
    )


def run(
    server: ServerProcess,
    receiver: http.server.ThreadingHTTPServer,
    arrivals: list[tuple[float, bytes, dict[str, str]]],
    rounds: int,
    size: int,
) -> list[float]:
    api = httpx.Client(base_url=f"{server.url}/api/v1", timeout=30)
    run_id = api.post("/runs", json={"project": "bench", "name": "latency"}).json()["id"]
    for rule in ("alpha_out_of_range", "farms_alpha_out_of_range"):
        api.patch(f"/projects/bench/alert-rules/{rule}", json={"enabled": False})
    url = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    secret = api.post(
        "/webhooks", json={"project": "bench", "url": url, "events": ["alert.opened"]}
    ).json()["secret"]
    latencies = []
    seq = 0
    for _ in range(rounds):
        w = torch.randn(size, size)
        w[0, 0] = float("nan")
        before = len(arrivals)
        t0 = time.monotonic()
        body = encode_frame(FrameKind.WEIGHTS, seq, seq, {"fc.weight": w})
        r = api.post(f"/runs/{run_id}/frames", content=body, headers={"Idempotency-Key": str(seq)})
        assert r.status_code == 202, r.text
        wait_until(lambda b=before: len(arrivals) > b, timeout=30, interval=0.005)
        at, payload, headers = arrivals[before]
        assert verify(payload, headers, secret)["data"]["rule"] == "nonfinite"
        latencies.append(at - t0)
        seq += 1
        clean = encode_frame(FrameKind.WEIGHTS, seq, seq, {"fc.weight": torch.randn(size, size)})
        api.post(f"/runs/{run_id}/frames", content=clean, headers={"Idempotency-Key": str(seq)})
        seq += 1
        wait_until(
            lambda: api.get(f"/runs/{run_id}/alerts", params={"status": "open"}).json() == [],
            timeout=30,
        )
    api.close()
    return latencies


if __name__ == "__main__":
    main()
