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
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time

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
    args = ap.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    model = GPT2(layers=args.layers).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    m = spectrawatch.Monitor(transport=httpx.MockTransport(accept))
    m.init(project="bench", run="hooks", spool_dir=tempfile.mkdtemp())
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
    profile = cProfile.Profile()
    profile.runcall(steps, args.steps)
    stats = pstats.Stats(profile).sort_stats("tottime")
    stats.print_stats(15)
    stats.print_callers(5)  # who makes the five costliest calls
    m.finish(timeout=5)


if __name__ == "__main__":
    main()
