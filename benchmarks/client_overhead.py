"""Client overhead: step time and memory of a GPT-2-small-shaped model with and without monitoring.

Conditions (each in its own subprocess, interleaved over repetitions so that machine load hits
all of them alike):
  none         no monitoring
  spectrawatch default cadence (update sketch every step, theta sketch /100, weights /500,
               activations /250 on a probe batch), sending to an in-process mock server that
               accepts everything (client work only; the sender thread's encoding is included)
  sw_every10   spectrawatch with update sketches every 10 steps
  wandb        ``wandb.watch(model, log="all", log_freq=1)`` in offline mode + ``wandb.log``
  tensorboard  ``SummaryWriter.add_histogram`` of every parameter every step
  sw_index_step1  spectrawatch with the hash index built inside the first step (the behaviour
               before it moved to a background thread at ``attach``), for ``--first-steps``
  sw_one_stream   spectrawatch with ``sketch_stream=False``: the CUDA sketch on the training
               stream instead of a side stream that overlaps the next step

The periodic captures (weights, activations, theta) do not fire inside a short timed window, so
their one-off cost is timed separately and amortised over its cadence in the report.

    PYTHONPATH=client .venv/bin/python benchmarks/client_overhead.py --steps 8 --reps 2

``--paired K`` measures spectrawatch against no monitoring *in one process*: after a warm-up
with the monitor attached, 2K blocks of ``--steps`` steps, each timed as one block, alternate
between the optimizer hooks attached and removed (order ABBA, so a drift in clocks or load
cancels); the overhead is the median over the K pairs of (on / off - 1). It removes the
between-process spread of a step's time (bf16 on an H200: 0.021-0.028 s for the same
condition), which comparing one process per condition cannot. Periodic weight and activation
captures are off in the blocks (their one-off cost is timed and amortised as above); each
re-attached block's first row spans the detached block (timing only: the server is a mock).
The same pairs are also compared by the training thread's CPU time per step: where the step is
host-bound (bf16 autocast on a fast GPU: the thread launches, the GPU waits) that is the step's
cost without the time the thread was not scheduled, the noise of a shared machine. On a CPU the
sketch runs on a pool of threads, so there it says little.

    PYTHONPATH=client .venv/bin/python benchmarks/client_overhead.py --paired 6 --steps 20 \
        --device cuda --amp bf16 --batch 8 --seq 256

With ``--budget B`` the monitor runs with ``overhead_budget=B`` and picks its update cadence in
the warm-up (give it 12+ steps, and blocks of several times that cadence); the report adds the
cadence chosen and the training thread's CPU time in the hooks per monitored step.

    PYTHONPATH=client .venv/bin/python benchmarks/client_overhead.py --paired 2 --steps 100 \
        --warmup 15 --reps 1 --budget 0.01

``--first-steps`` times every step from the first one (no warm-up, periodic captures not timed):
the cost of building the hash index -- inside step 1 (``sw_index_step1``) or on the background
thread started by ``attach`` (``spectrawatch``), with the steps skipped meanwhile.

    PYTHONPATH=client .venv/bin/python benchmarks/client_overhead.py --first-steps --steps 8 \
        --conditions none,sw_index_step1,spectrawatch
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

CONDITIONS = ("none", "spectrawatch", "sw_every10", "wandb", "tensorboard")
SW_CONDITIONS = ("spectrawatch", "sw_every10", "sw_index_step1", "sw_torch", "sw_one_stream")


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d)
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc = nn.Linear(d, 4 * d)
        self.mlp_proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT2(nn.Module):
    """GPT-2 small shape: 12 x (768, 12 heads), vocab 50257, context 1024, tied head (124M)."""

    def __init__(
        self, layers: int = 12, d: int = 768, heads: int = 12, vocab: int = 50257, ctx: int = 1024
    ) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.h = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T


def rss_mib() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB, from /proc/self/status."""
    vals = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":")
            vals[key] = int(value.split()[0]) / 1024
    return vals["VmRSS"], vals["VmHWM"]


def index_in_first_step() -> None:
    """Patch the client back to building the hash index inside the first captured step."""
    from spectrawatch._capture import Capture
    from spectrawatch._sketch_index import SketchIndex

    before_step = Capture._before_step

    def build_then_sketch(self: Capture) -> None:
        index = self._sketch_index
        if not index._index_ready.is_set():
            index._build_index(index._index_gen)
        before_step(self)

    SketchIndex._start_index_build = lambda self: None  # type: ignore[method-assign]
    Capture._before_step = build_then_sketch  # type: ignore[method-assign]


