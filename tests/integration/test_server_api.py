"""The API against a real ``spectrawatch server`` process on SQLite with the embedded worker."""

from __future__ import annotations

import html
import json
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest.mock import ANY
from urllib.parse import urljoin

import httpx
import pytest
import torch
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_spec
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from spectrawatch import _export
from spectrawatch.wire import compress, encode_frame
from spectrawatch_server.storage import repository as repo
from tests.factories import make_run, post_frame, weight_frame
from tests.servers import DIALECT, ServerProcess, database_url, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        tmp_path_factory.mktemp("srv"),
        env={"SPECTRAWATCH_MAX_BODY_BYTES": str(2 * 1024 * 1024), "SPECTRAWATCH_MAX_TENSORS": "64"},
    ).start()
    yield proc
    proc.stop()


@pytest.fixture
def client(shared_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{shared_server.url}/api/v1", timeout=30) as c:
        yield c


def frames_done(client: httpx.Client, run_id: int, expected: int) -> bool:
    frames = client.get(f"/runs/{run_id}/frames").json()
    return len(frames) == expected and all(f["status"] == "done" for f in frames)


def test_health_and_openapi(client: httpx.Client, shared_server: ServerProcess) -> None:
    health = client.get("/health").json()
    assert health["status"] == "ok"
    assert health["database"] == DIALECT
    assert health["worker"]["running"] is True
    # readiness: the database answers and a worker runs (the embedded thread, or the topology's
    # `spectrawatch worker` processes in postgres mode)
    ready = client.get("/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"ready": True, "checks": {"database": "ok", "worker": "ok"}}
    for page in ("docs", "redoc"):  # their scripts come from the server, not a CDN
        answer = httpx.get(f"{shared_server.url}/{page}")
        assert answer.status_code == 200
        assets = re.findall(r'(?:src|href)="([^"]+)"', answer.text)
        assert assets
        assert all(a.startswith("/dashboards/static/vendor/") for a in assets), assets
        for asset in assets:
            served = httpx.get(f"{shared_server.url}{asset}")
            assert served.status_code == 200, asset
            assert len(served.content) > 500, asset
            assert "immutable" in served.headers["cache-control"]
    paths = httpx.get(f"{shared_server.url}/openapi.json").json()["paths"]
    assert "/api/v1/runs/{run_id}/frames" in paths


def _validator(document: dict[str, Any], schema: dict[str, Any]) -> Draft202012Validator:
    """A JSON-schema validator of ``schema``, one of ``document``'s (an OpenAPI document's),
    its ``#/components/...`` references resolved in ``document``."""
    registry = Registry().with_resource(
        "urn:openapi", Resource.from_contents(document, default_specification=DRAFT202012)
    )
    return Draft202012Validator({"$ref": "urn:openapi#", **schema}, registry=registry)


def _response_schema(document: dict[str, Any], path: str, method: str, status: int) -> Any:
    """The JSON schema ``document`` declares for ``status`` of ``method`` on ``path``."""
    response = document["paths"][f"/api/v1{path}"][method]["responses"][str(status)]
    schema = response["content"]["application/json"]["schema"]
    return {key: value.replace("#/", "urn:openapi#/") for key, value in schema.items()}


def test_openapi_document_declares_what_the_server_answers(
    client: httpx.Client, shared_server: ServerProcess
) -> None:
    """The served OpenAPI document is valid; POST /runs declares the 200 of a resumed run; every
    operation declares its error answers with the one schema the server sends (errors
    generated clients can read), never FastAPI's ``HTTPValidationError``; frame ingest takes a
    binary body."""
    document = httpx.get(f"{shared_server.url}/openapi.json").json()
    validate_spec(document)
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    assert "HTTPValidationError" not in json.dumps(document)
    create = document["paths"]["/api/v1/runs"]["post"]["responses"]
    assert {"200", "201", "401", "403", "409", "415", "422"} <= set(create)
    ingest = document["paths"]["/api/v1/runs/{run_id}/frames"]["post"]
    assert "application/octet-stream" in ingest["requestBody"]["content"]
    assert ingest["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/FramePublic"
    }
    run_id = make_run(client, name="openapi")
    resumed = client.post("/runs", json={"project": "proj", "name": "openapi"})
    assert resumed.status_code == 200
    checks = [
        ("/runs", "post", resumed),
        ("/runs/{run_id}", "get", client.get("/runs/999999")),
        ("/runs", "get", client.get("/runs", params={"limit": 0})),
        (
            "/runs",
            "post",
            client.post("/runs", json={"project": "proj", "name": "openapi", "resume": False}),
        ),
        ("/runs/{run_id}/scalars", "post", client.post(f"/runs/{run_id}/scalars", json={})),
        ("/runs/{run_id}/frames", "post", post_frame(client, run_id, b"xx")),
    ]
    for path, method, answer in checks:
        schema = _response_schema(document, path, method, answer.status_code)
        errors = list(_validator(document, schema).iter_errors(answer.json()))
        assert not errors, (path, answer.status_code, answer.text, errors[0].message)
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")) and (path, status) != ("/api/v1/ready", "503"):
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (path, method)
            if "{" in path:
                assert "404" in operation["responses"], (path, method)


def test_openapi_document_declares_bearer_auth(shared_server: ServerProcess) -> None:
    """HTTP bearer auth is a security scheme (Swagger UI's Authorize button), required by
    every operation that checks a token; health and readiness stay open."""
    document = httpx.get(f"{shared_server.url}/openapi.json").json()
    schemes = document["components"]["securitySchemes"]
    assert schemes == {"bearerAuth": {"type": "http", "scheme": "bearer", "description": ANY}}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            expected = [] if path in ("/api/v1/health", "/api/v1/ready") else [{"bearerAuth": []}]
            assert operation.get("security", []) == expected, (method, path)


def _integer_bounds(node: Any) -> Iterator[Any]:
    """The minimum/maximum of every ``integer`` schema under ``node``."""
    if isinstance(node, list):
        for item in node:
            yield from _integer_bounds(item)
    elif isinstance(node, dict):
        if node.get("type") == "integer":
            yield from (node[k] for k in ("minimum", "maximum") if k in node)
        for child in node.values():
            yield from _integer_bounds(child)


def test_openapi_operation_ids_tags_enums_and_bounds(shared_server: ServerProcess) -> None:
    """Operation ids are the route functions' names (``list_runs``), unique; each tag has a
    description and ``whoami`` its own; statuses and severities are enums; integer bounds are
    exact integers (2**63 - 1 was written ``9.223372036854776e+18``)."""
    document = httpx.get(f"{shared_server.url}/openapi.json").json()
    operations = [op for ops in document["paths"].values() for op in ops.values()]
    ids = [op["operationId"] for op in operations]
    assert len(ids) == len(set(ids))
    assert document["paths"]["/api/v1/runs"]["get"]["operationId"] == "list_runs"
    assert document["paths"]["/api/v1/token"]["get"]["tags"] == ["tokens"]
    described = {tag["name"] for tag in document["tags"] if tag["description"]}
    assert {tag for op in operations for tag in op["tags"]} <= described
    schemas = document["components"]["schemas"]
    assert schemas["RunPublic"]["properties"]["status"]["enum"] == [
        "running",
        "finished",
        "crashed",
    ]
    assert schemas["AlertPublic"]["properties"]["severity"]["enum"] == [
        "info",
        "warning",
        "critical",
    ]
    assert schemas["DeliveryPublic"]["properties"]["status"]["enum"] == [
        "pending",
        "delivered",
        "failed",
    ]
    bounds = list(_integer_bounds(document))
    assert bounds
    assert all(type(b) is int for b in bounds), [b for b in bounds if type(b) is not int]
    assert schemas["MetricIn"]["properties"]["step"]["maximum"] == 2**62
    assert 2**63 - 1 in bounds


def test_weight_frame_produces_norm_metrics_matching_numpy(client: httpx.Client) -> None:
    run_id = make_run(client, name="norms")
    bodies = [weight_frame(step=100 * i, seq=i) for i in range(3)]
    for i, body in enumerate(bodies):
        response = post_frame(
            client,
            run_id,
            body if i else compress(body),
            seq=i,
            **({} if i else {"Content-Encoding": "zstd"}),
        )
        assert response.status_code == 202, response.text
    wait_until(lambda: frames_done(client, run_id, 3))
    series = client.get(f"/runs/{run_id}/metrics", params={"name": "norm.spectral"}).json()[
        "series"
    ]
    by_layer = {s["layer"]: s for s in series}
    assert set(by_layer) == {"layer0.weight", "layer1.weight"}
    import numpy as np

    from spectrawatch.wire import decode_frame

    for i, body in enumerate(bodies):
        _, tensors = decode_frame(body)
        for layer, w in tensors.items():
            expected = np.linalg.norm(w.double().numpy(), 2)
            assert by_layer[layer]["steps"][i] == 100 * i
            assert by_layer[layer]["values"][i] == pytest.approx(expected, rel=1e-9)
    fro = client.get(
        f"/runs/{run_id}/metrics", params={"name": "norm.frobenius", "layer": "layer0.weight"}
    )
    assert len(fro.json()["series"]) == 1
    catalog = client.get(f"/runs/{run_id}/metrics/catalog").json()
    norms = {(c["name"], c["layer"], c["points"]) for c in catalog if c["name"].startswith("norm.")}
    assert norms == {
        (n, f"layer{i}.weight", 3) for n in ("norm.spectral", "norm.frobenius") for i in (0, 1)
    }
    # one frame's spectra; a frame of another run, or none, is 404
    frame_id = client.get(f"/runs/{run_id}/frames").json()[0]["id"]
    assert client.get(f"/runs/{run_id}/spectra/{frame_id}").status_code == 200
    other = make_run(client, name="norms-other")
    for run, frame in ((other, frame_id), (run_id, 2**62), (run_id, 10**30), (run_id, 0)):
        missing = client.get(f"/runs/{run}/spectra/{frame}")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "frame_not_found"


def test_same_idempotency_key_stores_one_frame(client: httpx.Client) -> None:
    run_id = make_run(client, name="idem")
    body = weight_frame(step=5, seq=0)
    first = post_frame(client, run_id, body, seq=0)
    second = post_frame(client, run_id, body, seq=0)
    assert (first.status_code, second.status_code) == (202, 200)
    assert first.json()["id"] == second.json()["id"]
    without_header = post_frame(client, run_id, body)  # key defaults to run:seq from metadata
    assert without_header.status_code == 200
    assert without_header.json()["id"] == first.json()["id"]
    assert len(client.get(f"/runs/{run_id}/frames").json()) == 1
    weights = client.get(f"/runs/{run_id}/frames", params={"kind": "weights"}).json()
    assert [f["id"] for f in weights] == [first.json()["id"]]
    assert client.get(f"/runs/{run_id}/frames", params={"kind": "activations"}).json() == []
    # any lowercase word may be the source of imported metrics, stored as a frame kind
    assert client.get(f"/runs/{run_id}/frames", params={"kind": "eval"}).json() == []
    bogus = client.get(f"/runs/{run_id}/frames", params={"kind": "Not a kind!"})
    assert bogus.status_code == 422
    assert "kind" in bogus.text


def test_metrics_downsampled_server_side(client: httpx.Client) -> None:
    run_id = make_run(client, name="many-scalars")
    rows = [{"step": s, "name": "loss", "value": float((s % 97) - 0.01 * s)} for s in range(5000)]
    assert client.post(f"/runs/{run_id}/scalars", json=rows).status_code == 202
    full = client.get(f"/runs/{run_id}/scalars", params={"name": "loss"}).json()[0]
    small = client.get(
        f"/runs/{run_id}/scalars", params={"name": "loss", "max_points": 200}
    ).json()[0]
    assert full["points"] == small["points"] == 5000
    assert len(full["steps"]) == 5000
    assert len(small["steps"]) == 200
    assert small["steps"][0] == 0
    assert small["steps"][-1] == 4999
    assert max(small["values"]) == max(full["values"])  # LTTB keeps the extremes here
    ranged = client.get(
        f"/runs/{run_id}/scalars", params={"name": "loss", "from": 100, "to": 199}
    ).json()[0]
    assert ranged["steps"] == list(range(100, 200))


def test_scalars_nan_accepted_and_flagged(client: httpx.Client) -> None:
    run_id = make_run(client, name="nan-scalars")
    body = '[{"step": 1, "name": "loss", "value": NaN}, {"step": 2, "name": "loss", "value": 0.5}]'
    response = client.post(
        f"/runs/{run_id}/scalars", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 202
    assert response.json() == {"accepted": 2, "nonfinite": 1}
    series = client.get(f"/runs/{run_id}/scalars", params={"name": "loss"}).json()[0]
    assert series["values"] == [None, 0.5]


def test_a_scalar_batch_of_the_largest_size_is_stored(client: httpx.Client) -> None:
    """``max_scalars_per_batch`` (100,000) scalars in one request: on PostgreSQL one INSERT of
    more than 16,383 rows exceeded its 65,535 bound parameters (503 ``database_unavailable``,
    forever retried), on SQLite more than 62,500 its 250,000."""
    run_id = make_run(client, name="big-batch")
    rows = [{"step": i, "name": "loss", "value": i / 1000} for i in range(99_999)]
    rows.append({"step": 3, "name": "loss", "value": -1.0})  # repeated: the later one wins
    response = client.post(f"/runs/{run_id}/scalars", json=rows, timeout=120)
    assert response.status_code == 202, response.text[:300]
    (series,) = client.get(f"/runs/{run_id}/scalars", params={"name": "loss"}).json()
    assert series["steps"] == list(range(99_999))
    assert series["values"][:5] == [0.0, 0.001, 0.002, -1.0, 0.004]
    assert series["values"][-1] == 99.998


def test_run_lifecycle(client: httpx.Client) -> None:
    created = client.post(
        "/runs", json={"project": "life", "name": "r", "config": {"lr": 0.1}, "tags": ["a"]}
    )
    assert created.status_code == 201
    assert created.json()["resumed_status"] is None
    assert created.json()["dashboard_url"] == f"/runs/{created.json()['id']}"
    again = client.post("/runs", json={"project": "life", "name": "r"})
    assert again.status_code == 200
    assert again.json()["id"] == created.json()["id"]
    run_id = created.json()["id"]
    patched = client.patch(
        f"/runs/{run_id}", json={"status": "finished", "summary": {"val_acc": 1.0}}
    )
    assert patched.json()["status"] == "finished"
    assert patched.json()["config"] == {"lr": 0.1}
    # resumed: running again, and the reply says what it was (the client's warning names it)
    resumed = client.post("/runs", json={"project": "life", "name": "r"}).json()
    assert (resumed["status"], resumed["resumed_status"]) == ("running", "finished")
    client.patch(f"/runs/{run_id}", json={"status": "finished"})
    listed = client.get("/runs", params={"project": "life"}).json()
    assert [r["id"] for r in listed] == [run_id]
    stats = client.post(f"/runs/{run_id}/client-stats", json={"dropped_frames": 3, "errors": 1})
    assert stats.json()["client_stats"]["dropped_frames"] == 3
    for bad, named in (({"dropped_frames": 2**70}, "dropped_frames"), ({"x": "y" * 5000}, "'x'")):
        refused = client.post(f"/runs/{run_id}/client-stats", json=bad)
        assert refused.status_code == 422
        assert named in refused.json()["error"]["message"]
    assert client.get(f"/runs/{run_id}").json()["client_stats"]["dropped_frames"] == 3
    assert client.patch(f"/runs/{run_id}", json={"status": "exploded"}).status_code == 422


def _next_link(resp: httpx.Response) -> str | None:
    """The ``rel="next"`` reference of ``resp``'s ``Link`` header, or None."""
    link: str | None = resp.links.get("next", {}).get("url")
    return link


def test_runs_pages_are_stable_while_runs_are_created_and_deleted(client: httpx.Client) -> None:
    """``GET /runs`` paged by offset: a run created between two pages shifted the second by
    one (the boundary run listed twice), a run deleted meanwhile hid a live one. The next page's
    ``Link`` names it by ``before_id`` (runs older than the page's last), unmoved by either."""
    ids = [
        client.post("/runs", json={"project": "keyset", "name": f"k{i}"}).json()["id"]
        for i in range(8)
    ]
    first = client.get("/runs", params={"project": "keyset", "limit": 3})
    assert [r["id"] for r in first.json()] == ids[:-4:-1]  # newest first
    link = _next_link(first)
    assert link is not None
    assert link.startswith("/api/v1/runs?"), link  # relative, as the spectra's (RFC 8288)
    assert f"before_id={ids[-3]}" in link
    assert "offset" not in link
    client.post("/runs", json={"project": "keyset", "name": "newer"}).raise_for_status()
    second = client.get(urljoin(str(first.url), link))
    assert [r["id"] for r in second.json()] == ids[-4:-7:-1]  # none repeated
    client.delete(f"/runs/{ids[-1]}").raise_for_status()  # a run already listed
    link = _next_link(second)
    assert link is not None
    last = client.get(urljoin(str(second.url), link))
    assert [r["id"] for r in last.json()] == ids[1::-1]  # none skipped
    assert _next_link(last) is None  # the last page
    # offset still pages as before, and its link continues by id
    by_offset = client.get("/runs", params={"project": "keyset", "limit": 2, "offset": 2})
    assert [r["id"] for r in by_offset.json()] == ids[-3:-5:-1]  # after "newer" and ids[-2]
    assert f"before_id={ids[-4]}" in (_next_link(by_offset) or "")
    older = client.get("/runs", params={"project": "keyset", "before_id": ids[2]})
    assert [r["id"] for r in older.json()] == ids[1::-1]
    assert client.get("/runs", params={"before_id": 0}).status_code == 422


def test_a_full_frames_page_links_the_next(client: httpx.Client) -> None:
    """A page of ``limit`` frames said nothing when more followed (only one cut short by its
    layer names had a ``Link``): a client following links stopped at the first page, 1000
    frames by default. Every page with more after it now links the next by ``offset``."""
    run_id = make_run(client, name="frame-pages")
    ids = [post_frame(client, run_id, weight_frame(i, i), seq=i).json()["id"] for i in range(3)]
    first = client.get(f"/runs/{run_id}/frames", params={"limit": 2})
    assert [f["id"] for f in first.json()] == ids[:2]
    link = _next_link(first)
    assert link is not None
    assert link.startswith(f"/api/v1/runs/{run_id}/frames?"), link
    assert first.headers["X-Next-Offset"] == "2"
    last = client.get(urljoin(str(first.url), link))
    assert [f["id"] for f in last.json()] == ids[2:]
    assert _next_link(last) is None
    assert _next_link(client.get(f"/runs/{run_id}/frames", params={"limit": 3})) is None


def test_runs_by_exact_name(client: httpx.Client) -> None:
    """``name=`` lists the runs of that exact name (one per project), so a client resolving a
    name reads one page instead of every run."""
    one = client.post("/runs", json={"project": "named-a", "name": "same"}).json()["id"]
    two = client.post("/runs", json={"project": "named-b", "name": "same"}).json()["id"]
    client.post("/runs", json={"project": "named-a", "name": "same2"}).raise_for_status()
    listed = client.get("/runs", params={"name": "same"}).json()
    assert [r["id"] for r in listed] == [two, one]
    in_a = client.get("/runs", params={"name": "same", "project": "named-a"}).json()
    assert [r["id"] for r in in_a] == [one]
    assert client.get("/runs", params={"name": "sam"}).json() == []  # exact, not a prefix
    assert client.get("/runs", params={"name": "x" * 201}).status_code == 422


def _raw(header: dict[str, object], data: bytes) -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


def _raw_prefix(head: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(head)) + head + data


META = {"spectrawatch": "1", "kind": "weights", "step": "1", "seq": "0"}
F32_2x2 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}

BAD_FRAMES: list[tuple[str, bytes, dict[str, str], int, str]] = [
    ("malformed", b"this is not safetensors", {}, 400, "truncated"),
    ("not json", _raw_prefix(b"{nope", b""), {}, 400, "bad_header"),
    ("truncated", weight_frame(1, 0)[:-10], {}, 400, "bad_offsets"),
    ("empty", b"", {}, 400, "empty_body"),
    ("missing metadata", _raw({"w": F32_2x2}, b"\0" * 16), {}, 422, "missing_metadata"),
    (
        "unknown kind",
        _raw({"__metadata__": {**META, "kind": "grads"}, "w": F32_2x2}, b"\0" * 16),
        {},
        422,
        "unknown_kind",
    ),
    (
        "bad step",
        _raw({"__metadata__": {**META, "step": "x"}, "w": F32_2x2}, b"\0" * 16),
        {},
        422,
        "bad_metadata",
    ),
    (
        "dtype not allowed",
        _raw(
            {"__metadata__": META, "w": {"dtype": "U8", "shape": [4, 4], "data_offsets": [0, 16]}},
            b"\0" * 16,
        ),
        {},
        422,
        "dtype_not_allowed",
    ),
    (
        "too many tensors",
        encode_frame("weights", 1, 0, {f"w{i}": torch.zeros(1, 1) for i in range(65)}),
        {},
        422,
        "too_many_tensors",
    ),
    (
        "wrong rank",
        encode_frame("weights", 1, 0, {"w": torch.zeros(2, 2, 2)}),
        {},
        422,
        "bad_shape",
    ),
    (
        "oversized body",
        encode_frame("weights", 1, 0, {"w": torch.zeros(1024, 1024)}),
        {},
        413,
        "too_large",
    ),
    ("bad zstd", b"\x28\xb5\x2f\xfd garbage", {"Content-Encoding": "zstd"}, 400, "bad_encoding"),
    (
        "zstd bomb",
        compress(encode_frame("weights", 1, 0, {"w": torch.zeros(1024, 1024)})),
        {"Content-Encoding": "zstd"},
        413,
        "too_large",
    ),
    (
        "unknown encoding",
        weight_frame(1, 0),
        {"Content-Encoding": "br"},
        415,
        "unsupported_encoding",
    ),
    ("long key", weight_frame(1, 0), {"Idempotency-Key": "k" * 500}, 400, "bad_idempotency_key"),
]


@pytest.mark.parametrize(
    ("case", "body", "headers", "status", "code"), BAD_FRAMES, ids=[c[0] for c in BAD_FRAMES]
)
def test_bad_frames_get_4xx_and_leave_nothing(
    client: httpx.Client,
    shared_server: ServerProcess,
    case: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    run_id = make_run(client, name="bad-input")
    before = len(client.get(f"/runs/{run_id}/frames").json())
    response = post_frame(client, run_id, body, **headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert len(client.get(f"/runs/{run_id}/frames").json()) == before
    assert list((shared_server.data_dir / "blobs" / ".tmp").iterdir()) == []
    assert client.get("/health").status_code == 200


def test_nan_frames_accepted_but_flagged(client: httpx.Client) -> None:
    run_id = make_run(client, name="nan-frame")
    w = torch.randn(8, 4)
    w[0, 0] = float("nan")
    w[1, 1] = float("inf")
    response = post_frame(client, run_id, encode_frame("weights", 3, 0, {"w": w}), seq=0)
    assert response.status_code == 202
    assert response.json()["nonfinite"] == {"w": 2}
    assert response.json()["warnings"]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("post", "/runs/999999/frames", weight_frame(1, 0), 404, "run_not_found"),
        ("post", "/runs/999999/scalars", b"[]", 404, "run_not_found"),
        ("get", "/runs/999999/metrics?name=x", None, 404, "run_not_found"),
        ("post", "/runs", b'{"project": "p"}', 422, "invalid_request"),
        ("post", "/runs", b'{"project": "p", "name": ""}', 422, "invalid_request"),
        ("post", "/runs", b"{not json", 422, "invalid_request"),
        (
            "post",
            "/runs/RUN/scalars",
            b'[{"step": -1, "name": "x", "value": 1}]',
            422,
            "invalid_request",
        ),
        (
            "post",
            "/runs/RUN/scalars",
            b'[{"step": 1, "name": "x", "value": "high"}]',
            422,
            "invalid_request",
        ),
        ("post", "/runs/RUN/scalars", b'{"step": 1}', 422, "invalid_request"),
        ("get", "/runs/RUN/metrics", None, 422, "invalid_request"),
        ("get", "/runs/RUN/metrics?name=x&max_points=1", None, 422, "invalid_request"),
        ("get", "/nowhere", None, 404, "not_found"),
    ],
)
def test_bad_requests_get_named_4xx(
    client: httpx.Client, method: str, path: str, body: bytes | None, status: int, code: str
) -> None:
    run_id = make_run(client, name="bad-requests")
    path = path.replace("RUN", str(run_id))
    headers = (
        {"content-type": "application/json"}
        if body is not None and not path.endswith("frames")
        else {}
    )
    response = client.request(method, path, content=body, headers=headers)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert client.get("/health").status_code == 200


def test_refuses_non_loopback_without_auth(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "spectrawatch",
            "server",
            "--host",
            "0.0.0.0",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "without auth" in result.stderr


def test_metric_batches_are_stored_once_per_key(client: httpx.Client) -> None:
    run_id = make_run(client, name="metric-import")
    rows = [{"step": s, "layer": "l0", "name": "htsr.alpha", "value": 2.0 + s} for s in range(5)]
    rows.append({"step": 5, "layer": "l0", "name": "htsr.alpha", "value": None})
    body = {"source": "import", "rows": rows}
    first = client.post(f"/runs/{run_id}/metrics", json=body, headers={"Idempotency-Key": "b1"})
    again = client.post(f"/runs/{run_id}/metrics", json=body, headers={"Idempotency-Key": "b1"})
    assert first.status_code == again.status_code == 202
    assert (first.json()["accepted"], again.json()["replayed"]) == (6, True)
    series = client.get(f"/runs/{run_id}/metrics", params={"name": "htsr.alpha"}).json()["series"]
    assert series[0]["steps"] == [0, 1, 2, 3, 4, 5]
    assert series[0]["values"] == [2.0, 3.0, 4.0, 5.0, 6.0, None]
    bad = client.post(f"/runs/{run_id}/metrics", json={"rows": [{"step": -1, "layer": "l"}]})
    assert bad.status_code == 422
    assert client.post(f"/runs/{run_id}/metrics", json={"rows": []}).status_code == 422


def test_a_metric_batch_over_the_limit_is_refused_naming_it(client: httpx.Client) -> None:
    """A metric batch is one transaction (its frame and every row, so its key makes a retry a
    no-op): 99,900 rows held SQLite's write lock 3.8-7.2 s and another run's scalar post
    answered 503. At most ``max_metrics_per_batch`` (20,000: the previous release's
    ``spectrawatch import`` batch) rows now; more answer 413 naming the limit, storing nothing.
    ``spectrawatch import`` sends 5,000."""
    run_id = make_run(client, name="metric-limit")
    rows = [{"step": s, "layer": "l0", "name": "htsr.alpha", "value": 1.0} for s in range(20_001)]
    refused = client.post(f"/runs/{run_id}/metrics", json={"rows": rows}, timeout=120)
    assert refused.status_code == 413, refused.text[:300]
    error = refused.json()["error"]
    assert error["code"] == "too_many_metrics"
    assert "body.rows: 20001 rows exceed max_metrics_per_batch (20000)" in error["message"]
    assert client.get(f"/runs/{run_id}/frames").json() == []
    stored = client.post(f"/runs/{run_id}/metrics", json={"rows": rows[:-1]}, timeout=120)
    assert stored.json()["accepted"] == 20_000
    assert _export.METRIC_BATCH <= 5_000


def test_dashboard_errors_are_pages_api_errors_json(shared_server: ServerProcess) -> None:
    """A browser gets an HTML error page (message escaped), an API client JSON."""
    page = {"Accept": "text/html,application/xhtml+xml"}
    with httpx.Client(base_url=shared_server.url, timeout=30) as web:
        missing = web.get("/runs/99999999", headers=page)
        assert missing.status_code == 404
        assert missing.headers["content-type"].startswith("text/html")
        assert "run 99999999 does not exist" in missing.text
        (css,) = re.findall(r"href='([^']+\.css)'", missing.text)  # the page is styled
        assert web.get(css).status_code == 200
        assert (
            web.get(css + "-missing", headers=page)
            .headers["content-type"]
            .startswith("application/json")
        )  # a static file is never answered with a page
        bad = web.get("/", params={"desc": "<script>x"}, headers=page)
        assert bad.status_code == 422
        assert bad.headers["content-type"].startswith("text/html")
        assert "<script>x" not in bad.text
        api = web.get("/api/v1/runs/99999999", headers=page)
        assert api.json()["error"]["code"] == "run_not_found"
        assert web.get("/runs/99999999").json()["error"]["code"] == "run_not_found"


def test_dot_names_refused_stored_ones_readable_and_every_project_link_lands(
    client: httpx.Client, shared_server: ServerProcess
) -> None:
    """A new project or run named "." or ".." is refused with a 422 naming the field: the runs
    table links /projects/<name>, which a browser resolves to / or /projects (escaped as %2E
    too). Projects stored before stay readable and deletable, and every project's link (a name
    with '#', '?', '%', a space...) leads to that project's page."""
    for path, body, field in (
        ("/projects", {"name": ".."}, "body.name"),
        ("/projects", {"name": "."}, "body.name"),
        ("/runs", {"project": ".", "name": "r"}, "body.project"),
        ("/runs", {"project": "dots", "name": ".."}, "body.name"),
    ):
        r = client.post(path, json=body)
        assert r.status_code == 422, (body, r.text)
        message = r.json()["error"]["message"]
        assert message.startswith(f"{field}: "), message
        assert "not accepted as a new project or run name" in message
    names = ["a#b", "a?b", "50%", "a b", "%2e%2e", ".%2E", "...", ".x", "back\\slash", "<&>"]
    for name in names:
        make_run(client, project=name, name=name)
    engine = create_engine(database_url(shared_server.data_dir))
    try:
        with Session(engine) as session, session.begin():  # stored before the refusal
            for name in (".", ".."):
                project, _ = repo.get_or_create_project(session, name)
                repo.get_or_create_run(session, project, name, {}, [])
    finally:
        engine.dispose()

    with httpx.Client(base_url=shared_server.url, timeout=30) as web:
        table = web.get("/", params={"fragment": "true"}).text
        links = {
            html.unescape(text): html.unescape(href)
            for href, text in re.findall(r'<td><a href="([^"]+)">([^<]+)</a></td>', table)
        }
        assert links["a#b"] == "/projects/a%23b"
        assert links["50%"] == "/projects/50%25"
        assert links[".."] == "/?project=.."
        for name in [*names, ".", ".."]:
            url = urljoin(f"{shared_server.url}/", links[name])  # dot segments resolved
            segments = httpx.URL(url).raw_path.decode().partition("?")[0].split("/")
            dots = (".", "..", "%2e", "%2e%2e", ".%2e", "%2e.")  # what browsers resolve away
            assert not any(s.lower() in dots for s in segments), (name, url)
            page = web.get(url)
            assert page.status_code == 200, (name, url, page.text)
            assert f"<h1>Project {html.escape(name, quote=False)}</h1>" in page.text, (name, url)
    # a stored "." / ".." project takes new runs and a stored run resumes: POST /runs is
    # get-or-create; only a new project or run named so is refused
    resumed = client.post("/runs", json={"project": "..", "name": ".."})
    assert resumed.status_code == 200, resumed.text
    added = client.post("/runs", json={"project": ".", "name": "after"})
    assert added.status_code == 201, added.text
    assert added.json()["project"] == "."
    for project in ("..", "new-dots"):  # a new run named "." (in a new project: not created)
        r = client.post("/runs", json={"project": project, "name": "."})
        assert r.status_code == 422, (project, r.text)
        assert r.json()["error"]["message"].startswith("body.name: "), r.text
    assert client.get("/runs", params={"project": "new-dots"}).status_code == 404
    runs = client.get("/runs", params={"project": ".."}).json()
    assert [(r["project"], r["name"]) for r in runs] == [("..", "..")]
    runs_of_dot = client.get("/runs", params={"project": "."}).json()
    assert sorted(r["name"] for r in runs_of_dot) == [".", "after"]
    assert client.get("/projects/%2E%2E/alert-rules").status_code == 200
    assert client.delete(f"/runs/{runs[0]['id']}").status_code == 200
    assert client.get("/runs", params={"project": ".."}).json() == []
