"""Top-subspace drift between weight snapshots: exact (eigh) and Polar Express paths.

References: matrices with planted spikes whose directions are rotated by a known angle (drift =
sin^2(theta) / k), numpy's SVD for the spike bases and scipy's principal angles.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from spectrawatch.spectral.conditioning import mp_spike_threshold
from spectrawatch.spectral.subspace import (
    SUBSPACE_DRIFT,
    SUBSPACE_RANK,
    basis_drift,
    top_subspace,
    weight_subspace_drift,
)
from spectrawatch.wire import FrameKind, FrameLimits, encode_frame
from spectrawatch_server import worker as worker_module
from spectrawatch_server.analyses.registry import (
    MODEL_LAYER,
    DecodedFrame,
    MetricValue,
    analyses_for,
)
from spectrawatch_server.analyses.subspace import weight_subspace
from spectrawatch_server.db.models import Frame, Metric
from spectrawatch_server.storage import repository as repo
from spectrawatch_server.storage.blobs import LocalBlobStore
from spectrawatch_server.worker import FrameLoader, Worker
from tests.history import StubHistory, decoded_frame
from tests.servers import DATABASES, migrated_sessions

M, N, K = 300, 120, 4


def _spiked(v: np.ndarray, seed: int, strength: float = 6.0, noise: int = 0) -> np.ndarray:
    """``(M, N)`` noise of unit-variance entries plus ``v.shape[1]`` strong rank-one spikes along
    the right directions ``v`` ``(N, k)`` (left directions random)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((M, v.shape[1])))
    scale = strength * math.sqrt(M * N) / math.sqrt(v.shape[1])
    return rng.standard_normal((M, N)) * (1 if noise == 0 else noise) + (u * scale) @ v.T


def _numpy_drift(a: np.ndarray, b: np.ndarray) -> float:
    """Independent reference: numpy SVD, spike count from the MP threshold, overlap of bases."""

    def basis(w: np.ndarray) -> np.ndarray:
        _, s, vt = np.linalg.svd(w, full_matrices=False)
        eig = s**2 / w.shape[0]
        k = int((eig > mp_spike_threshold(w.shape, float((w**2).sum()))).sum())
        return vt[:k].T

    ba, bb = basis(a), basis(b)
    k = max(ba.shape[1], bb.shape[1])
    return 1 - float(np.linalg.norm(ba.T @ bb) ** 2) / k


def _directions(seed: int, k: int = K + 1) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((N, k)))
    return q


@pytest.mark.parametrize("theta", [0.0, 0.3, 0.8, math.pi / 2])
def test_rotating_one_spike_direction_gives_sin_squared_over_k(theta: float) -> None:
    q = _directions(1)
    v_before = q[:, :K]
    v_after = v_before.copy()
    v_after[:, 0] = math.cos(theta) * q[:, 0] + math.sin(theta) * q[:, K]
    a, b = _spiked(v_before, 2), _spiked(v_after, 3)
    got = weight_subspace_drift(torch.from_numpy(a), torch.from_numpy(b))
    assert (got.rank_before, got.rank_after) == (K, K)
    assert got.drift == pytest.approx(_numpy_drift(a, b), abs=1e-9)
    # the noise tilts the estimated directions slightly: 0.01 absolute covers it at this SNR
    assert got.drift == pytest.approx(math.sin(theta) ** 2 / K, abs=0.01)


def test_equal_ranks_drift_is_mean_squared_sine_of_principal_angles() -> None:
    a = _spiked(_directions(4)[:, :K], 5)
    b = _spiked(_directions(6)[:, :K], 7)
    ta, tb = top_subspace(torch.from_numpy(a)), top_subspace(torch.from_numpy(b))
    angles = scipy.linalg.subspace_angles(ta.numpy(), tb.numpy())
    assert basis_drift(ta, tb).drift == pytest.approx(float(np.mean(np.sin(angles) ** 2)), abs=1e-9)


def test_a_new_spike_counts_as_one_over_k_and_orientation_does_not_matter() -> None:
    q = _directions(8)
    a, b = _spiked(q[:, :K], 9), _spiked(q[:, : K + 1], 10)
    got = weight_subspace_drift(torch.from_numpy(a), torch.from_numpy(b))
    assert (got.rank_before, got.rank_after) == (K, K + 1)
    assert got.drift == pytest.approx(1 / (K + 1), abs=0.01)
    wide = weight_subspace_drift(torch.from_numpy(a.T.copy()), torch.from_numpy(b.T.copy()))
    assert wide.drift == pytest.approx(got.drift, abs=1e-9)


