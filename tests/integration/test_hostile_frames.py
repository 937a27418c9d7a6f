"""Hostile frames and fields found by an input audit: 4xx at the door, and frames the server
accepts (NaN/Inf, overflowing or odd ``info``) never fail the analyses of clean frames."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest

from spectrawatch.wire import FrameKind
from tests.factories import make_run, post_frame, weight_frame
from tests.servers import ServerProcess, db_rows, wait_until

pytestmark = pytest.mark.integration

DEEP = "[" * 100_000 + "]" * 100_000
HUGE_INT = "9" * 5000  # past Python's int-from-string digit limit


def raw_frame(
    meta: dict[str, str] | None,
    tensors: dict[str, np.ndarray[Any, Any]],
    header: str | None = None,
    dtype: str = "F32",
) -> bytes:
    """A hand-built safetensors frame (the header can be anything, unlike ``encode_frame``)."""
    hdr: dict[str, Any] = {"__metadata__": meta}
    data = b""
    for name, array in tensors.items():
        a = np.ascontiguousarray(array, dtype=np.float32 if dtype == "F32" else np.float64)
        hdr[name] = {
            "dtype": dtype,
            "shape": list(a.shape),
            "data_offsets": [len(data), len(data) + a.nbytes],
        }
        data += a.tobytes()
    head = (header if header is not None else json.dumps(hdr)).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + data


def meta(**fields: str) -> dict[str, str]:
    return {"spectrawatch": "1", "kind": "weights", "step": "1", "seq": "0", "info": "{}", **fields}


def sketch(
    seq: int, rows: np.ndarray[Any, Any] | None = None, steps: list[int] | None = None
) -> bytes:
    """An update-sketch frame of 8 steps (two layers of 8 x 64 rows)."""
    rng = np.random.default_rng(seq)
    first = seq * 8
    info = json.dumps({"steps": steps if steps is not None else list(range(first, first + 8))})
    a = rng.standard_normal((8, 64)) if rows is None else rows
    tensors = {"a": a, "b": rng.standard_normal((8, 64))}
    return raw_frame(
        meta(kind="update_sketch", step=str(first + 7), seq=str(seq), info=info), tensors
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("hostile-frames")).start()
    yield proc
    proc.stop()


@pytest.fixture
def api(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{server.url}/api/v1", timeout=60) as client:
        yield client


def _error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["code"] == code, body
    message: str = body["message"]
    return message


def test_unreadable_metadata_and_headers_are_4xx(api: httpx.Client) -> None:
    run_id = make_run(api, name="headers")
    one = {"w": np.ones((2, 2))}
    post = lambda body: api.post(f"/runs/{run_id}/frames", content=body)  # noqa: E731
    for value in ("\u00b2", "\u0663", "-1", "1e3", " 1"):  # superscript, Arabic-Indic digit, ...
        assert "step" in _error(post(raw_frame(meta(step=value), one)), 422, "bad_metadata")
        assert "seq" in _error(post(raw_frame(meta(seq=value), one)), 422, "bad_metadata")
    for info in ('{"x": ' + HUGE_INT + "}", DEEP):
        _error(post(raw_frame(meta(info=info), one)), 422, "bad_metadata")
    m = json.dumps(meta())

    def entry(cols: str) -> str:
        return f'"w": {{"dtype": "F32", "shape": [1, {cols}], "data_offsets": [0, 4]}}'

    for header in (
        f'{{"__metadata__": {m}, {entry("1")}, "x": {DEEP}}}',
        f'{{"__metadata__": {m}, {entry(HUGE_INT)}}}',
    ):
        message = _error(post(raw_frame(None, {}, header=header) + b"\0" * 4), 400, "bad_header")
        assert "JSON" in message
    for steps in ([2**63] * 8, [2**62 + 1] * 8, [True] * 8):
        assert "info.steps" in _error(post(sketch(0, steps=steps)), 422, "bad_metadata")
    assert api.get(f"/runs/{run_id}/frames").json() == []
    assert api.get("/health").status_code == 200


def test_malformed_webhook_urls_are_422(api: httpx.Client) -> None:
    make_run(api, project="hooks", name="r")
    created = api.post("/webhooks", json={"project": "hooks", "url": "https://93.184.216.34/h"})
    assert created.status_code == 201, created.text
    for url in ("http://[::1", "http://[zz]/", "https://[1:2:3]/x"):
        assert "malformed" in _error(
            api.post("/webhooks", json={"project": "hooks", "url": url}), 422, "unsafe_webhook_url"
        )
        _error(
            api.patch(f"/webhooks/{created.json()['id']}", json={"url": url}),
            422,
            "unsafe_webhook_url",
        )
    assert len(api.get("/webhooks", params={"project": "hooks"}).json()) == 1


def test_control_characters_in_stored_text_are_422(api: httpx.Client) -> None:
    """NUL cannot be stored in a PostgreSQL text column: refused on every backend."""
    assert (
        api.post("/runs", json={"project": "p", "name": "t", "tags": ["a\u0000b"]}).status_code
        == 422
    )
    run_id = make_run(api, name="ctl")
    assert api.patch(f"/runs/{run_id}", json={"tags": ["x\u0001"]}).status_code == 422
    for layer in ("l\u0000", ".", ".."):  # NUL; dot segments a browser would resolve away
        row = {"step": 1, "layer": layer, "name": "m", "value": 1.0}
        assert api.post(f"/runs/{run_id}/metrics", json={"rows": [row]}).status_code == 422
    assert api.get(f"/runs/{run_id}").json()["tags"] == []


def test_reused_idempotency_key_with_another_frame_is_409(api: httpx.Client) -> None:
    run_id = make_run(api, name="keys")
    first = post_frame(api, run_id, weight_frame(1, 0), seq=0)
    assert first.status_code == 202, first.text
    replay = post_frame(api, run_id, weight_frame(1, 0), seq=0)
    assert replay.status_code == 200
    assert replay.json()["id"] == first.json()["id"]
    other = post_frame(api, run_id, weight_frame(99, 0), seq=0)  # same key, another step
    assert "step" in _error(other, 409, "idempotency_conflict")
    rows = {"rows": [{"step": 1, "layer": "l", "name": "m", "value": 1.0}]}
    key = {"Idempotency-Key": "batch-1"}
    assert api.post(f"/runs/{run_id}/metrics", json=rows, headers=key).status_code == 202
    again = api.post(f"/runs/{run_id}/metrics", json=rows, headers=key)
    assert again.status_code == 202
    assert again.json()["replayed"] is True
    rows["rows"][0]["value"] = 2.0
    _error(api.post(f"/runs/{run_id}/metrics", json=rows, headers=key), 409, "idempotency_conflict")
    # a batch under the weight frame's key is not that frame's replay (it was dropped as one)
    frame_key = {"Idempotency-Key": f"{run_id}:0"}
    taken = api.post(f"/runs/{run_id}/metrics", json=rows, headers=frame_key)
    assert "weights frame" in _error(taken, 409, "idempotency_conflict")
    assert len(api.get(f"/runs/{run_id}/frames").json()) == 2  # the weights and one batch


def _statuses(api: httpx.Client, run_id: int) -> dict[int, str]:
    return {f["seq"]: f["status"] for f in api.get(f"/runs/{run_id}/frames").json()}


def _settled(api: httpx.Client, run_id: int, count: int) -> dict[int, str]:
    wait_until(
        lambda: (
            len(s := _statuses(api, run_id)) == count
            and all(v not in ("pending", "running") for v in s.values())
        ),
        timeout=120,
    )
    return _statuses(api, run_id)


def test_bad_sketch_rows_do_not_fail_the_clean_frames_after_them(api: httpx.Client) -> None:
    run_id = make_run(api, name="nan-sketch")
    bad = {3: np.full((8, 64), np.nan), 5: np.full((8, 64), np.inf), 6: np.full((8, 64), 3e38)}
    for seq in range(9):
        response = api.post(f"/runs/{run_id}/frames", content=sketch(seq, bad.get(seq)))
        assert response.status_code == 202, response.text
    statuses = _settled(api, run_id, 9)
    assert set(statuses.values()) == {"done"}, statuses
    # the last window of layer "a" holds the clean rows only (flagged incomplete)
    gap = api.get(f"/runs/{run_id}/metrics", params={"name": "sed.gap_ratio.w16", "layer": "a"})
    (series,) = gap.json()["series"]
    assert series["steps"][-1] == 71


def test_odd_weights_and_activation_info_end_done(api: httpx.Client) -> None:
    run_id = make_run(api, name="odd-weights")
    rng = np.random.default_rng(0)
    bodies = [
        raw_frame(meta(seq="0", step="10"), {"w": rng.standard_normal((24, 12))}),
        raw_frame(meta(seq="1", step="20"), {"w": np.full((24, 12), 1e300)}, dtype="F64"),
        raw_frame(meta(seq="2", step="30"), {"w": np.full((24, 12), np.nan)}),
        raw_frame(meta(seq="3", step="40"), {"w": np.full((24, 12), np.inf)}),
        raw_frame(  # info.steps is client data outside sketch frames: one "step" per row
            meta(seq="7", step="45", info=json.dumps({"steps": ["x"] * 24})),
            {"w": np.full((24, 12), np.nan)},
        ),
        raw_frame(
            meta(
                kind="activations",
                seq="4",
                step="50",
                info=json.dumps({"gram": ["m"], "tokens": 10**30}),
            ),
            {"m": np.eye(16)},
        ),
        raw_frame(
            meta(
                kind="activations", seq="5", step="60", info=json.dumps({"gram": 5, "tokens": [1]})
            ),
            {"m": rng.standard_normal((64, 16))},
        ),
        raw_frame(
            meta(kind="activations", seq="6", step="70"),
            {"m": np.full((64, 16), 1e300)},
            dtype="F64",
        ),
    ]
    for body in bodies:
        assert api.post(f"/runs/{run_id}/frames", content=body).status_code == 202
    statuses = _settled(api, run_id, len(bodies))
    assert set(statuses.values()) == {"done"}, statuses
    norms = api.get(f"/runs/{run_id}/metrics", params={"name": "norm.spectral", "layer": "w"})
    (series,) = norms.json()["series"]
    assert series["steps"] == [10]  # the clean snapshot only


def test_a_metric_row_given_twice_in_a_batch_keeps_the_last_value(api: httpx.Client) -> None:
    """Found by a dashboard audit: such a batch answered 409 'retry it' forever."""
    run_id = make_run(api, name="dupes")
    rows = [{"step": 1, "layer": "a", "name": "htsr.alpha", "value": v} for v in (1.0, 3.0)]
    resp = api.post(
        f"/runs/{run_id}/metrics", json={"rows": rows}, headers={"Idempotency-Key": "d"}
    )
    assert resp.status_code == 202, resp.text
    assert resp.json()["accepted"] == 1
    (series,) = api.get(f"/runs/{run_id}/metrics", params={"name": "htsr.alpha"}).json()["series"]
    assert series["values"] == [3.0]


def test_nul_in_config_and_summary_is_stored_or_refused_never_500(api: httpx.Client) -> None:
    created = api.post("/runs", json={"project": "p", "name": "nul", "config": {"k": "a\u0000b"}})
    assert created.status_code in (201, 422), created.text
    run_id = make_run(api, name="nul2")
    patched = api.patch(f"/runs/{run_id}", json={"summary": {"k": "a\u0000b"}})
    assert patched.status_code in (200, 422), patched.text


def test_scalar_names_may_hold_slashes(api: httpx.Client) -> None:
    """``train/loss`` is the usual scalar naming (TensorBoard, W&B, Lightning)."""
    run_id = make_run(api, name="slashes")
    rows = [{"step": 1, "name": "train/loss", "value": 0.5}]
    assert api.post(f"/runs/{run_id}/scalars", json=rows).status_code == 202
    (series,) = api.get(f"/runs/{run_id}/scalars", params={"name": "train/loss"}).json()
    assert series["values"] == [0.5]
    bad = [{"step": 1, "name": "x\u0000", "value": 0.5}]
    assert api.post(f"/runs/{run_id}/scalars", json=bad).status_code == 422


def test_a_frame_kind_as_metric_source_is_422(api: httpx.Client) -> None:
    """Found by an export audit: such a batch made a blob-less ``weights`` frame, and every later
    weights frame of the run failed its analysis (``invalid blob key ''``)."""
    run_id = make_run(api, name="source-kind")
    rows = [{"step": 1, "layer": "l", "name": "m", "value": 1.0}]
    for kind in FrameKind:
        body = {"source": kind.value, "rows": rows}
        assert "frame kind" in _error(
            api.post(f"/runs/{run_id}/metrics", json=body), 422, "invalid_request"
        )
    assert api.get(f"/runs/{run_id}/frames").json() == []


def test_a_blobless_frame_never_poisons_the_runs_later_frames(
    api: httpx.Client, server: ServerProcess
) -> None:
    """A metric batch stored under a frame kind (as servers before the check above did) is not
    history for the worker: the weights frames after it are analysed."""
    run_id = make_run(api, name="blobless")
    rows = [{"step": 1, "layer": "layer0.weight", "name": "m", "value": 1.0}]
    batch = api.post(f"/runs/{run_id}/metrics", json={"source": "import", "rows": rows})
    assert batch.status_code == 202, batch.text
    db_rows(
        server.data_dir,
        "UPDATE frame SET kind = 'weights' WHERE id = :id",
        id=batch.json()["frame_id"],
    )
    for seq in range(2):
        assert post_frame(api, run_id, weight_frame(10 * (seq + 1), seq), seq=seq).is_success
    statuses = _settled(api, run_id, 3)
    assert set(statuses.values()) == {"done"}, statuses


def test_create_only_run_is_409_when_it_exists_even_concurrently(api: httpx.Client) -> None:
    body = {"project": "create-only", "name": "r", "resume": False}
    with ThreadPoolExecutor(4) as pool:
        codes = sorted(pool.map(lambda _: api.post("/runs", json=body).status_code, range(4)))
    assert codes == [201, 409, 409, 409]
    assert "already exists" in _error(api.post("/runs", json=body), 409, "run_exists")
    assert api.post("/runs", json={**body, "resume": True}).status_code == 200
