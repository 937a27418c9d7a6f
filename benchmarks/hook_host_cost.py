"""Host (Python) cost of the client's optimizer-step hooks with the sketch itself faked.

On a GPU the sketch kernel runs asynchronously, so what a training step's CPU thread pays is the
hooks' Python and op-dispatch work: listing the parameters, launching, differencing, batching
rows. This measures exactly that on the CPU, GPT-2-small-shaped model (148 tensors), with the
fused sketcher replaced by one that only allocates its result, then prints a cProfile of it.

    PYTHONPATH=client:server python benchmarks/hook_host_cost.py [--steps 50] [--repeat 5]

With ``--device cuda`` the model lives on the GPU and the sketch is the real one (the Triton
kernel where triton imports, on the side stream): the host time per step is then what the
training thread pays for launching it, the row differences and the frame copies (the GPU work
itself is queued, not waited for; one synchronisation ends the timed loop). There the sketch is
replayed from a CUDA graph unless ``SPECTRAWATCH_SKETCH_GRAPH=0``.

``--parts`` adds a breakdown of the host time per step by part of the hooks (layout check, stream
join, the sketch's launch or graph replay, the row difference, the frames' copies...), each timed
by a wrapper around that part on this capture (~0.3 us a wrapped call): where a GPU lease should
look first, without the inflation of a profiler. On CUDA, ``--primitives`` also prints the host
cost of each CUDA call the hooks make per step (a side-stream context, ``wait_stream``, an event
recorded or waited for, a graph replay, a small op launched), to add up against the parts.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import httpx
import torch
from client_overhead import GPT2, accept

import spectrawatch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeat", type=int, default=5, help="blocks of --steps; the best is shown")
    ap.add_argument("--device", default="cpu", help="cpu (sketch faked) or cuda (real sketch)")
    ap.add_argument("--parts", action="store_true", help="host time per step by part of the hooks")
    ap.add_argument("--primitives", action="store_true", help="CUDA: host cost of each call")
    ap.add_argument(
        "--dim",
        type=int,
        default=None,
        help="sketch dimension (default 20 W = 640); a small one on the CPU leaves the hooks' "
        "Python and op dispatch without the faked sketch's arithmetic, as a GPU's host sees them",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    model = GPT2(layers=args.layers).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    m = spectrawatch.Monitor(transport=httpx.MockTransport(accept))
    m.init(project="bench", run="hooks", spool_dir=tempfile.mkdtemp(), sketch_dim=args.dim)
    handle = m.attach(model, opt)
    assert handle is not None
    cap = handle.capture
    cap.wait_index(600)
    rows = len(cap.layers)

    class Allocating:  # a GPU sketch as the host sees it: a result tensor, no arithmetic
        backend = "fake"
        device = torch.device("cpu")
        triton = None  # as a CountSketcher without the Triton kernel

        def __call__(self, xs: list[torch.Tensor]) -> torch.Tensor:
            return torch.zeros(rows, cap.spec.dim, dtype=torch.float64)

    if device.type == "cpu":
        cap._fused = Allocating()  # type: ignore[assignment]

    def steps(n: int) -> None:
        for _ in range(n):
            cap._pre_hook(opt, (), {})
            cap._post_hook(opt, (), {})

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    steps(3)
    sync()
    host, walls = [], []
    for _ in range(args.repeat):  # the best of several blocks: this box's noise is ~±10 %
        t = time.perf_counter()
        steps(args.steps)
        host.append((time.perf_counter() - t) / args.steps * 1e3)
        sync()
        walls.append((time.perf_counter() - t) / args.steps * 1e3)
    per_step, wall = min(host), min(walls)
    backend = getattr(cap._fused, "backend", None)
    what = "sketch faked" if device.type == "cpu" else f"real sketch: {backend}"
    graphed = getattr(cap, "_graphed", None)  # None: a client from before session 18
    graph = "no CUDA graph"
    if graphed is not None and graphed.enabled:
        graph = f"{graphed.captures} CUDA graph capture(s)"
    if graphed is not None and graphed.error:
        graph += f"; capture failed: {graphed.error}"
    print(
        f"{rows} tensors: {per_step:.3f} ms of host time per step in the hooks ({what}, {graph}; "
        f"best of {args.repeat} blocks of {args.steps}, median {statistics.median(host):.3f}); "
        f"{wall:.3f} ms per step until the device finished"
    )
    if args.parts:
        print_parts(cap, opt, steps, sync, args.steps, args.repeat)
    if args.primitives and device.type == "cuda":
        print_primitives(device, rows + 1, cap.spec.dim)
    profile = cProfile.Profile()
    profile.runcall(steps, args.steps)
    stats = pstats.Stats(profile).sort_stats("tottime")
    stats.print_stats(15)
    stats.print_callers(5)  # who makes the five costliest calls
    m.finish(timeout=5)


class _Timed:
    """A callable (or an object with ``__call__``) whose calls add their host time to a total;
    every other attribute is the wrapped object's."""

    def __init__(self, inner: Any, totals: dict[str, float], name: str) -> None:
        self._inner, self._totals, self._name = inner, totals, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return self._inner(*args, **kwargs)
        finally:
            self._totals[self._name] += time.perf_counter() - t

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