def accept(request: Any) -> Any:
    """An in-process mock server (``httpx.MockTransport``): accepts every request."""
    import httpx

    path = request.url.path
    if path.endswith("/runs"):
        return httpx.Response(201, json={"id": 1, "name": "bench", "status": "running"})
    return httpx.Response(202 if path.endswith("/frames") else 200, json={"id": 1})


def no_denormals(device: torch.device) -> None:
    """Flush denormal floats on the CPU: this loop's float32 training produces them, and they
    slowed its steps from 0.8 to 1.4 s within 40 steps (2 blocks, batch 1 x 16), the same with
    and without monitoring, which swamps any overhead in a longer run."""
    if device.type == "cpu":
        torch.set_flush_denormal(True)


def setup(
    layers: int, batch: int, seq: int, dev: torch.device
) -> tuple[nn.Module, torch.optim.Optimizer, list[torch.Tensor]]:
    """The seeded model, its AdamW and four token batches ``(batch, seq + 1)`` on ``dev``."""
    torch.manual_seed(0)
    no_denormals(dev)
    model = GPT2(layers=layers).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 50257, (batch, seq + 1), generator=gen).to(dev) for _ in range(4)]
    return model, opt, data


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, amp: str) -> Any:
    """One next-token step on ``x`` (forward under bf16 autocast if ``amp == "bf16"``)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a step's wall time is the step's."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def thread_timed(fn: Any, total: list[float]) -> Any:
    """``fn``, adding the calling thread's CPU time spent inside it to ``total[0]`` (and, where
    ``total`` has a second slot, the wall time: it includes waiting for the CPU sketch's pool
    threads, whose work the calling thread's CPU time does not show)."""

    def wrapper(*a: Any, **k: Any) -> Any:
        c, w = time.thread_time(), time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            total[0] += time.thread_time() - c
            if len(total) > 1:
                total[1] += time.perf_counter() - w

    return wrapper