def test_pure_noise_has_no_spike_subspace() -> None:
    rng = np.random.default_rng(11)
    a, b = (torch.from_numpy(rng.standard_normal((M, N))) for _ in range(2))
    with pytest.raises(ValueError, match="no spikes"):
        weight_subspace_drift(a, b)
    with pytest.raises(ValueError, match="shapes differ"):
        weight_subspace_drift(a, b[:, :-1])


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 2e-3), (torch.bfloat16, 0.03)])
def test_polar_express_projectors_agree_with_exact_eigenvectors(
    dtype: torch.dtype, tol: float
) -> None:
    q = _directions(12)
    v_after = q[:, :K].copy()
    v_after[:, 1] = math.cos(0.6) * q[:, 1] + math.sin(0.6) * q[:, K]
    a = torch.from_numpy(_spiked(q[:, :K], 13)).float()
    b = torch.from_numpy(_spiked(v_after, 14)).float()
    exact = weight_subspace_drift(a, b)
    fast = weight_subspace_drift(a, b, polar=True, dtype=dtype)
    assert (fast.rank_before, fast.rank_after) == (K, K)
    assert fast.drift == pytest.approx(exact.drift, abs=tol)


def _weights_frame(
    step: int, tensors: dict[str, np.ndarray], frame_id: int | None = None
) -> DecodedFrame:
    as_torch = {name: torch.from_numpy(t).float() for name, t in tensors.items()}
    return decoded_frame(FrameKind.WEIGHTS, step, as_torch, frame_id=frame_id or step)


def _summary(per_layer: list[MetricValue]) -> dict[str, float]:
    """The registered whole-model summary of a step's per-layer values, as the worker makes it."""
    registered = next(a for a in analyses_for(FrameKind.WEIGHTS) if a.name == "subspace")
    assert registered.summarize is not None
    layers: dict[str, dict[str, float]] = {}
    for m in per_layer:
        layers.setdefault(m.layer, {})[m.name] = m.value
    return registered.summarize(layers)


def test_analysis_compares_with_the_previous_weight_frame() -> None:
    q = _directions(15)
    rotated = q[:, :K].copy()
    rotated[:, 0] = q[:, K]
    noise = np.random.default_rng(16).standard_normal((M, N))
    first = _weights_frame(
        100, {"a": _spiked(q[:, :K], 17), "b": _spiked(q[:, :K], 18), "n": noise}
    )
    second = _weights_frame(
        200,
        {
            "a": _spiked(q[:, :K], 19),  # same directions: drift ~ 0
            "b": _spiked(rotated, 20),  # one of K directions replaced: drift ~ 1/K
            "n": noise,  # no spikes: skipped
            "new": noise,  # not in the previous frame: skipped
        },
    )
    assert weight_subspace(first, StubHistory()).metrics == []
    per_layer = weight_subspace(second, StubHistory([first])).metrics
    metrics = {(m.layer, m.name): m.value for m in per_layer}
    assert set(metrics) == {
        ("a", SUBSPACE_DRIFT),
        ("a", SUBSPACE_RANK),
        ("b", SUBSPACE_DRIFT),
        ("b", SUBSPACE_RANK),
    }  # the model value: the worker's summarize step, over every part of the snapshot
    assert metrics[("a", SUBSPACE_DRIFT)] < 0.01
    assert metrics[("b", SUBSPACE_DRIFT)] == pytest.approx(1 / K, abs=0.01)
    assert metrics[("b", SUBSPACE_RANK)] == K
    mean = (metrics[("a", SUBSPACE_DRIFT)] + metrics[("b", SUBSPACE_DRIFT)]) / 2
    assert _summary(per_layer) == {SUBSPACE_DRIFT: pytest.approx(mean)}
    assert _summary([]) == {}


def _snapshot(step: int, seed: int) -> dict[str, np.ndarray]:
    """Layers a-d with spikes along directions turned by a layer- and step-dependent angle
    (every layer drifts differently between snapshots), and a spike-free one."""
    q = _directions(21)
    out = {}
    for i, layer in enumerate("abcd"):
        theta = 0.15 * (i + 1) * step / 100
        v = q[:, :K].copy()
        v[:, 0] = math.cos(theta) * q[:, 0] + math.sin(theta) * q[:, K]
        out[layer] = _spiked(v, seed + i)
    out["noise"] = np.random.default_rng(seed + 9).standard_normal((M, N))
    return out


