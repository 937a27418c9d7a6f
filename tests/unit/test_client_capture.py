"""Captures on real training loops: update sketches vs exact updates, cadences, weights,
activations, the defect probe, and that training is never changed or interrupted."""

from __future__ import annotations

import copy
import gc
import json
import math
import os
import weakref
from typing import Any

import pytest
import torch
from torch import nn

from spectrawatch import _weights, wire
from spectrawatch._capture import MODEL_KEY, ROOT_MODULE, Capture, output_layer
from spectrawatch._sender import ClientStats, ErrorLog, FrameItem
from spectrawatch.config import ClientSettings
from spectrawatch.sketch import SketchSpec, count_sketch, hash_coordinates
from spectrawatch.spectral import grokking as gk
from spectrawatch.spectral.grokking import COMMUTATOR_DEFECT, GRADIENT_COHERENCE
from spectrawatch.spectral.htsr import analyze_model


class Sink:
    """Collects what a capture emits (stands in for the sender)."""

    def __init__(self) -> None:
        self.frames: list[FrameItem] = []
        self.scalars: list[dict[str, Any]] = []

    def of(self, kind: wire.FrameKind) -> list[FrameItem]:
        return [f for f in self.frames if f.kind is kind]


def make_capture(
    model: nn.Module, opt: torch.optim.Optimizer | None, sink: Sink, **kw: Any
) -> tuple[Capture, ClientStats]:
    keys = ("probe", "modules", "loss_fn", "sample_batch", "start_step")
    options = {k: kw.pop(k) for k in keys if k in kw}
    s = ClientSettings.from_env(
        {}, **{"weights_every": 0, "activations_every": 0, "theta_every": 0, "frame_steps": 4, **kw}
    )
    stats = ClientStats()
    cap = Capture(
        model, opt, s, sink.frames.append, sink.scalars.extend, ErrorLog(stats), stats, **options
    )
    return cap, stats


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Dropout(0.2), nn.Linear(12, 3))


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    accum: int = 1,
    record: list[dict[str, torch.Tensor]] | None = None,
) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for _ in range(accum):
            x = torch.randn(16, 6, generator=gen)
            loss = model(x).pow(2).mean() / accum
            loss.backward()
        if record is not None:
            record.append({n: p.detach().clone() for n, p in model.named_parameters()})
        opt.step()
        opt.zero_grad()
    if record is not None:
        record.append({n: p.detach().clone() for n, p in model.named_parameters()})


def reference_sketch(x: torch.Tensor, spec: SketchSpec, name: str) -> torch.Tensor:
    b, s = hash_coordinates(x.numel(), spec.layer_seed(name), spec.dim)
    return count_sketch(x.reshape(-1).double(), b, s, spec.dim, torch.float64)


def assert_sketch_of(
    row: torch.Tensor, delta: torch.Tensor, spec: SketchSpec, name: str, rtol: float = 1e-5
) -> None:
    """``row`` (a float32 update row) is the sketch of ``delta`` to ``rtol`` (absolute slack:
    ``rtol / 100`` of its largest bucket)."""
    ref = reference_sketch(delta, spec, name)
    torch.testing.assert_close(
        row.double(), ref, rtol=rtol, atol=rtol / 100 * float(ref.abs().max())
    )


@pytest.mark.parametrize("fused", [True, False])
def test_update_rows_are_sketches_of_the_exact_updates(fused: bool) -> None:
    """Fused: all layers in one pass (one device); else one sketch per layer (several devices)."""
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sink = Sink()
    cap, stats = make_capture(model, opt, sink)
    assert cap.wait_index(30)
    assert cap._fused is not None
    if not fused:
        cap._fused = None
    thetas: list[dict[str, torch.Tensor]] = []
    train(model, opt, 10, record=thetas)
    cap.finish()
    frames = sink.of(wire.FrameKind.UPDATE_SKETCH)
    assert [f.info["steps"] for f in frames] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert frames[0].step == 1
    spec = SketchSpec(640, 0)
    names = [n for n, _ in model.named_parameters()]
    for frame in frames:
        assert set(frame.tensors) == {*names, MODEL_KEY}
        assert frame.info["sketch"]["dim"] == 640
        assert frame.info["layers"]["0.weight"] == {"numel": 72, "shape": [12, 6]}
        for row, step in enumerate(frame.info["steps"]):
            total = torch.zeros(640, dtype=torch.float64)
            for name in names:
                delta = thetas[step][name].double() - thetas[step - 1][name].double()
                ref = reference_sketch(delta, spec, name)
                total += ref
                got = frame.tensors[name][row].double()
                assert frame.tensors[name].dtype == torch.float32
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7 * float(ref.abs().max()))
            torch.testing.assert_close(
                frame.tensors[MODEL_KEY][row].double(),
                total,
                rtol=1e-5,
                atol=1e-7 * float(total.abs().max()),
            )
    assert stats.get("errors") == 0


def test_cadence_k_still_sends_one_step_updates_and_grad_accumulation() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = Sink()
    cap, _ = make_capture(model, opt, sink, update_every=3, frame_steps=10)
    thetas: list[dict[str, torch.Tensor]] = []
    train(model, opt, 9, accum=4, record=thetas)  # 36 backward passes, 9 optimizer steps
    cap.finish()
    (frame,) = sink.of(wire.FrameKind.UPDATE_SKETCH)
    assert frame.info["steps"] == [3, 6, 9]
    spec = SketchSpec(640, 0)
    for row, step in enumerate([3, 6, 9]):
        delta = thetas[step]["3.weight"] - thetas[step - 1]["3.weight"]
        assert_sketch_of(frame.tensors["3.weight"][row], delta, spec, "3.weight")


def test_theta_sketches_difference_into_interval_updates() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = Sink()
    cap, _ = make_capture(model, opt, sink, theta_every=5, frame_steps=100)
    train(model, opt, 10)
    cap.finish()
    theta = sink.of(wire.FrameKind.PARAM_SKETCH)
    assert [f.info["steps"] for f in theta] == [[1], [5], [10]]  # the first step too
    assert theta[0].tensors[MODEL_KEY].dtype == torch.float64
    (upd,) = sink.of(wire.FrameKind.UPDATE_SKETCH)
    # linearity: theta_10 - theta_5 sketch == sum of per-step update sketches 6..10
    interval = theta[2].tensors[MODEL_KEY][0] - theta[1].tensors[MODEL_KEY][0]
    summed = upd.tensors[MODEL_KEY][5:10].double().sum(0)
    torch.testing.assert_close(interval, summed, rtol=1e-5, atol=1e-6 * float(interval.abs().max()))


def test_the_first_step_sends_theta_at_once() -> None:
    """The first sketched step's theta leaves at once, whatever ``theta_frame_steps``: a run
    that stops before ``theta_every`` still gets ``norm.update_ratio``; none without theta."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = Sink()
    cap, _ = make_capture(model, opt, sink, theta_every=100, theta_frame_steps=4, frame_steps=100)
    train(model, opt, 3)
    (first,) = sink.of(wire.FrameKind.PARAM_SKETCH)
    assert first.info["steps"] == [1]
    assert first.info["off_cadence"] is True
    cap.finish()
    assert [f.info["steps"] for f in sink.of(wire.FrameKind.PARAM_SKETCH)] == [[1]]
    off = Sink()
    cap, _ = make_capture(model, opt, off, theta_every=0, frame_steps=100)
    train(model, opt, 3)
    cap.finish()
    assert off.of(wire.FrameKind.PARAM_SKETCH) == []


def test_theta_only_frames_pass_the_wire_check() -> None:
    """``update_every=0`` (theta sketches only): the frames leave ``info.update_every`` out
    instead of sending 0, which the server's frame check refuses (422, every frame lost)."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = Sink()
    cap, _ = make_capture(model, opt, sink, update_every=0, theta_every=2, theta_frame_steps=2)
    train(model, opt, 6)
    cap.finish()
    assert sink.of(wire.FrameKind.UPDATE_SKETCH) == []
    theta = sink.of(wire.FrameKind.PARAM_SKETCH)
    assert theta
    for frame in theta:
        assert "update_every" not in frame.info
        data = wire.encode_frame(frame.kind, frame.step, 1, frame.tensors, frame.info)
        header, _ = wire.decode_frame(data)
        wire.validate_layout(header)  # raises FrameError where the server answers 422


