"""The worker's whole-model values of weight snapshots that leave frozen weights out.

A frozen weight goes in the first snapshot and again only when it changes; later snapshots name
it in ``info["unchanged"]``, and each analysis's summary carries its values forward, so the
``__model__`` series of a LoRA-style run match those of the same run sending every weight each
time (``weights_frozen_every=True``). Real client capture, real worker, real database.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from torch import nn

from spectrawatch import wire
from spectrawatch.spectral.conditioning import GMCN
from spectrawatch.spectral.htsr import ALPHA, NUM_LAYERS
from spectrawatch.spectral.subspace import SUBSPACE_DRIFT
from spectrawatch_server.db.models import Frame, Metric
from spectrawatch_server.storage import repository as repo
from spectrawatch_server.storage.blobs import LocalBlobStore
from spectrawatch_server.storage.repository import unchanged_since
from spectrawatch_server.worker import FrameLoader, Worker
from tests.servers import DATABASES, migrated_sessions
from tests.unit.test_client_capture import Sink, make_capture

BASE = ["base.0.weight", "base.1.weight", "base.2.weight"]
ADAPTERS = ["lora.0.weight", "lora.1.weight"]


@pytest.fixture(params=DATABASES)
def sessions(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """Sessions of a migrated SQLite database, and PostgreSQL where one is named."""
    with migrated_sessions(request.param, tmp_path, "sw_frozen") as factory:
        yield factory


def lora_toy() -> nn.Module:
    """A frozen base of three 128 x 96 layers, each with a strong rank-2 part (spikes above the
    MP bulk, so subspace drift applies), and two trainable 96 x 96 adapters."""
    torch.manual_seed(0)
    base = nn.Sequential(*(nn.Linear(96, 128, bias=False) for _ in range(3)))
    with torch.no_grad():
        for layer in base:
            u, v = torch.randn(128, 2), torch.randn(2, 96)
            layer.weight.add_(u @ v * 0.05)
    base.requires_grad_(False)
    lora = nn.Sequential(*(nn.Linear(96, 96, bias=False) for _ in range(2)))
    return nn.ModuleDict({"base": base, "lora": lora})


def captured(**settings: object) -> list[wire.FrameItem]:
    """The weight frames of two snapshots of the toy (steps 10 and 20), the adapters trained in
    between (the same weights whatever the settings)."""
    model, sink = lora_toy(), Sink()
    cap, _ = make_capture(model, None, sink, **settings)
    cap.capture_weights(10)
    with torch.no_grad():
        for p in model["lora"].parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    cap.capture_weights(20)
    return sink.of(wire.FrameKind.WEIGHTS)


def analysed(
    sessions: sessionmaker[Session], tmp_path: Path, frames: list[wire.FrameItem], order: str
) -> dict[int, dict[tuple[str, str], float]]:
    """``{step: {(analysis, name): value}}`` of the ``__model__`` layer after the worker
    analysed ``frames`` in a new run (a snapshot's parts in ``order``: as sent or reversed)."""
    store = LocalBlobStore(tmp_path / "blobs")
    with sessions.begin() as session:
        project, _ = repo.get_or_create_project(session, "p")
        run_id = repo.get_or_create_run(session, project, tmp_path.name, {}, [])[0].id
    ids: dict[int, list[int]] = {}
    for seq, item in enumerate(frames):
        body = wire.encode_frame(item.kind, item.step, seq, item.tensors, item.info)
        key = f"runs/{run_id}/{seq}.st"
        upload = store.new_upload()
        upload.write(body)
        store.commit_upload(upload, key)
        with sessions.begin() as session:
            row = Frame(
                run_id=run_id,
                kind=item.kind.value,
                step=item.step,
                seq=seq,
                idempotency_key=f"{run_id}:{seq}",
                blob_key=key,
                bytes=len(body),
                info=item.info,
                layers=list(item.tensors),
                nonfinite={},
            )
            session.add(row)
            session.flush()
            ids.setdefault(item.step, []).append(row.id)
    loader = FrameLoader(store, torch.device("cpu"), wire.FrameLimits(), 1 << 26, 0)
    worker = Worker(sessions, loader)
    for step in sorted(ids):
        for frame_id in ids[step] if order == "sent" else reversed(ids[step]):
            worker.process(frame_id)
    with sessions() as session:
        rows = session.execute(
            select(Metric.step, Metric.analysis, Metric.name, Metric.value).where(
                Metric.run_id == run_id, Metric.layer == wire.MODEL_LAYER
            )
        ).all()
    out: dict[int, dict[tuple[str, str], float]] = {}
    for step, analysis, name, value in rows:
        out.setdefault(step, {})[analysis, name] = value
    return out


@pytest.mark.parametrize(("max_frame_bytes", "order"), [(1 << 25, "sent"), (40_000, "reversed")])
def test_model_values_of_a_lora_run_match_those_sending_every_frozen_weight(
    sessions: sessionmaker[Session], tmp_path: Path, max_frame_bytes: int, order: str
) -> None:
    """The second snapshot holds the adapters alone: its ``__model__`` alpha mean and layer
    count covered them only (htsr.num_layers 5 -> 2), and the subspace drift mean left out the
    frozen layers, which did not move. With their values carried forward every whole-model
    value equals the run's that sends the frozen base each time, also for a snapshot split in
    parts analysed in any order."""
    lean = captured(max_frame_bytes=max_frame_bytes)
    full = captured(max_frame_bytes=max_frame_bytes, weights_frozen_every=True)
    later = [f for f in lean if f.step == 20]
    assert {n for f in later for n in f.tensors} == set(ADAPTERS)
    assert len(later) == (1 if max_frame_bytes > 1 << 20 else 2)
    assert later[0].info["unchanged"] == dict.fromkeys(BASE, 10)

    got = analysed(sessions, tmp_path / "lean", lean, order)
    want = analysed(sessions, tmp_path / "full", full, order)
    assert got[20][("htsr", NUM_LAYERS)] == 5
    assert ("subspace", SUBSPACE_DRIFT) in want[20]
    assert ("conditioning", GMCN) in want[20]
    for step in (10, 20):  # equal but for the order of the sums
        assert got[step].keys() == want[step].keys()
        for key, value in want[step].items():
            assert got[step][key] == pytest.approx(value, rel=1e-9, abs=1e-12), (step, key)
    assert got[20][("htsr", ALPHA)] != pytest.approx(got[10][("htsr", ALPHA)], abs=1e-9)


def test_unchanged_entries_are_validated() -> None:
    """Names the snapshot holds, odd names and steps not before the snapshot are ignored; a
    layer named in two parts keeps its latest step."""
    entries: list[object] = [
        {"a": 10, "held": 10, "late": 20, "neg": -1, "flt": 1.5, "": 3, "bad\x00": 3},
        {"a": 15, "__model__": 3, "x" * 501: 3, "b": True},
        ["a"],
        None,
    ]
    assert unchanged_since(entries, 20, {"held"}) == {"a": 15}