PARTS = [["a", "b"], ["c"], ["d", "noise"]]  # how the client splits a snapshot into frames


def test_each_layer_of_a_split_snapshot_compares_with_its_own_previous_part() -> None:
    """A snapshot over ``max_frame_bytes`` arrives in parts holding other layers: each part
    was compared with the previous frame (another part), so most layers had no drift."""
    before, after = _snapshot(100, 30), _snapshot(200, 40)
    old = [_weights_frame(100, {k: before[k] for k in p}, 1 + i) for i, p in enumerate(PARTS)]
    new = [_weights_frame(200, {k: after[k] for k in p}, 4 + i) for i, p in enumerate(PARTS)]
    per_layer: list[MetricValue] = []
    for i, part in enumerate(new):  # history: the earlier frames, this step's parts included
        per_layer += weight_subspace(part, StubHistory(old + new[:i], step=200)).metrics
    got = {m.layer: m.value for m in per_layer if m.name == SUBSPACE_DRIFT}
    assert got.keys() == set("abcd")
    for layer in "abcd":
        want = weight_subspace_drift(*(torch.from_numpy(s[layer]).float() for s in (before, after)))
        assert got[layer] == pytest.approx(want.drift, abs=1e-12), layer
    assert _summary(per_layer) == {SUBSPACE_DRIFT: pytest.approx(sum(got.values()) / 4)}