def test_theta_only_capture_sends_the_first_step_theta() -> None:
    """``update_every=0``: the session's first step still sends its theta at once (off the
    grid), a fresh run's at step 1 and a resumed one's at its first step, as with update
    sketches. Before, the step hook ran the sketch only on due steps, so the first theta came
    at ``theta_every`` and a resumed session sent none at its first step."""
    for start, every, want in ((0, 4, [[1], [4], [8]]), (15, 5, [[16], [20]])):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sink = Sink()
        cap, _ = make_capture(model, opt, sink, update_every=0, theta_every=every, start_step=start)
        assert cap.wait_index(30)
        train(model, opt, want[-1][0] - start)
        cap.finish()
        theta = sink.of(wire.FrameKind.PARAM_SKETCH)
        assert [f.info["steps"] for f in theta] == want
        assert theta[0].info["off_cadence"] is True
        assert all("off_cadence" not in f.info for f in theta[1:])
        assert sink.of(wire.FrameKind.UPDATE_SKETCH) == []


def test_a_layout_change_restarts_the_theta_chain_of_the_rows_it_changed() -> None:
    """The first on-grid theta frame after a layer is frozen or unfrozen names the rows whose
    chain restarts in ``info["chain_break"]``: ``__model__`` (a sum over another set) and the
    layers that joined; the server does not difference that row with the rows before. Before
    the fix nothing said so and interval SED took the switched layer's theta for an update."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = Sink()
    cap, _ = make_capture(model, opt, sink, theta_every=2, frame_steps=100)
    assert cap.wait_index(30)
    train(model, opt, 3)  # theta at 1 (off the grid) and 2
    model[0].weight.requires_grad_(False)
    train(model, opt, 3)  # 4, 6
    model[0].weight.requires_grad_(True)
    train(model, opt, 2)  # 8
    cap.finish()
    breaks = {
        f.info["steps"][0]: f.info.get("chain_break") for f in sink.of(wire.FrameKind.PARAM_SKETCH)
    }
    assert breaks == {1: None, 2: None, 4: [MODEL_KEY], 6: None, 8: ["0.weight", MODEL_KEY]}
    # a change before a session's first theta (a lazy layer's first forward): that frame is off
    # the grid, skipped by interval SED, so the next one names the rows
    torch.manual_seed(0)
    lazy = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.LazyLinear(3))
    opt = torch.optim.SGD(lazy.parameters(), lr=0.1)
    sink = Sink()
    cap, _ = make_capture(lazy, opt, sink, theta_every=2, frame_steps=100)
    train(lazy, opt, 4)
    cap.finish()
    breaks = {
        f.info["steps"][0]: f.info.get("chain_break") for f in sink.of(wire.FrameKind.PARAM_SKETCH)
    }
    assert breaks == {1: None, 2: ["2.bias", "2.weight", MODEL_KEY], 4: None}


def test_amp_skipped_steps_are_not_captured() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    sink = Sink()
    cap, stats = make_capture(model, opt, sink)
    x = torch.randn(8, 6)
    for poison in (False, True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().pow(2).mean()
        if poison:
            loss = loss * float("inf")  # inf gradients: the scaler skips optimizer.step()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    cap.finish()
    (frame,) = sink.of(wire.FrameKind.UPDATE_SKETCH)
    assert frame.info["steps"] == [1, 2]  # two real optimizer steps
    assert stats.get("errors") == 0
    assert all(torch.isfinite(t).all() for t in frame.tensors.values())


def test_exact_mode_sends_full_updates() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = Sink()
    cap, _ = make_capture(model, opt, sink, exact=True)
    thetas: list[dict[str, torch.Tensor]] = []
    train(model, opt, 4, record=thetas)
    cap.finish()
    (frame,) = sink.of(wire.FrameKind.UPDATE_SKETCH)
    assert frame.info["exact"] is True
    assert frame.info["shapes"]["0.weight"] == [12, 6]  # muon_audit reshapes exact rows
    assert frame.tensors["0.weight"].shape == (4, 72)
    torch.testing.assert_close(
        frame.tensors["0.weight"][2], (thetas[3]["0.weight"] - thetas[2]["0.weight"]).reshape(-1)
    )
    p = sum(t.numel() for t in thetas[0].values())
    assert frame.tensors[MODEL_KEY].shape == (4, p)


def test_monitoring_does_not_change_training() -> None:
    """Same seed, same data: bit-identical parameters with every capture firing every step."""
    ref_model = mlp()
    model = copy.deepcopy(ref_model)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(5)
    train(ref_model, ref_opt, 6)
    sink = Sink()
    gen = torch.Generator().manual_seed(9)
    probe = torch.randn(8, 6, generator=gen)

    def loss_fn(m: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return m(batch).pow(2).mean()

    cap, stats = make_capture(
        model,
        opt,
        sink,
        weights_every=2,
        activations_every=2,
        theta_every=2,
        defect_every=3,
        defect_samples=2,
        probe=probe,
        loss_fn=loss_fn,
        sample_batch=lambda: torch.randn(4, 6),
    )
    model.train()
    model[2].eval()  # a submodule in its own mode must come back in it
    model[2].train()
    torch.manual_seed(5)
    train(model, opt, 6)
    cap.finish()
    assert stats.get("errors") == 0
    for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())
    defect = [r for r in sink.scalars if r["name"] == COMMUTATOR_DEFECT]
    assert [r["step"] for r in defect] == [3, 6]
    assert all(r["value"] > 0 for r in defect)
    coherence = [r for r in sink.scalars if r["name"] == GRADIENT_COHERENCE]
    assert [r["step"] for r in coherence] == [3, 6]
    assert all(-1.0 <= r["value"] <= 1.0 for r in coherence)


def test_weights_frames_reshape_skip_1d_dtype_and_split() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
        nn.Embedding(50, 16),
    )
    sink = Sink()
    cap, _ = make_capture(model, None, sink, weights_dtype="float16", max_frame_bytes=1500)
    cap.capture_weights(7)
    frames = sink.of(wire.FrameKind.WEIGHTS)
    names = {n for f in frames for n in f.tensors}
    assert names == {"0.weight", "3.weight", "4.weight"}  # biases / norm scales skipped
    assert len(frames) == 3  # split: each matrix exceeds 1500 bytes with the others
    got = {n: (f.tensors[n], f.info) for f in frames for n in f.tensors}
    conv, info = got["0.weight"]
    assert conv.shape == (8, 27)
    assert conv.dtype == torch.float16
    assert info["layers"]["0.weight"]["orig_shape"] == [8, 3, 3, 3]
    assert info["shapes"]["0.weight"] == [8, 3, 3, 3]  # the server's htsr reads "shapes"
    assert info["dtype"] == "float16"
    assert all(f.info["traps"] is True for f in frames)  # the server computes them
    torch.testing.assert_close(conv, model[0].weight.detach().reshape(8, 27).half())
    assert all(f.compress and f.step == 7 for f in frames)
    body = wire.encode_frame(frames[0].kind, 7, 0, frames[0].tensors, frames[0].info)
    wire.decode_frame(body)  # valid on the wire


class ThreeD(nn.Module):
    """A mixture-of-experts stack ``(E, d_in, d_out)``, Conv1d and Conv3d kernels next to a
    Conv2d kernel and a matrix."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.experts = nn.Parameter(torch.randn(4, 8, 16))
        self.conv1d = nn.Conv1d(3, 5, 3)
        self.conv3d = nn.Conv3d(2, 3, 2)
        self.conv2d = nn.Conv2d(2, 6, 3)
        self.fc = nn.Linear(8, 10)


