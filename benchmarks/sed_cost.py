"""SED cost per frame for GPT-2-small-shaped update sketches (the worker's SED work).

149 parameter tensors + ``__model__`` = 150 sketch tensors, d = 640, windows 16/32/64, a frame
of ``--rows`` new steps on top of a 64-row history (one float32 ``(steps, 640)`` block per
tensor per frame, as the client sends them). Two measurements:

``math``      the spectral computation alone: a loop of ``rolling_sed`` per tensor and window
              (what the worker did before batching), and ``batched_sed`` of all tensors x
              windows x new steps at once (skipped when the imported ``sed`` lacks it).
``analysis``  the whole registered ``sed`` worker analysis on one frame: row assembly from the
              history frames, SED, phase detection against a stored 1,024-point gap series per
              tensor and window (an in-memory context, no database), metric objects. The
              history frames are analysed first (what they keep for later frames, as in the
              worker); each timed call sees a new copy of the newest frame (since session 24:
              before, repeats reused what the first call kept on it).
``--worker N`` instead: the real worker (SQLite, every analysis, storage, alert hook) on N
              ``ingest_load.py`` frames of one run posted through the app (``--layers``
              sketch tensors each: 4 by default, 149 for GPT-2 small); CPU time per frame
              and of the alert hook over the second half of the run.

"Before" numbers come from the same script run against an older tree, e.g.::

    git archive afd0990 client server | tar -x -C /tmp/before
    PYTHONPATH=/tmp/before/client:/tmp/before/server .venv/bin/python benchmarks/sed_cost.py
    .venv/bin/python benchmarks/sed_cost.py            # this tree
    .venv/bin/python benchmarks/sed_cost.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spectrawatch.spectral import sed
from spectrawatch.wire import FrameHeader, FrameKind
from spectrawatch_server.analyses.registry import MODEL_LAYER, DecodedFrame, analyses_for

TENSORS = 150
DIM = 640
WINDOWS = (16, 32, 64)
HISTORY = 64
GAP_POINTS = 1024


class _Context:
    """History frames and a stored gap series per (metric, layer), served from memory."""

    def __init__(self, frames: list[DecodedFrame], series: list[tuple[int, float]]) -> None:
        self.frames = frames
        self.series = series

    def recent_frames(self, kind: FrameKind, limit: int) -> list[DecodedFrame]:
        return self.frames[-limit:]

    def frames_holding(self, kind: FrameKind, layers: object) -> dict[str, DecodedFrame]:
        return {}

    def metric_series(self, name: str, layer: str, limit: int) -> list[tuple[int, float]]:
        return self.series[-limit:] if name.startswith(sed.GAP_RATIO) else []

    def metric_tails(
        self, wanted: dict[tuple[str, str], int]
    ) -> dict[tuple[str, str], list[tuple[int, float]]]:
        return {k: self.metric_series(*k, n) for k, n in wanted.items()}

    def flagged_steps(self, name: str, since: int) -> dict[str, set[int]]:
        return {}  # the stored gap series has no incomplete window

    def scalar_series(self, name: str, limit: int) -> list[tuple[int, float]]:
        return []


def _best(fn: Callable[[], object], repeat: int, device: torch.device) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def math_cost(rows: int, repeat: int, device: torch.device) -> dict[str, float]:
    """Milliseconds per frame of the per-tensor loop and of the batched call."""
    n = HISTORY + rows
    data = torch.randn(TENSORS, n, DIM, generator=torch.Generator().manual_seed(0)).to(device)
    steps = list(range(n))
    at = steps[-rows:]

    def loop() -> None:
        for layer in range(TENSORS):
            for w in WINDOWS:
                sed.rolling_sed(data[layer], steps, w, at=at)

    out = {"loop of rolling_sed": _best(loop, repeat, device)}
    batched = getattr(sed, "batched_sed", None)
    if batched is not None:
        tensors = list(data.unbind(0))
        out["batched_sed"] = _best(lambda: batched(tensors, steps, WINDOWS, at=at), repeat, device)
    return out


def analysis_cost(rows: int, repeat: int, device: torch.device) -> float:
    """Milliseconds of the registered ``sed`` analysis on one frame of ``rows`` new steps."""
    g = torch.Generator().manual_seed(1)
    names = [f"p{i}" for i in range(TENSORS - 1)] + [MODEL_LAYER]
    frames = []
    first = 0
    for seq, size in enumerate([16] * (HISTORY // 16) + [rows]):
        steps = list(range(first, first + size))
        first += size
        tensors = {name: torch.randn(size, DIM, generator=g).to(device) for name in names}
        header = FrameHeader(FrameKind.UPDATE_SKETCH, steps[0], seq, {"steps": steps}, (), 0)
        frames.append(DecodedFrame(1, seq, header, tensors, device))
    gap = [(s - GAP_POINTS, 1.5) for s in range(GAP_POINTS)]  # stored points before the history
    (analysis,) = [a for a in analyses_for(FrameKind.UPDATE_SKETCH) if a.name == "sed"]
    for i, f in enumerate(frames[:-1]):  # the history was analysed first, as by the worker
        analysis.fn(f, _Context(frames[:i], gap))
    context = _Context(frames[:-1], gap)
    last = frames[-1]
    memo = dict(frames[-2].memo)

    def fresh() -> None:  # the newest frame as the worker first sees it; the history as it was
        frames[-2].memo.clear()
        frames[-2].memo.update(memo)
        frame = DecodedFrame(last.run_id, last.frame_id, last.header, last.tensors, last.device)
        analysis.fn(frame, context)

    return _best(fresh, repeat, device)


def worker_cost(frames: int, layers: int = 4) -> tuple[float, float]:
    """CPU ms per frame of ``Worker.process`` and of its alert hook, frames N/2..N of one run
    of ``layers`` sketch tensors per frame (149 for GPT-2 small)."""
    import tempfile
    from pathlib import Path

    from fastapi.testclient import TestClient
    from sqlalchemy import select

    from benchmarks.ingest_load import sketch_frame
    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings
    from spectrawatch_server.db.models import Frame

    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(ServerSettings(data_dir=Path(tmp), run_worker=False))
        with TestClient(app, base_url="http://127.0.0.1") as client:
            run = client.post("/api/v1/runs", json={"project": "p", "name": "r"}).json()["id"]
            for seq in range(frames):
                r = client.post(
                    f"/api/v1/runs/{run}/frames",
                    content=sketch_frame(seq, layers=layers),
                    headers={"Idempotency-Key": str(seq)},
                )
                assert r.status_code == 202, r.text
            state = app.state.spectrawatch
            with state.sessions() as session:
                ids = list(session.scalars(select(Frame.id).order_by(Frame.seq)))
            worker = state.worker
            for frame_id in ids[: frames // 2]:
                worker.process(frame_id)
            hooks, spent = list(worker.hooks), [0.0]

            def timed(session: object, frame: object) -> None:
                t = time.process_time()
                for hook in hooks:
                    hook(session, frame)
                spent[0] += time.process_time() - t

            worker.hooks = [timed]
            t = time.process_time()
            for frame_id in ids[frames // 2 :]:
                worker.process(frame_id)
            n = len(ids) - frames // 2
            return (time.process_time() - t) / n * 1e3, spent[0] / n * 1e3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 10], help="new steps per frame")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--worker", type=int, default=0, help="time the real worker on N frames")
    ap.add_argument("--layers", type=int, default=4, help="--worker: sketch tensors per frame")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        total, alerts = worker_cost(args.worker, args.layers)
        print(
            f"worker: {total:.0f} ms CPU per frame, alert hook {alerts:.1f} ms "
            f"(frames {args.worker // 2}..{args.worker} of one run, {args.layers} sketch tensors"
            f" a frame, sed from {sed.__file__})"
        )
        return
    device = torch.device(args.device)
    print(
        f"{TENSORS} tensors x d={DIM}, windows {WINDOWS}, {HISTORY}-row history, {device}, "
        f"{args.threads} thread(s), best of {args.repeat}, sed from {sed.__file__}"
    )
    for rows in args.rows:
        for method, ms in math_cost(rows, args.repeat, device).items():
            print(f"math      {method:<20} frame of {rows:>2} new steps: {ms:8.1f} ms")
        ms = analysis_cost(rows, args.repeat, device)
        print(f"analysis  {'registered sed':<20} frame of {rows:>2} new steps: {ms:8.1f} ms")


if __name__ == "__main__":
    main()