@pytest.fixture(params=DATABASES)
def sessions(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """Sessions of a migrated database: SQLite (as ``tests/unit/conftest.py``'s), and
    PostgreSQL where ``SPECTRAWATCH_TEST_POSTGRES_URL`` names a server."""
    with migrated_sessions(request.param, tmp_path, "sw_subspace") as factory:
        yield factory


def _store_frame(
    sessions: sessionmaker[Session],
    store: LocalBlobStore,
    run_id: int,
    step: int,
    seq: int,
    tensors: dict[str, np.ndarray],
) -> int:
    """A weights frame of ``tensors`` (float32) in the blob store and the database; its id."""
    as_torch = {k: torch.from_numpy(v).float() for k, v in tensors.items()}
    body = encode_frame(FrameKind.WEIGHTS, step, seq, as_torch, {"dtype": "float32"})
    key = f"runs/{run_id}/{seq}.st"
    upload = store.new_upload()
    upload.write(body)
    store.commit_upload(upload, key)
    with sessions.begin() as session:
        frame = Frame(
            run_id=run_id,
            kind=FrameKind.WEIGHTS.value,
            step=step,
            seq=seq,
            idempotency_key=f"{run_id}:{seq}",
            blob_key=key,
            bytes=len(body),
            info={"dtype": "float32"},
            layers=list(tensors),
            nonfinite={},
        )
        session.add(frame)
        session.flush()
        return frame.id


class _CountingLoader(FrameLoader):
    """A frame loader recording the ids of the frames it decodes."""

    def __init__(self, store: LocalBlobStore) -> None:
        super().__init__(store, torch.device("cpu"), FrameLimits(), 1 << 26, 0)
        self.decoded: list[int] = []

    def _load(self, frame: Frame) -> DecodedFrame:
        self.decoded.append(frame.id)
        return super()._load(frame)


def _new_run(sessions: sessionmaker[Session]) -> int:
    with sessions.begin() as session:
        project, _ = repo.get_or_create_project(session, "p")
        return repo.get_or_create_run(session, project, "r", {}, [])[0].id


def _stored_drift(
    sessions: sessionmaker[Session], run_id: int
) -> dict[tuple[str, int], list[float]]:
    with sessions() as session:
        rows = session.execute(
            select(Metric.layer, Metric.step, Metric.value).where(
                Metric.run_id == run_id, Metric.name == SUBSPACE_DRIFT
            )
        ).all()
    out: dict[tuple[str, int], list[float]] = {}
    for layer, step, value in rows:
        out.setdefault((layer, step), []).append(value)
    return out


@pytest.mark.parametrize("parts", [PARTS, [[name for p in PARTS for name in p]]])
def test_worker_drift_of_every_layer_and_one_model_mean_per_step(
    sessions: sessionmaker[Session],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    parts: list[list[str]],
) -> None:
    """Through the worker and a real database: each part decodes itself and the one earlier
    part holding its layers; every layer drifts against its own previous snapshot, and the step
    has one whole-model drift, the mean over all parts' layers (a single-frame snapshot: the
    same values as before snapshots were split)."""
    subspace = [a for a in analyses_for(FrameKind.WEIGHTS) if a.name == "subspace"]
    monkeypatch.setattr(worker_module, "analyses_for", lambda kind: subspace)  # this one alone
    store = LocalBlobStore(tmp_path / "blobs")
    loader = _CountingLoader(store)
    worker = Worker(sessions, loader)
    run_id = _new_run(sessions)
    snapshots = {100: _snapshot(100, 30), 200: _snapshot(200, 40), 300: _snapshot(300, 50)}
    ids: dict[tuple[int, int], int] = {}
    decoded: dict[int, list[int]] = {}  # frame -> the frames decoded to analyse it
    for step, tensors in snapshots.items():
        for i, part in enumerate(parts):
            seq = len(ids)
            ids[step, i] = _store_frame(
                sessions, store, run_id, step, seq, {k: tensors[k] for k in part}
            )
    for step in (100, 300, 200):  # out of step order: the worker may be behind
        for i in reversed(range(len(parts))):  # and a snapshot's parts in any order
            loader.decoded.clear()
            worker.process(ids[step, i])
            decoded[ids[step, i]] = list(loader.decoded)
    stored = _stored_drift(sessions, run_id)
    for step in (200, 300):
        before, after = snapshots[step - 100], snapshots[step]
        want = {
            layer: weight_subspace_drift(
                torch.from_numpy(before[layer]).float(), torch.from_numpy(after[layer]).float()
            ).drift
            for layer in "abcd"
        }
        for layer in "abcd":
            assert stored[layer, step] == [pytest.approx(want[layer], abs=1e-12)], layer
        assert stored[MODEL_LAYER, step] == [sum(want[k] for k in "abcd") / 4]
    assert {key for key in stored if key[1] == 100} == set()
    assert ("noise", 200) not in stored
    for (step, i), frame_id in ids.items():
        assert decoded[frame_id] == [frame_id, *([ids[step - 100, i]] if step > 100 else [])]


def test_frames_holding_pages_to_each_layers_newest_earlier_frame(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages of 1 then 3 rows; a seq sent twice with a page ending between its frames; frames
    at or above the step, of other kinds or without a blob skipped."""
    monkeypatch.setattr(repo, "HOLDING_PAGES", (1, 3))
    run_id = _new_run(sessions)
    layout = [  # (step, seq, layers, blob)
        (10, 0, ["a", "b"], True),
        (10, 1, ["c"], True),
        (20, 2, ["a"], True),
        (20, 3, ["b"], False),  # pruned
        (20, 4, ["c"], True),
        (20, 4, ["b"], True),  # the same seq again
        (30, 5, ["x"], True),
        (30, 6, ["y"], True),
        (40, 7, ["a"], True),  # the analysed frame's step
        (30, 8, ["z"], True),  # a resumed run's re-sent step
    ]
    with sessions.begin() as session:
        for n, (step, seq, layers, blob) in enumerate(layout):
            session.add(
                Frame(
                    run_id=run_id,
                    kind="weights",
                    step=step,
                    seq=seq,
                    idempotency_key=f"k{n}",
                    blob_key=f"b{n}" if blob else "",
                    bytes=1,
                    info={},
                    layers=layers,
                    nonfinite={},
                )
            )
    with sessions() as session:
        got = repo.frames_holding(session, run_id, "weights", 9, 40, ["a", "b", "c", "q"])
        assert {k: (f.step, f.seq, f.layers) for k, f in got.items()} == {
            "a": (20, 2, ["a"]),
            "b": (20, 4, ["b"]),
            "c": (20, 4, ["c"]),
        }
        assert repo.frames_holding(session, run_id, "weights", 2, 40, ["a", "c"]).keys() == {
            "a",
            "c",
        }
        assert repo.frames_holding(session, run_id, "weights", 9, 10, ["a"]) == {}
        # a frame whose blob the store lost is skipped as a pruned one: the one before it
        lost = {got["a"].id, got["c"].id}
        again = repo.frames_holding(session, run_id, "weights", 9, 40, ["a", "c"], lost)
        assert {k: (f.step, f.seq) for k, f in again.items()} == {"a": (10, 0), "c": (10, 1)}
        assert repo.frames_holding(session, run_id, "activations", 9, 40, ["a"]) == {}