def test_weights_of_3d_and_5d_tensors_are_named_as_skipped_not_sent_flattened(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 3-D expert stack (8, 64, 128) went flattened to (8, 8192): an alpha from 8 eigenvalues
    and a spectral norm of 11.6 where no expert's exceeds 2.4. Like ``spectrawatch analyze``,
    snapshots hold 2-D and 4-D weights only and name the others with the same reason."""
    model = ThreeD()
    sink = Sink()
    cap, stats = make_capture(model, None, sink, max_frame_bytes=600)
    with caplog.at_level("WARNING", logger="spectrawatch"):
        cap.capture_weights(10)
        cap.capture_weights(20)
    frames = sink.of(wire.FrameKind.WEIGHTS)
    assert {f.step for f in frames} == {10, 20}
    for step in (10, 20):
        parts = [f for f in frames if f.step == step]
        assert len(parts) == 2  # split: the 2-D/4-D weights as before
        assert {n for f in parts for n in f.tensors} == {"conv2d.weight", "fc.weight"}
        got = {n: t for f in parts for n, t in f.tensors.items()}
        assert got["conv2d.weight"].shape == (6, 18)
        assert got["fc.weight"].shape == (10, 8)
        assert parts[0].info["skipped"] == {
            "experts": {"shape": [4, 8, 16], "reason": "3-D tensor"},
            "conv1d.weight": {"shape": [5, 3, 3], "reason": "3-D tensor"},
            "conv3d.weight": {"shape": [3, 2, 2, 2, 2], "reason": "5-D tensor"},
        }
        assert "skipped" not in parts[1].info
        first = parts[0]
        wire.decode_frame(wire.encode_frame(first.kind, step, 0, first.tensors, first.info))
    offline = analyze_model(model.state_dict())  # what `spectrawatch analyze` says of them
    sent = parts[0].info["skipped"]
    assert {s.layer: s.reason for s in offline.skipped if s.layer in sent} == {
        k: v["reason"] for k, v in sent.items()
    }
    assert stats.get("errors") == 0
    assert len([r for r in caplog.records if "weights not in snapshots" in r.message]) == 1


def test_frozen_weights_are_sent_once_and_again_only_when_they_change() -> None:
    """A LoRA run re-sent its frozen base in every snapshot (~87 % of the weight bytes) though
    its metrics never change: a frozen weight goes in the first snapshot, and again when it is
    written in place, replaced, or frozen after training; a trainable one every time."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"base": nn.Linear(16, 32), "lora": nn.Linear(16, 4, bias=False)})
    model["base"].requires_grad_(False)
    sink = Sink()
    cap, stats = make_capture(model, None, sink)

    def sent(step: int) -> set[str]:
        cap.capture_weights(step)
        return {n for f in sink.of(wire.FrameKind.WEIGHTS) if f.step == step for n in f.tensors}

    assert sent(1) == {"base.weight", "lora.weight"}
    assert sent(2) == {"lora.weight"}
    with torch.no_grad():
        model["base"].weight.add_(1.0)  # in place: its version counter moves
    assert sent(3) == {"base.weight", "lora.weight"}
    assert sent(4) == {"lora.weight"}
    model["base"].weight.data = torch.zeros(32, 16)  # replaced storage
    assert sent(5) == {"base.weight", "lora.weight"}
    model["base"].weight.requires_grad_(True)  # trainable: every snapshot
    assert sent(6) == sent(7) == {"base.weight", "lora.weight"}
    model["base"].weight.requires_grad_(False)  # frozen after training: once more, then not
    assert sent(8) == {"base.weight", "lora.weight"}
    assert sent(9) == {"lora.weight"}
    # a weights frame lost since (queue or spool full, refused) may have held its only copy
    stats.drop(wire.FrameKind.WEIGHTS.value)
    assert sent(10) == {"base.weight", "lora.weight"}
    assert sent(11) == {"lora.weight"}
    stats.lose_weights()
    assert sent(12) == {"base.weight", "lora.weight"}
    stats.drop(wire.FrameKind.UPDATE_SKETCH.value)  # other kinds: nothing to send again
    assert sent(13) == {"lora.weight"}
    assert stats.get("errors") == 0

    every = Sink()
    cap, _ = make_capture(model, None, every, weights_frozen_every=True)
    cap.capture_weights(1)
    cap.capture_weights(2)
    assert [sorted(f.tensors) for f in every.of(wire.FrameKind.WEIGHTS)] == [
        ["base.weight", "lora.weight"]
    ] * 2
    env = ClientSettings.from_env({"SPECTRAWATCH_WEIGHTS_FROZEN_EVERY": "1"})
    assert env.weights_frozen_every is True


def test_snapshots_name_the_frozen_weights_they_leave_out_with_the_step_last_sent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The server's whole-model values covered the sent weights alone from the second snapshot
    on: the first frame of a snapshot names each frozen weight left out as unchanged with the
    step it was last sent (``info["unchanged"]``), within a byte budget past which the names
    are only counted (``info["unchanged_more"]``)."""
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {"base": nn.Linear(16, 32), "head": nn.Linear(32, 8), "lora": nn.Linear(16, 4)}
    )
    model["base"].requires_grad_(False)
    model["head"].requires_grad_(False)
    sink = Sink()
    cap, _ = make_capture(model, None, sink, max_frame_bytes=256)  # one tensor per frame

    def infos(step: int) -> list[dict[str, Any]]:
        cap.capture_weights(step)
        return [f.info for f in sink.of(wire.FrameKind.WEIGHTS) if f.step == step]

    assert all("unchanged" not in info for info in infos(1))
    second = infos(2)
    assert second[0]["unchanged"] == {"base.weight": 1, "head.weight": 1}
    assert all("unchanged" not in info for info in second[1:])
    with torch.no_grad():
        model["head"].weight.mul_(2.0)  # written in place: sent at 3, unchanged since 3
    assert infos(3)[0]["unchanged"] == {"base.weight": 1}
    assert infos(4)[0]["unchanged"] == {"base.weight": 1, "head.weight": 3}
    assert "unchanged_more" not in infos(5)[0]
    # a frozen weight after a frame already filled by trainable ones is named too (it was
    # named by no frame: the first one had left before the walk reached it)
    late = nn.ModuleDict({"a": nn.Linear(16, 32), "b": nn.Linear(16, 32), "z": nn.Linear(16, 8)})
    late["z"].requires_grad_(False)
    late_sink = Sink()
    cap, _ = make_capture(late, None, late_sink, max_frame_bytes=256)
    cap.capture_weights(1)
    cap.capture_weights(2)
    second = [f.info for f in late_sink.of(wire.FrameKind.WEIGHTS) if f.step == 2]
    assert len(second) == 2
    assert second[0]["unchanged"] == {"z.weight": 1}

    names = {f"model.layers.{i}.mlp.up_proj.weight": 10 for i in range(100)}
    info = _weights.unchanged_info(names, budget=1000)
    assert 0 < len(info["unchanged"]) < 100
    assert len(json.dumps(info["unchanged"], separators=(",", ":"))) <= 1000  # as wire sends
    assert info["unchanged_more"] == 100 - len(info["unchanged"])
    assert list(info["unchanged"]) == list(names)[: len(info["unchanged"])]
    assert _weights.unchanged_info(names) == {"unchanged": names}
    many = {f"model.layers.{i}.mlp.experts.up_proj.weight": 10 for i in range(20_000)}
    info = cap._weights._unchanged_info(many)  # ~1 MB of names: past the 512 KiB budget
    assert (
        len(json.dumps(info["unchanged"], separators=(",", ":"))) <= _weights.UNCHANGED_INFO_BYTES
    )
    assert info["unchanged_more"] == 20_000 - len(info["unchanged"])
    assert len([r for r in caplog.records if "unchanged frozen weights" in r.message]) == 1


@pytest.mark.parametrize("weights_dtype", ["float16", "bfloat16"])
def test_weights_beyond_the_dtypes_range_are_sent_in_float32(
    weights_dtype: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A float16 copy of a weight beyond +-65504 reached the server as Inf (a ``nonfinite``
    alert, no norms): such a weight goes in float32, said once; a NaN weight stays NaN."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Linear(64, 8), nn.Linear(8, 4))
    with torch.no_grad():  # finite float32 entries past the narrow dtype's largest value
        model[0].weight[:, 0] = 7e4 if weights_dtype == "float16" else 3.4e38
        model[2].weight[0, 0] = float("nan")
    sink = Sink()
    cap, stats = make_capture(model, None, sink, weights_dtype=weights_dtype)
    narrow = getattr(torch, weights_dtype)
    with caplog.at_level("WARNING", logger="spectrawatch"):
        cap.capture_weights(10)
        cap.capture_weights(20)
    for frame in sink.of(wire.FrameKind.WEIGHTS):
        body = wire.encode_frame(frame.kind, frame.step, 0, frame.tensors, frame.info)
        header, tensors = wire.decode_frame(body)  # mixed dtypes in one frame: valid
        wire.validate_layout(header)
        assert header.info["widened"] == {"0.weight": "float32"}
        assert tensors["0.weight"].dtype == torch.float32
        assert torch.equal(tensors["0.weight"], model[0].weight.detach())
        assert tensors["1.weight"].dtype == narrow
        assert tensors["2.weight"].dtype == narrow  # NaN is no overflow: the setting's dtype
        assert wire.count_nonfinite(tensors) == {"2.weight": 1}  # the real NaN alone
    assert stats.get("errors") == 0
    assert stats.get("weights_widened") == 2  # counted per snapshot, logged once
    assert len([r for r in caplog.records if "0.weight sent as float32" in r.message]) == 1


def test_weights_traps_off_says_so_in_every_weights_frame() -> None:
    sink = Sink()
    cap, _ = make_capture(mlp(), None, sink, weights_traps=False)
    cap.capture_weights(3)
    frames = sink.of(wire.FrameKind.WEIGHTS)
    assert frames
    assert all(f.info["traps"] is False for f in frames)
    assert ClientSettings.from_env({"SPECTRAWATCH_WEIGHTS_TRAPS": "0"}).weights_traps is False


def test_weights_frames_stay_within_the_servers_tensor_count() -> None:
    """A model of more than 4096 small matrices (per-expert MoE layers) had every weight frame
    refused by the server (422 too_many_tensors)."""
    n = wire.FrameLimits().max_tensors + 10
    model = nn.ParameterList([nn.Parameter(torch.zeros(2, 2)) for _ in range(n)])
    sink = Sink()
    cap, _ = make_capture(model, None, sink)
    cap.capture_weights(1)
    frames = sink.of(wire.FrameKind.WEIGHTS)
    assert [len(f.tensors) for f in frames] == [n - 10, 10]
    for f in frames:
        wire.decode_frame(wire.encode_frame(f.kind, 1, 0, f.tensors, f.info))


class Experts(nn.Module):
    """A fine-grained mixture of experts: more trained tensors than a frame carries."""

    def __init__(self, layers: int, experts: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {
                    "router": nn.Linear(2, 2, bias=False),
                    "experts": nn.ModuleList(
                        nn.ModuleDict({w: nn.Linear(2, 2, bias=False) for w in ("w1", "w2", "w3")})
                        for _ in range(experts)
                    ),
                }
            )
            for _ in range(layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.layers:
            out = layer["router"](out)
            for expert in layer["experts"]:
                out = out + 1e-3 * expert["w2"](expert["w1"](x) * expert["w3"](x))
        return out


def test_a_model_with_more_tensors_than_a_frame_carries_sends_rows_per_module_prefix() -> None:
    """2 layers x 700 experts x 3 matrices (+ 2 routers): 4,202 tensors, one frame may carry
    4,096. Every update frame was refused (422 too_many_tensors); the rows are now the sums of
    each expert's 3 tensors' rows (a count-sketch of its block), and ``__model__`` is unchanged."""
    torch.manual_seed(0)
    model = Experts(2, 700)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = Sink()
    cap, stats = make_capture(model, opt, sink, theta_every=2)
    assert cap.wait_index(120)
    thetas: list[dict[str, torch.Tensor]] = []
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        thetas.append({n: p.detach().clone() for n, p in model.named_parameters()})
        model(torch.randn(8, 2, generator=gen)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    thetas.append({n: p.detach().clone() for n, p in model.named_parameters()})
    cap.finish()
    assert stats.get("errors") == 0
    assert stats.get("row_groups") == 1402
    groups = ["layers.0.router.weight", "layers.0.experts.0", "layers.1.experts.699"]
    spec = SketchSpec(640, 0)
    (frame,) = sink.of(wire.FrameKind.UPDATE_SKETCH)
    assert len(frame.tensors) == 1403
    assert set(groups) < set(frame.tensors)
    assert frame.info["layers"]["layers.1.experts.699"] == {
        "numel": 12,
        "shape": [12],
        "tensors": 3,
    }
    for row, step in enumerate(frame.info["steps"]):
        model_row = torch.zeros(640, dtype=torch.float64)
        for name in thetas[0]:
            model_row += reference_sketch(thetas[step][name] - thetas[step - 1][name], spec, name)
        torch.testing.assert_close(
            frame.tensors[MODEL_KEY][row].double(), model_row, rtol=1e-5, atol=1e-9
        )
        for group in groups:
            members = [n for n in thetas[0] if n == group or n.startswith(group + ".")]
            assert len(members) in (1, 3)
            ref = sum(
                reference_sketch(thetas[step][n] - thetas[step - 1][n], spec, n) for n in members
            )
            torch.testing.assert_close(
                frame.tensors[group][row].double(), ref, rtol=1e-5, atol=1e-9
            )
    theta = sink.of(wire.FrameKind.PARAM_SKETCH)
    assert theta
    for f in theta:  # theta rows grouped the same way
        assert set(f.tensors) == set(frame.tensors)
    wire.decode_frame(wire.encode_frame(frame.kind, 1, 0, frame.tensors, frame.info))


class TiedLM(nn.Module):
    """A language model whose unembedding is its embedding (Hugging Face's tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(20, 8)
        self.block = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 20, bias=False)
        self.lm_head.weight = self.wte.weight

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


class TiedNoHF(nn.Module):
    """A tied language model outside Hugging Face: no ``get_output_embeddings``, the head's
    weight registered last but named first (``emb.weight``) by ``named_parameters()``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.block = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight


class Broken(nn.Sequential):
    def get_output_embeddings(self) -> nn.Module:
        raise NotImplementedError


def test_output_layer_is_found_and_named_in_the_weights_frame_holding_it() -> None:
    assert output_layer(mlp()) == "3.weight"  # the last matrix in registration order
    assert output_layer(TiedLM()) == "wte.weight"  # tied: the embedding's (only) name
    # tied without get_output_embeddings: the last registration, not the last other matrix
    # (before the fix "block.2.weight", the MLP's down-projection)
    assert output_layer(TiedNoHF()) == "emb.weight"
    assert output_layer(Broken(nn.Linear(4, 4), nn.Linear(4, 2))) == "1.weight"
    assert output_layer(nn.LayerNorm(4)) is None
    model = nn.Sequential(nn.Linear(40, 40), nn.Linear(40, 3))
    sink = Sink()
    cap, _ = make_capture(model, None, sink, max_frame_bytes=4000)  # one matrix per frame
    cap.capture_weights(5)
    heads = {
        n: f.info.get("output_layer") for f in sink.of(wire.FrameKind.WEIGHTS) for n in f.tensors
    }
    assert heads == {"0.weight": None, "1.weight": "1.weight"}
    sink = Sink()
    cap, _ = make_capture(model, None, sink, output_layer="0.weight")  # the user's choice
    cap.capture_weights(5)
    (frame,) = sink.of(wire.FrameKind.WEIGHTS)
    assert frame.info["output_layer"] == "0.weight"


def test_probe_prediction_churn_agreement_and_confidence() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 5))
    probe = torch.randn(40, 4)
    sink = Sink()
    cap, _ = make_capture(model, None, sink, probe=probe)
    preds, conf = [], []
    for n in range(1, 6):
        cap.capture_activations(n)
        with torch.no_grad():
            out = model(probe)
        preds.append(out.argmax(-1))
        conf.append((n, round(float(out.double().softmax(-1).amax(-1).mean()), 6)))
        with torch.no_grad():
            model[2].weight[n % 5].add_(0.5)  # move some predictions between probes

    def rows(name: str) -> list[tuple[int, float]]:
        return [(r["step"], round(r["value"], 6)) for r in sink.scalars if r["name"] == name]

    churn = [
        (k + 1, round(float((preds[k] != preds[k - 1]).double().mean()), 6)) for k in range(1, 5)
    ]
    assert rows(gk.PREDICTION_CHURN) == churn
    assert any(v > 0 for _, v in churn)
    agree = [
        (
            k + 1,
            round(float((torch.stack(preds[k - 3 : k + 1]) == preds[k]).all(0).double().mean()), 6),
        )
        for k in (3, 4)
    ]
    assert rows(gk.PREDICTION_AGREEMENT) == agree
    assert rows(gk.PREDICTION_POSITIONS) == [(n, 40.0) for n in range(2, 6)]
    assert rows(gk.PREDICTION_CONFIDENCE) == conf  # from the first probe on
    assert len({v for _, v in conf}) == 5


@pytest.mark.parametrize(
    ("output", "want"),
    [
        (torch.tensor([[0.1, 0.9], [2.0, 1.0]]), [1, 0]),
        ((torch.tensor([[0.1, 0.9]]), "aux"), [1]),
        ({"logits": torch.tensor([[3.0, 0.0, 1.0]])}, [0]),
        (torch.ones(3, 1), None),  # regression: no classes
        (torch.tensor([1, 2]), None),  # integer output
        ("text", None),
    ],
)
def test_predictions_of_model_outputs(output: Any, want: list[int] | None) -> None:
    got = gk.predictions_of(output)
    assert (got.tolist() if got is not None else None) == want


@pytest.mark.parametrize(
    ("output", "want"),
    [
        (torch.zeros(3, 4), 0.25),
        ({"logits": torch.tensor([[0.0, math.log(3.0)]])}, 0.75),
        ((torch.tensor([[[0.0, math.log(3.0)], [math.log(3.0), 0.0]]]), "aux"), 0.75),
        (torch.tensor([[math.inf, 0.0]]), None),  # non-finite logits: nothing to report
        (torch.ones(3, 1), None),
        (torch.empty(0, 5), None),
    ],
)
def test_confidence_of_model_outputs(output: Any, want: float | None) -> None:
    got = gk.confidence_of(output)
    assert got == pytest.approx(want) if want is not None else got is None


def test_confidence_of_works_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    logits = torch.randn(4, 6, 50, generator=torch.Generator().manual_seed(0)) * 3
    want = float(logits.double().softmax(-1).amax(-1).mean())
    monkeypatch.setattr(gk, "_CONFIDENCE_CHUNK", 120)  # 2 rows of 50 per chunk, 12 chunks
    assert gk.confidence_of(logits) == pytest.approx(want, rel=1e-12)
    assert gk.confidence_of(logits.bfloat16()) == pytest.approx(want, rel=2e-2)
    masked = torch.tensor([[-math.inf, 0.0, -math.inf]])  # masked classes are fine
    assert gk.confidence_of(masked) == 1.0


def test_activations_x_or_gram_and_modes_restored() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3))
    probe = torch.randn(10, 4)
    sink = Sink()
    cap, _ = make_capture(model, None, sink, probe=probe)
    model.train()
    cap.capture_activations(5)
    (frame,) = sink.of(wire.FrameKind.ACTIVATIONS)
    x0 = model[0](probe).detach()
    torch.testing.assert_close(frame.tensors["0"], x0)  # 10 tokens < 32 hidden: X itself
    x2 = model[2](model[1](x0)).detach()
    torch.testing.assert_close(frame.tensors["2"], x2.T @ x2)  # 10 > 3: Gram (3, 3)
    assert frame.info == {"gram": ["2"], "tokens": {"0": 10, "2": 10}}
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())
    wire.decode_frame(wire.encode_frame(frame.kind, 5, 0, frame.tensors, frame.info))


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mha(x, x, x)[0])


def test_named_probe_modules_that_give_nothing_are_named_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``nn.MultiheadAttention`` never calls its ``out_proj``: a probe on it was accepted and
    silently gave no activations."""
    torch.manual_seed(0)
    model = _Attention()
    sink = Sink()
    cap, _ = make_capture(
        model, None, sink, probe=torch.randn(2, 5, 8), modules=["mha.out_proj", "head"]
    )
    with caplog.at_level("WARNING", logger="spectrawatch"):
        cap.capture_activations(1)
        cap.capture_activations(2)
    (warning,) = [r for r in caplog.records if "gave no activations" in r.getMessage()]
    assert "'mha.out_proj'" in warning.getMessage()
    assert "'head'" not in warning.getMessage()
    assert [set(f.tensors) for f in sink.of(wire.FrameKind.ACTIVATIONS)] == [{"head"}] * 2


class _ChannelFirst(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.c3 = nn.Conv3d(1, 6, 3)
        self.ct = nn.ConvTranspose2d(3, 5, 2)
        self.block = block

    def forward(self, volume: torch.Tensor, image: torch.Tensor) -> list[torch.Tensor]:
        return [self.c3(volume), self.ct(image), self.block(image)]


def test_channel_first_modules_are_probed_over_their_channels() -> None:
    """Conv3d, ConvTranspose2d, BatchNorm2d and a conv-bn-relu block put their features on
    dim 1: each probe's Gram is channels x channels over every site (only Conv1d/Conv2d were,
    and the others' spectra were taken over their last spatial axis); Conv3d and the
    transposed conv are probed by default too, as every ``Conv``."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU())
    model = _ChannelFirst(block)
    probe = (torch.randn(2, 1, 5, 6, 6), torch.randn(2, 3, 7, 7))
    default, _ = make_capture(model, None, Sink(), probe=probe)
    assert {n for n, _ in default._probe_modules()} == {"c3", "ct", "block.0"}
    sink = Sink()
    names = ["c3", "ct", "block", "block.1"]  # the block and its norm too
    cap, stats = make_capture(model, None, sink, probe=probe, modules=names)
    cap.capture_activations(1)
    (frame,) = sink.of(wire.FrameKind.ACTIVATIONS)
    model.eval()
    outputs = {
        "c3": model.c3(probe[0]),
        "ct": model.ct(probe[1]),
        "block": block(probe[1]),
        "block.1": block[1](block[0](probe[1])),
    }
    for name, out in outputs.items():
        x = out.detach().movedim(1, -1).reshape(-1, out.shape[1])
        torch.testing.assert_close(frame.tensors[name], x.T @ x, rtol=1e-4, atol=1e-3)
        assert frame.info["tokens"][name] == x.shape[0]
    assert stats.get("errors") == 0


@pytest.mark.parametrize(("steps", "at_finish"), [(5, True), (7, True), (7, False)])
def test_finish_takes_a_last_probe_capture_with_the_last_weights(
    steps: int, at_finish: bool
) -> None:
    """The final state of the activations, as of the weights: one probe capture at finish()
    unless the last step had one (``activations_every`` 5: at step 7, not again at step 5);
    none with ``weights_at_finish`` off."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = Sink()
    cap, _ = make_capture(
        model,
        opt,
        sink,
        probe=torch.randn(8, 6),
        activations_every=5,
        weights_at_finish=at_finish,
    )
    train(model, opt, steps)
    cap.finish()
    final = {steps} if at_finish else set()
    assert [f.step for f in sink.of(wire.FrameKind.ACTIVATIONS)] == sorted({5} | final)
    assert [f.step for f in sink.of(wire.FrameKind.WEIGHTS)] == sorted(final)


def test_a_model_that_is_one_layer_is_probed_under_a_name_a_frame_can_carry() -> None:
    """Its ``named_modules()`` name is "": the server refused such frames (422 bad_tensor_name)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    probe = torch.randn(2, 4)
    sink = Sink()
    cap, stats = make_capture(nn.DataParallel(model), None, sink, probe=probe)
    cap.capture_activations(1)
    (frame,) = sink.of(wire.FrameKind.ACTIVATIONS)
    assert list(frame.tensors) == [ROOT_MODULE]
    torch.testing.assert_close(frame.tensors[ROOT_MODULE], model(probe).detach())
    wire.decode_frame(wire.encode_frame(frame.kind, 1, 0, frame.tensors, frame.info))
    assert stats.get("errors") == 0


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")
def test_a_zero_width_layer_is_left_out_of_the_activations_of_the_others() -> None:
    """Its empty output used to raise in the hook: three probes later every layer's went off."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 0))
    sink = Sink()
    cap, stats = make_capture(model, None, sink, probe=torch.randn(2, 4))
    for n in range(1, 4):
        cap._guard("activations", lambda n=n: cap.capture_activations(n))
    frames = sink.of(wire.FrameKind.ACTIVATIONS)
    assert [list(f.tensors) for f in frames] == [["0"]] * 3
    assert stats.get("errors") == 0
    assert not cap._disabled


def test_failures_never_reach_the_loop_and_disable_the_capture() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = Sink()

    def bad_loss(m: nn.Module, batch: Any) -> torch.Tensor:
        raise RuntimeError("user loss_fn bug")

    cap, stats = make_capture(
        model,
        opt,
        sink,
        probe=torch.randn(2, 99),  # wrong width
        activations_every=1,
        defect_every=1,
        loss_fn=bad_loss,
        sample_batch=lambda: None,
    )
    train(model, opt, 6)  # must not raise
    cap.finish()
    assert stats.get("errors") >= 6
    assert cap._disabled == {"activations", "commutator defect"}
    assert len(sink.of(wire.FrameKind.UPDATE_SKETCH)) == 2  # the sketches kept going


def test_no_optimizer_mode_uses_explicit_steps() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = Sink()
    cap, _ = make_capture(model, None, sink)
    gen = torch.Generator().manual_seed(1)
    cap.on_step()  # first call: the reference point
    for _ in range(4):
        model(torch.randn(4, 6, generator=gen)).sum().backward()
        opt.step()
        opt.zero_grad()
        cap.on_step()
    cap.finish()
    (frame,) = sink.of(wire.FrameKind.UPDATE_SKETCH)
    assert frame.info["steps"] == [2, 3, 4, 5]
    assert frame.info["update"] == "since_previous_row"


@pytest.mark.parametrize("exact", [True, False])
def test_no_optimizer_rows_span_since_the_previous_row_across_theta_steps(exact: bool) -> None:
    """Without an optimizer (``monitor.step()``), ``update_every=4``, ``theta_every=6``: the row
    at step 8 was ``theta_8 - theta_6`` (the theta-only step's sketch became its start); it is
    ``theta_8 - theta_4``, the change since the previous row, as the frame says."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = Sink()
    cap, _ = make_capture(
        model, None, sink, exact=exact, update_every=4, theta_every=6, frame_steps=1
    )
    assert exact or cap.wait_index(30)
    thetas = {}
    for n in range(1, 13):
        model(torch.randn(5, 3)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        thetas[n] = model.weight.detach().clone().reshape(-1)
        cap.on_step()
    cap.finish()
    rows = {
        f.info["steps"][0]: f.tensors["weight"][0] for f in sink.of(wire.FrameKind.UPDATE_SKETCH)
    }
    assert sorted(rows) == [8, 12]  # step 4 starts the first row
    for step, start in ((8, 4), (12, 8)):
        delta = thetas[step] - thetas[start]
        if exact:
            torch.testing.assert_close(rows[step], delta)
        else:
            assert_sketch_of(rows[step], delta, cap.spec, "weight")


def test_explicit_steps_that_do_not_increase_are_ignored() -> None:
    """As a late ``log(step=...)``: a frame's rows keep increasing steps, no row twice; a first
    explicit step may be 0."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = Sink()
    cap, stats = make_capture(model, None, sink)
    gen = torch.Generator().manual_seed(1)
    for s in (0, 1, 2, 10, 5, 6, 11, 11, 12):
        model(torch.randn(4, 6, generator=gen)).sum().backward()
        opt.step()
        opt.zero_grad()
        cap.on_step(s)
    cap.finish()
    steps = [n for f in sink.of(wire.FrameKind.UPDATE_SKETCH) for n in f.info["steps"]]
    assert steps == [1, 2, 10, 11, 12]
    assert stats.get("steps_not_increasing") == 3
    assert stats.get("errors") == 0


def test_compiled_and_wrapped_models_keep_plain_names() -> None:
    """A ``torch.compile`` model: plain parameter names, and the monitor's captures (activation
    probes every 2 steps included) cause no graph break and no recompilation of its forward."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = mlp()
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(compiled.parameters(), lr=0.1)
    sink = Sink()
    cap, stats = make_capture(compiled, opt, sink, probe=torch.randn(3, 6), activations_every=2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        compiled(torch.randn(8, 6, generator=gen)).sum().backward()
        opt.step()
        opt.zero_grad()
    cap.finish()
    assert stats.get("errors") == 0
    (frame,) = sink.of(wire.FrameKind.UPDATE_SKETCH)
    assert "0.weight" in frame.tensors
    assert len(sink.of(wire.FrameKind.ACTIVATIONS)) == 2
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 1  # the probes never re-traced the forward


@pytest.mark.gpu
def test_cuda_sketch_matches_cpu() -> None:
    model = mlp().cuda().eval()  # no dropout: CUDA and CPU draw different masks
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = Sink()
    cap, _ = make_capture(model, opt, sink)
    cpu_model = copy.deepcopy(model).cpu()
    cpu_opt = torch.optim.SGD(cpu_model.parameters(), lr=0.1)
    cpu_sink = Sink()
    cpu_cap, _ = make_capture(cpu_model, cpu_opt, cpu_sink)
    for m, o in ((model, opt), (cpu_model, cpu_opt)):
        dev = next(m.parameters()).device
        m(torch.ones(4, 6, device=dev)).sum().backward()
        o.step()
    cap.finish()
    cpu_cap.finish()
    a = sink.of(wire.FrameKind.UPDATE_SKETCH)[0].tensors[MODEL_KEY]
    b = cpu_sink.of(wire.FrameKind.UPDATE_SKETCH)[0].tensors[MODEL_KEY]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
def test_model_moved_to_cuda_after_attach_is_sketched_on_cuda() -> None:
    """The fused sketcher and its index follow the parameters to their new device."""
    model = mlp().eval()
    cpu_model = copy.deepcopy(model)
    sinks, caps = [], []
    for m in (model, cpu_model):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        sink = Sink()
        cap, stats = make_capture(m, opt, sink)
        assert cap.wait_index(30)
        if m is model:
            m.cuda()  # after attach: parameters move, the optimizer keeps the same objects
        dev = next(m.parameters()).device
        for _ in range(2):
            m(torch.ones(4, 6, device=dev)).sum().backward()
            opt.step()
        cap.finish()
        assert stats.get("errors") == 0
        sinks.append(sink)
        caps.append(cap)
    fused = caps[0]._fused
    assert fused is not None
    assert fused.device.type == "cuda"
    a, b = (s.of(wire.FrameKind.UPDATE_SKETCH)[0].tensors[MODEL_KEY] for s in sinks)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_index_built_off_the_step_and_steps_skipped_until_ready(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Above ``index_inline_max`` the index is built on a thread; steps taken before it is ready
    are skipped and counted (never waited for), then rows are exact one-step updates again."""
    import threading
    import time

    from spectrawatch import _sketch_triton

    release = threading.Event()
    real = _sketch_triton.signed_buckets

    def held(*args: Any) -> torch.Tensor:  # the fused sketcher's index, built on its thread
        assert threading.current_thread() is not threading.main_thread()
        release.wait(30)
        return real(*args)

    monkeypatch.setattr(_sketch_triton, "signed_buckets", held)
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sink = Sink()
    cap, stats = make_capture(model, opt, sink, index_inline_max=0, theta_every=2)
    thetas: list[dict[str, torch.Tensor]] = []
    t0 = time.perf_counter()
    train(model, opt, 3, record=thetas)  # the index is held: these steps must not wait for it
    assert time.perf_counter() - t0 < 5
    assert stats.get("sketch_steps_skipped") == 3
    release.set()
    assert cap.wait_index(30)
    thetas.pop()
    train(model, opt, 5, record=thetas)
    cap.finish()
    frames = sink.of(wire.FrameKind.UPDATE_SKETCH)
    assert [s for f in frames for s in f.info["steps"]] == [4, 5, 6, 7, 8]
    assert [s for f in sink.of(wire.FrameKind.PARAM_SKETCH) for s in f.info["steps"]] == [4, 6, 8]
    spec = SketchSpec(640, 0)
    for row, step in enumerate([4, 5, 6, 7]):  # thetas[i] is theta after step i
        for name in ("0.weight", "3.bias"):
            delta = thetas[step][name].double() - thetas[step - 1][name].double()
            assert_sketch_of(frames[0].tensors[name][row], delta, spec, name)
    assert stats.get("errors") == 0


@pytest.mark.parametrize("exact", [False, True])
def test_parameters_that_change_after_attach_are_followed(exact: bool) -> None:
    """Unfrozen, replaced (a new nn.Parameter) and resized (same Parameter, new shape) after
    attach: rows are of the live parameters from the step of the change on (the pre-step hook
    sees the change); before the fix they were missing, zero, or truncated (session-6 audit)."""
    model = mlp()
    model[0].weight.requires_grad_(False)  # frozen at attach
    opt = torch.optim.SGD(list(model.parameters()), lr=0.1)
    sink = Sink()
    cap, stats = make_capture(model, opt, sink, exact=exact, frame_steps=1)
    assert cap.wait_index(30)
    thetas: list[dict[str, torch.Tensor]] = []  # per train() call: before each step, then after
    train(model, opt, 2, record=thetas)  # steps 1-2: thetas 0..2
    model[0].weight.requires_grad_(True)  # unfrozen
    train(model, opt, 2, record=thetas)  # steps 3-4: thetas 3..5
    model[3] = nn.Linear(12, 3)  # replaced; the optimizer follows the new parameters
    opt.param_groups[0]["params"] = list(model.parameters())
    train(model, opt, 2, record=thetas)  # steps 5-6: thetas 6..8
    with torch.no_grad():  # resized in place (as resize_token_embeddings does)
        model[3].weight.data = torch.randn(5, 12)
        model[3].bias.data = torch.zeros(5)
    train(model, opt, 2, record=thetas)  # steps 7-8: thetas 9..11
    cap.finish()
    frames = {f.info["steps"][0]: f for f in sink.of(wire.FrameKind.UPDATE_SKETCH)}
    spec = SketchSpec(640, 0)
    everything = {"0.weight", "0.bias", "3.weight", "3.bias"}

    def check(step: int, before: int, shape: list[int]) -> None:
        frame = frames[step]
        assert set(frame.tensors) == everything | {MODEL_KEY}
        assert frame.info["layers"]["3.weight"]["shape"] == shape
        for name in everything:
            delta = (thetas[before + 1][name].double() - thetas[before][name].double()).reshape(-1)
            got = frame.tensors[name][0].double()
            ref = delta.float().double() if exact else reference_sketch(delta, spec, name)
            tol = 1e-6 * (1 + float(ref.abs().max()))
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=tol)

    assert set(frames[2].tensors) == everything - {"0.weight"} | {MODEL_KEY}  # frozen
    for step, before, shape in ((3, 3, [3, 12]), (4, 4, [3, 12]), (5, 6, [3, 12]),
                                (6, 7, [3, 12]), (7, 9, [5, 12]), (8, 10, [5, 12])):  # fmt: skip
        check(step, before, shape)
    assert stats.get("layout_changes") == 3


def test_a_lazy_module_attached_before_its_first_forward_is_captured_once_materialised() -> None:
    """``attach`` before a ``nn.LazyLinear``'s first forward raised on the uninitialized
    parameter's shape and turned every capture off; the lazy layer now joins at the step its
    forward gives it a shape (the pre-step hook sees it), with exact update rows and weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.LazyLinear(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = Sink()
    cap, stats = make_capture(model, opt, sink, weights_every=2, frame_steps=1)
    assert [n for n, _ in cap.layers] == ["0.weight", "0.bias"]
    thetas: list[dict[str, torch.Tensor]] = []
    train(model, opt, 4, record=thetas)
    cap.finish()
    names = ["0.weight", "0.bias", "2.weight", "2.bias"]
    spec = SketchSpec(640, 0)
    updates = sink.of(wire.FrameKind.UPDATE_SKETCH)
    assert [f.info["steps"] for f in updates] == [[1], [2], [3], [4]]
    for frame in updates:
        body = wire.encode_frame(frame.kind, frame.step, 0, frame.tensors, frame.info)
        header, tensors = wire.decode_frame(body)
        wire.validate_layout(header)
        assert set(tensors) == {*names, MODEL_KEY}
        assert header.info["layers"]["2.weight"] == {"numel": 36, "shape": [3, 12]}
        step = frame.step
        for name in names:
            delta = thetas[step][name].double() - thetas[step - 1][name].double()
            assert_sketch_of(tensors[name][0], delta, spec, name)
    weights = {f.step: f for f in sink.of(wire.FrameKind.WEIGHTS)}
    assert sorted(weights) == [2, 4]
    for step, frame in weights.items():
        _, tensors = wire.decode_frame(
            wire.encode_frame(frame.kind, step, 0, frame.tensors, frame.info)
        )
        assert torch.equal(tensors["2.weight"], thetas[step]["2.weight"])
    assert frame.info["output_layer"] == "2.weight"
    assert stats.get("layout_changes") == 1
    assert stats.get("errors") == 0


def _cuda_run(steps: int, *, sketch_stream: bool, clamp: bool = False) -> tuple[Sink, ClientStats]:
    model = mlp().cuda().eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = Sink()
    cap, stats = make_capture(model, opt, sink, sketch_stream=sketch_stream, theta_every=3)
    assert cap.wait_index(30)
    gen = torch.Generator().manual_seed(5)
    for _ in range(steps):
        model(torch.randn(16, 6, generator=gen).cuda()).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        if clamp:
            with torch.no_grad():
                model[0].weight.clamp_(-0.3, 0.3)  # a write outside optimizer.step()
    cap.finish()
    assert stats.get("errors") == 0
    return sink, stats


@pytest.mark.gpu
def test_cuda_side_stream_sends_the_rows_of_the_training_stream() -> None:
    """Sketching on the side stream, with asynchronous copies, changes no row and no order."""
    side, side_stats = _cuda_run(18, sketch_stream=True)
    main, _ = _cuda_run(18, sketch_stream=False)
    assert side_stats.get("sketch_stream_off") == 0
    for kind in (wire.FrameKind.UPDATE_SKETCH, wire.FrameKind.PARAM_SKETCH):
        a, b = side.of(kind), main.of(kind)
        assert [f.info["steps"] for f in a] == [f.info["steps"] for f in b]
        assert a
        for fa, fb in zip(a, b, strict=True):
            assert fa.tensors.keys() == fb.tensors.keys()
            for k, t in fa.tensors.items():
                assert t.device.type == "cpu"
                torch.testing.assert_close(t, fb.tensors[k], rtol=1e-12, atol=1e-12)
    steps = [s for f in side.of(wire.FrameKind.UPDATE_SKETCH) for s in f.info["steps"]]
    assert steps == list(range(1, 19))  # the pre-step hook sketched theta_0


def _graph_run(steps: int, *, graph: bool, swap_at: int = 0) -> tuple[Sink, ClientStats, Capture]:
    """A model with tensors for both Triton kernels (a 256 x 256 weight is over one band of
    rows); at step ``swap_at`` one weight gets new storage (``.data =``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(),
                          nn.Linear(256, 3)).cuda()  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sink = Sink()
    cap, stats = make_capture(model, opt, sink, sketch_graph=graph, theta_every=3)
    assert cap.wait_index(30)
    gen = torch.Generator().manual_seed(5)
    for step in range(1, steps + 1):
        if step == swap_at:
            with torch.no_grad():
                model[2].weight.data = model[2].weight.data.clone()
        model(torch.randn(16, 6, generator=gen).cuda()).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    cap.finish()
    assert stats.get("errors") == 0
    return sink, stats, cap


@pytest.mark.gpu
@pytest.mark.parametrize("swap_at", [0, 7])
def test_cuda_graphed_sketch_sends_the_rows_of_the_eager_one(swap_at: int) -> None:
    """The sketch replayed from a CUDA graph changes no row; new storage means a new capture."""
    graphed, stats, cap = _graph_run(12, graph=True, swap_at=swap_at)
    eager, _, eager_cap = _graph_run(12, graph=False, swap_at=swap_at)
    assert cap._graphed.error is None
    assert stats.get("sketch_graph_off") == 0
    assert cap._graphed.captures == (2 if swap_at else 1)
    assert eager_cap._graphed.captures == 0
    for kind in (wire.FrameKind.UPDATE_SKETCH, wire.FrameKind.PARAM_SKETCH):
        a, b = graphed.of(kind), eager.of(kind)
        assert a
        assert [f.info["steps"] for f in a] == [f.info["steps"] for f in b]
        for fa, fb in zip(a, b, strict=True):
            assert fa.tensors.keys() == fb.tensors.keys()
            for k, t in fa.tensors.items():
                torch.testing.assert_close(t, fb.tensors[k], rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
def test_cuda_model_with_a_strided_parameter_is_sketched_eagerly() -> None:
    """A non-contiguous parameter is copied and its launch re-planned on every call: never
    captured (the graph would replay a copy from host memory)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 256), nn.Tanh(), nn.Linear(256, 256)).cuda()
    model[2].weight = nn.Parameter(torch.randn(256, 256, device="cuda").t())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sink = Sink()
    cap, stats = make_capture(model, opt, sink)
    assert cap.wait_index(30)
    for _ in range(6):
        model(torch.randn(16, 6, device="cuda")).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    cap.finish()
    assert stats.get("errors") == 0
    assert cap._graphed.captures == 0
    assert not cap._graphed.enabled
    assert cap._graphed.error is None
    steps = [s for f in sink.of(wire.FrameKind.UPDATE_SKETCH) for s in f.info["steps"]]
    assert steps == list(range(1, 7))


def test_graphed_sketch_is_off_the_gpu_and_when_disabled() -> None:
    from spectrawatch._overlap import GraphedSketch

    calls: list[int] = []

    def sketch(xs: list[torch.Tensor]) -> torch.Tensor:
        calls.append(1)
        return torch.zeros(len(xs), 4, dtype=torch.float64)

    params = [torch.zeros(3)]
    for g in (GraphedSketch(True), GraphedSketch(False)):
        assert all(g(sketch, params) is None for _ in range(3))
        assert g.captures == 0
        assert g.error is None
    assert not calls  # the caller sketches eagerly


@pytest.mark.gpu
def test_cuda_parameter_written_outside_the_step_turns_the_side_stream_off() -> None:
    sink, stats = _cuda_run(10, sketch_stream=True, clamp=True)
    assert stats.get("sketch_stream_off") == 1
    steps = [s for f in sink.of(wire.FrameKind.UPDATE_SKETCH) for s in f.info["steps"]]
    assert steps == list(range(1, 11))


@pytest.mark.gpu
def test_cuda_frame_in_flight_is_released_on_request() -> None:
    """A frame whose rows are still being copied goes out at the next step or when asked."""
    model = mlp().cuda().eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = Sink()
    cap, _ = make_capture(model, opt, sink)
    assert cap.wait_index(30)
    for _ in range(4):  # frame_steps = 4: the frame is cut at step 4, its copy started
        model(torch.ones(4, 6, device="cuda")).sum().backward()
        opt.step()
    cap.release_frames()
    (frame,) = sink.of(wire.FrameKind.UPDATE_SKETCH)
    assert frame.info["steps"] == [1, 2, 3, 4]
    cap.finish()


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_captures_share_one_fork_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    """One module fork hook, not one per capture (fork hooks cannot be unregistered, and a
    process re-attaching or making many runs would run them all at every fork): in a forked
    child every live capture is inert, and the registry keeps none alive."""
    hooks: list[dict[str, Any]] = []
    monkeypatch.setattr(os, "register_at_fork", lambda **kw: hooks.append(kw))
    caps = []
    for _ in range(10):
        model = nn.Linear(3, 3)
        cap, _ = make_capture(model, torch.optim.SGD(model.parameters(), lr=0.1), Sink())
        assert cap.wait_index(30)
        cap.remove()
        caps.append(cap)
    assert hooks == []
    monkeypatch.undo()
    del cap
    gone = weakref.ref(caps.pop())
    gc.collect()
    assert gone() is None
    pid = os.fork()
    if pid == 0:
        os._exit(0 if all(c._forked for c in caps) else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not any(c._forked for c in caps)


def test_a_weights_failure_of_this_rank_still_joins_every_gather(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under FSDP2 a failure of the sending rank's own work (the host copy) left the weight
    loop before the remaining gathers, which the other ranks still joined: a collective
    mismatch that aborted them. Every parameter is gathered; the failure is recorded; and a
    sharded model's capture stays on after repeated failures (per-rank counts would diverge)."""
    from spectrawatch import _shards, _weights

    gathered: list[tuple[int, ...]] = []
    real = _shards.full_tensor
    monkeypatch.setattr(_shards, "full_tensor", lambda t: gathered.append(t.shape) or real(t))

    def fail(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        raise RuntimeError("host copy failed")

    monkeypatch.setattr(_weights, "_host_weight", fail)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = Sink()
    cap, stats = make_capture(model, opt, sink, weights_every=1, update_every=0)
    cap.sharded = True
    train(model, opt, 4)
    assert gathered == [(12, 6), (3, 12)] * 4  # both matrices at each of the 4 steps
    assert sink.of(wire.FrameKind.WEIGHTS) == []
    assert stats.snapshot()["errors"] >= 4
    assert "weights" not in cap._disabled