def run_condition(
    cond: str,
    steps: int,
    warmup: int,
    seq: int,
    batch: int,
    layers: int,
    periodic: bool = True,
    device: str = "cpu",
    amp: str = "none",
    block: bool = False,
) -> dict[str, Any]:
    if cond == "sw_torch":  # the default sketch with the Triton kernel turned off
        os.environ["SPECTRAWATCH_TRITON"] = "0"
    dev = torch.device(device)
    model, opt, data = setup(layers, batch, seq, dev)
    probe = data[0][:, :-1]
    rss_before, _ = rss_mib()
    tmp = tempfile.mkdtemp()
    finish = None
    extra: dict[str, Any] = {}
    step_hook = None
    t_attach = time.perf_counter()
    hook_time = [0.0]
    if cond in SW_CONDITIONS:
        import httpx

        import spectrawatch
        from spectrawatch._capture import Capture

        # paired measurement: CPU time spent inside the optimizer-step hooks of this very run
        Capture._pre_hook = thread_timed(Capture._pre_hook, hook_time)  # type: ignore[method-assign]
        Capture._post_hook = thread_timed(Capture._post_hook, hook_time)  # type: ignore[method-assign]
        if cond == "sw_index_step1":
            index_in_first_step()

        m = spectrawatch.Monitor(transport=httpx.MockTransport(accept))
        m.init(
            project="bench",
            run=f"bench-{cond}",
            spool_dir=tmp,
            update_every=10 if cond == "sw_every10" else 1,
            sketch_stream=cond != "sw_one_stream",
        )
        handle = m.attach(model, opt, probe=probe)
        assert handle is not None
        cap = handle.capture
        if periodic:  # steady-state overhead: let the background index build finish first
            cap.wait_index(600)
        extra["sketch_backend"] = getattr(cap._fused, "backend", None)

        def sw_finish() -> None:
            extra["client_stats"] = m.stats.snapshot()
            if not periodic:
                m.finish(timeout=120)
                return
            # one-off cost of the periodic captures, amortised by the report
            sync(dev)
            t = time.perf_counter()
            cap.capture_weights(10**9)
            sync(dev)
            extra["weights_s"] = time.perf_counter() - t
            t = time.perf_counter()
            cap.capture_activations(10**9 + 1)
            sync(dev)
            extra["activations_s"] = time.perf_counter() - t
            t = time.perf_counter()
            cap._sketch_all()
            sync(dev)
            extra["theta_sketch_s"] = time.perf_counter() - t
            t = time.perf_counter()
            m.wait_idle(600)
            extra["sender_drain_s"] = time.perf_counter() - t
            extra["client_stats"] = m.stats.snapshot()
            m.finish(timeout=120)

        finish = sw_finish
    elif cond == "wandb":
        os.environ["WANDB_MODE"] = "offline"
        os.environ["WANDB_SILENT"] = "true"
        import wandb

        wb = wandb.init(project="bench", dir=tmp)
        wandb.watch(model, log="all", log_freq=1)

        def wb_step(step: int, loss: float) -> None:
            wandb.log({"loss": loss}, step=step)

        step_hook = wb_step
        finish = wb.finish
    elif cond == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(tmp)

        def tb_step(step: int, loss: float) -> None:
            c = time.thread_time()
            writer.add_scalar("loss", loss, step)
            for name, p in model.named_parameters():
                writer.add_histogram(name, p.detach(), step)
            hook_time[0] += time.thread_time() - c

        step_hook = tb_step
        finish = writer.close
    attach_s = time.perf_counter() - t_attach
    times = []
    cpu = []
    proc_cpu0 = 0.0
    t_block = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            sync(dev)
            proc_cpu0 = time.process_time()
            hook_time[0] = 0.0
            t_block = time.perf_counter()
        x = data[step % len(data)]
        if not block:
            sync(dev)
        c0 = time.thread_time()
        t0 = time.perf_counter()
        loss = train_step(model, opt, x, amp)
        if step_hook is not None:
            step_hook(step, float(loss))
        if not block:
            sync(dev)
        times.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    if block:  # one synchronisation for all timed steps: their mean, as every step's time
        sync(dev)
        times[warmup:] = [(time.perf_counter() - t_block) / steps] * steps
    proc_cpu = (time.process_time() - proc_cpu0) / steps
    rss_after, peak = rss_mib()
    if dev.type == "cuda":
        extra["peak_gpu_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    if finish is not None:
        finish()
    return {
        "cond": cond,
        "times": times[warmup:],
        "warmup_times": times[:warmup],
        "cpu": cpu[warmup:],
        "process_cpu_per_step": proc_cpu,
        "hook_cpu_per_step": hook_time[0] / steps,
        "attach_s": attach_s,
        "rss_before_mib": rss_before,
        "rss_after_mib": rss_after,
        "peak_rss_mib": peak,
        **extra,
    }


def run_paired(
    pairs: int,
    steps: int,
    warmup: int,
    seq: int,
    batch: int,
    layers: int,
    device: str = "cpu",
    amp: str = "none",
    budget: float = 0.0,
) -> dict[str, Any]:
    """Blocks of ``steps`` steps with the monitor's hooks on and off, alternating ABBA; with
    ``budget``, the monitor's ``overhead_budget`` (the warm-up is where it picks its cadence).
    Also the training thread's CPU time inside the hooks, per monitored step."""
    import httpx

    import spectrawatch

    dev = torch.device(device)
    model, opt, data = setup(layers, batch, seq, dev)
    m = spectrawatch.Monitor(transport=httpx.MockTransport(accept))
    m.init(
        project="bench",
        run="bench-paired",
        spool_dir=tempfile.mkdtemp(),
        weights_every=0,
        activations_every=0,
        overhead_budget=budget,
    )
    handle = m.attach(model, opt)
    assert handle is not None
    cap = handle.capture
    cap.wait_index(600)
    hook_cpu = [0.0, 0.0]  # training-thread CPU, wall
    pre_hook = thread_timed(cap._pre_hook, hook_cpu)
    post_hook = thread_timed(cap._post_hook, hook_cpu)

    def hooks(on: bool) -> None:
        for h in cap._handles:
            h.remove()
        cap._handles.clear()
        if on:
            cap._handles += [
                opt.register_step_pre_hook(pre_hook),
                opt.register_step_post_hook(post_hook),
            ]

    def block(n: int, first: int) -> tuple[float, float]:
        """Wall and training-thread CPU seconds per step (CPU time leaves out the time the
        thread was not scheduled: on a shared host-bound machine, the steadier of the two)."""
        sync(dev)
        t, c = time.perf_counter(), time.thread_time()
        for i in range(n):
            x = data[(first + i) % len(data)]
            train_step(model, opt, x, amp)
        sync(dev)
        return (time.perf_counter() - t) / n, (time.thread_time() - c) / n

    hooks(True)
    block(warmup, 0)
    on_times, off_times, on_cpu, off_cpu = [], [], [], []
    hook_cpu[:] = [0.0, 0.0]
    for k in range(pairs):
        for on in (True, False) if k % 2 == 0 else (False, True):
            hooks(on)
            wall, cpu = block(steps, k)
            (on_times if on else off_times).append(wall)
            (on_cpu if on else off_cpu).append(cpu)
    hooks(False)
    stats = m.stats.snapshot()
    m.wait_idle(600)
    m.finish(timeout=120)
    return {
        "on": on_times,
        "off": off_times,
        "on_cpu": on_cpu,
        "off_cpu": off_cpu,
        "client_stats": stats,
        "update_every": cap.update_every,
        "hook_cpu_per_step": hook_cpu[0] / (pairs * steps),
        "hook_wall_per_step": hook_cpu[1] / (pairs * steps),
    }


def report_paired(results: list[dict[str, Any]]) -> None:
    """Per-pair step times and the median paired overhead (on / off - 1)."""
    ratios = [a / b - 1 for r in results for a, b in zip(r["on"], r["off"], strict=True)]
    for i, r in enumerate(results):
        pairs = ", ".join(f"{a:.4f}/{b:.4f}" for a, b in zip(r["on"], r["off"], strict=True))
        print(f"process {i}: on/off step (s) per pair: {pairs}")
        if "hook_cpu_per_step" in r:
            off = statistics.median(r["off"])
            wall = r["hook_wall_per_step"]
            print(
                f"process {i}: update sketch every {r['update_every']} steps; in the hooks per "
                f"monitored step: {1e3 * wall:.2f} ms wall = {100 * wall / off:.2f} % of the "
                f"median unmonitored step ({1e3 * r['hook_cpu_per_step']:.2f} ms "
                f"training-thread CPU = {100 * r['hook_cpu_per_step'] / off:.2f} %)"
            )
    _print_ratios(f"paired overhead over {len(ratios)} pairs", ratios)
    if all("on_cpu" in r for r in results):
        cpu = [a / b - 1 for r in results for a, b in zip(r["on_cpu"], r["off_cpu"], strict=True)]
        _print_ratios("paired training-thread CPU time per step", cpu)


def _print_ratios(label: str, ratios: list[float]) -> None:
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    print(
        f"{label}: median {100 * statistics.median(ratios):+.2f} %"
        f", quartiles {100 * q[0]:+.2f} / {100 * q[2]:+.2f} %, "
        f"min {100 * min(ratios):+.2f} %, max {100 * max(ratios):+.2f} %"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--conditions", default=",".join(CONDITIONS))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="write the raw JSON results here")
    ap.add_argument("--first-steps", action="store_true", help="time steps 1..N, no warm-up")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (model, data and optimizer)")
    ap.add_argument(
        "--amp", default="none", choices=("none", "bf16"), help="bf16: forward under autocast"
    )
    ap.add_argument(
        "--block",
        action="store_true",
        help="time the steps as one block (no synchronisation per step, as a training loop that "
        "does not read its loss every step): a sketch on a side stream can then overlap the next "
        "step",
    )
    ap.add_argument(
        "--paired",
        type=int,
        default=0,
        metavar="K",
        help="K pairs of --steps-step blocks, monitor hooks on and off, in one process per rep",
    )
    ap.add_argument(
        "--budget",
        type=float,
        default=0.0,
        help="with --paired: the monitor's overhead_budget (a fraction; 0 = off, every step)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.first_steps:
        args.warmup = 0
    if args.paired and args.one:
        res = run_paired(
            args.paired,
            args.steps,
            args.warmup,
            args.seq,
            args.batch,
            args.layers,
            device=args.device,
            amp=args.amp,
            budget=args.budget,
        )
        print("RESULT " + json.dumps(res), flush=True)
        return
    if args.paired:
        args.conditions = "paired"
    if args.one:
        res = run_condition(
            args.one,
            args.steps,
            args.warmup,
            args.seq,
            args.batch,
            args.layers,
            periodic=not args.first_steps,
            device=args.device,
            amp=args.amp,
            block=args.block,
        )
        print("RESULT " + json.dumps(res), flush=True)
        return
    results: dict[str, list[dict[str, Any]]] = {c: [] for c in args.conditions.split(",")}
    for rep in range(args.reps):
        for cond in results:
            cmd = [
                sys.executable,
                __file__,
                "--one",
                cond,
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--seq",
                str(args.seq),
                "--batch",
                str(args.batch),
                "--layers",
                str(args.layers),
                "--threads",
                str(args.threads),
                "--device",
                args.device,
                "--amp",
                args.amp,
                *(["--first-steps"] if args.first_steps else []),
                *(["--block"] if args.block else []),
                *(["--paired", str(args.paired)] if args.paired else []),
                *(["--budget", str(args.budget)] if args.budget else []),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if not line:
                print(f"{cond} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
                continue
            res = json.loads(line[0][7:])
            res["device"] = args.device
            res["amp"] = args.amp
            results[cond].append(res)
            if args.paired:
                print(f"rep {rep} paired: {len(res['on'])} pairs", flush=True)
                continue
            print(
                f"rep {rep} {cond:13s} median step {statistics.median(res['times']):.4f} s  "
                f"train-thread CPU {statistics.median(res['cpu']):.3f} s  "
                f"peak RSS {res['peak_rss_mib']:.0f} MiB"
                + (f", peak GPU {res['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in res else "")
                + (f", sketch {res['sketch_backend']}" if res.get("sketch_backend") else ""),
                flush=True,
            )

    if args.paired:
        report_paired(results["paired"])
    elif args.first_steps:
        report_first_steps(results)
    else:
        report_overhead(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


def report_first_steps(results: dict[str, list[dict[str, Any]]]) -> None:
    """Per-step wall times from step 1, attach time, and steps skipped while the index builds."""
    print(
        "\n| condition | attach (s) | wall time of steps 1..N (s) | training-thread CPU of "
        "steps 1..N (s) | sketch steps skipped |"
    )
    print("|---|---|---|---|---|")
    for cond, rs in results.items():
        for r in rs:
            wall = ", ".join(f"{t:.2f}" for t in r["times"])
            cpu = ", ".join(f"{t:.2f}" for t in r["cpu"])
            skipped = r.get("client_stats", {}).get("sketch_steps_skipped", 0)
            print(f"| {cond} | {r['attach_s']:.2f} | {wall} | {cpu} | {skipped} |")


def report_overhead(results: dict[str, list[dict[str, Any]]]) -> None:
    """Median step times, CPU and RSS per condition; paired hook CPU; amortised captures."""

    def med(rs: list[dict[str, Any]], key: str) -> float:
        return statistics.median(t for r in rs for t in r[key])

    none = results.get("none", [])
    base, base_cpu = med(none, "times"), med(none, "cpu")
    base_proc = statistics.median(r["process_cpu_per_step"] for r in none)
    base_peak = statistics.median(r["peak_rss_mib"] for r in none)
    print(
        "\n| condition | wall step (s) | wall overhead | train-thread CPU (s) | CPU overhead |"
        " process CPU/step (s) | process CPU overhead | peak RSS (MiB) | extra RSS (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for cond, rs in results.items():
        if not rs:
            continue
        wall, cpu = med(rs, "times"), med(rs, "cpu")
        proc = statistics.median(r["process_cpu_per_step"] for r in rs)
        peak = statistics.median(r["peak_rss_mib"] for r in rs)
        print(
            f"| {cond} | {wall:.4f} | {100 * (wall / base - 1):+.1f} % | {cpu:.3f} | "
            f"{100 * (cpu / base_cpu - 1):+.1f} % | {proc:.3f} | "
            f"{100 * (proc / base_proc - 1):+.1f} % | {peak:.0f} | {peak - base_peak:+.0f} |"
        )
    print("\nPaired (same process, same load): train-thread CPU inside the monitoring hooks")
    for cond in ("spectrawatch", "sw_every10", "tensorboard"):
        for r in results.get(cond, []):
            hook = r["hook_cpu_per_step"]
            rest = statistics.median(r["cpu"]) - hook
            print(
                f"  {cond}: {hook:.4f} s/step in hooks vs {rest:.4f} s/step of training "
                f"-> {100 * hook / rest:.1f} %"
            )
    for cond in ("spectrawatch", "sw_every10"):
        for r in results.get(cond, []):
            amort = r["weights_s"] / 500 + r["activations_s"] / 250 + r["theta_sketch_s"] / 100
            print(
                f"{cond}: weights snapshot {r['weights_s']:.2f} s, activations "
                f"{r['activations_s']:.2f} s, theta sketch {r['theta_sketch_s']:.3f} s -> "
                f"amortised {amort * 1000:.1f} ms/step; warm-up steps "
                f"{[round(t, 2) for t in r['warmup_times']]}; stats {r['client_stats']}"
            )


if __name__ == "__main__":
    main()