# (label, owner path on the capture, attribute); nested parts are also inside their parents
_PARTS = (
    ("pre-step hook", "", "_pre_hook"),
    ("  layout check", "", "_check_layout"),
    ("  stream join", "", "_join_stream"),
    ("post-step hook", "", "_post_hook"),
    ("  frames released", "_frames", "release"),
    ("  theta sketch (_sketch_all)", "", "_sketch_all"),
    ("    graph replay + clone", "", "_graphed"),
    ("    eager sketch launches", "_sketch_index", "_fused"),
    ("    row groups", "layout", "grouped"),
    ("    stream bookkeeping", "_stream", "launched"),
    ("  frame flush (stack + copy)", "", "flush_updates"),
)


def print_parts(
    cap: Any,
    opt: Any,
    steps: Callable[[int], None],
    sync: Callable[[], None],
    n: int,
    repeat: int,
) -> None:
    """Host time per step of each part of the hooks (the best block of ``repeat``)."""
    totals: dict[str, float] = defaultdict(float)
    saved = []
    for label, path, attr in _PARTS:
        owner = getattr(cap, path) if path else cap
        inner = getattr(owner, attr)
        if inner is None:
            continue
        saved.append((owner, attr, owner.__dict__.get(attr)))
        setattr(owner, attr, _Timed(inner, totals, label))
    blocks = []
    try:
        for _ in range(repeat):
            totals.clear()
            t = time.perf_counter()
            steps(n)
            wall = time.perf_counter() - t
            sync()
            blocks.append((wall, dict(totals)))
    finally:
        for owner, attr, before in saved:
            if before is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, before)
    wall, best = min(blocks, key=lambda b: b[0])
    print(f"host time per step by part (us; best of {repeat} blocks of {n}, parts wrapped):")
    print(f"  {'whole step (both hooks)':34s} {wall / n * 1e6:8.1f}")
    for label, _, _ in _PARTS:
        if label in best:
            print(f"  {label:34s} {best[label] / n * 1e6:8.1f}")
    post = best.get("post-step hook", 0.0)
    inside = sum(
        best.get(k, 0.0)
        for k in (
            "  frames released",
            "  theta sketch (_sketch_all)",
            "  frame flush (stack + copy)",
        )
    )
    print(f"  {'  rest of post-step (diff, bookkeeping)':34s} {(post - inside) / n * 1e6:8.1f}")


def print_primitives(device: torch.device, rows: int, dim: int, n: int = 2000) -> None:
    """Host microseconds per call of the CUDA calls a monitored step makes (best of 5 x ``n``)."""
    side = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
    a = torch.zeros(rows, dim, dtype=torch.float64, device=device)
    b = torch.zeros_like(a)
    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        c = a - b
    del c

    def ctx() -> None:
        with torch.cuda.stream(side):
            pass

    calls: dict[str, Callable[[], object]] = {
        "torch.cuda.current_stream()": lambda: torch.cuda.current_stream(device),
        "side.wait_stream(current)": lambda: side.wait_stream(torch.cuda.current_stream(device)),
        "with torch.cuda.stream(side): pass": ctx,
        "torch.cuda.Event() + record": lambda: torch.cuda.Event().record(side),  # type: ignore[no-untyped-call]
        "current.wait_event(event)": lambda: torch.cuda.current_stream(device).wait_event(event),
        "event.query()": event.query,
        "graph.replay() (one small kernel)": graph.replay,
        "a - b (launch)": lambda: a - b,
        "a.clone() (launch)": a.clone,
        "a.to(float32) (launch)": lambda: a.to(torch.float32),
    }
    event.record()
    torch.cuda.synchronize(device)
    print(f"host cost of CUDA calls (us per call, best of 5 x {n}; ({rows}, {dim}) float64):")
    for name, fn in calls.items():
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(n):
                fn()
            best = min(best, (time.perf_counter() - t) / n * 1e6)
            torch.cuda.synchronize(device)
        print(f"  {name:38s} {best:8.2f}")


if __name__ == "__main__":
    main()
