"""HTTP semantics of the API's answers: 405 names the allowed methods, 401 challenges for a
bearer token, HEAD is answered as GET without a body; body errors say what is wrong (415 for
a body that is not sent as JSON, where malformed JSON breaks, which parameter is too big)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from unittest.mock import ANY

import pytest
from fastapi.testclient import TestClient

from spectrawatch_server.app import create_app
from spectrawatch_server.config import ServerSettings


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = ServerSettings(data_dir=tmp_path, run_worker=False, run_webhooks=False)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        yield client


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("DELETE", "/api/v1/runs", "GET, HEAD, POST"),
        ("PUT", "/api/v1/runs/1", "DELETE, GET, HEAD, PATCH"),
        ("OPTIONS", "/api/v1/runs", "GET, HEAD, POST"),
        ("POST", "/api/v1/health", "GET, HEAD"),
    ],
)
def test_405_names_the_allowed_methods(
    client: TestClient, method: str, path: str, allow: str
) -> None:
    answer = client.request(method, path)
    assert answer.status_code == 405
    assert answer.headers["allow"] == allow
    assert answer.json()["error"]["code"] == "method_not_allowed"


def test_head_is_answered_as_get_without_a_body(client: TestClient) -> None:
    run = client.post("/api/v1/runs", json={"project": "p", "name": "r"}).json()
    for path in ("/api/v1/health", "/api/v1/ready", "/api/v1/runs", f"/api/v1/runs/{run['id']}"):
        get = client.get(path)
        head = client.head(path)
        assert head.status_code == get.status_code == 200, path
        assert head.content == b"", path
        assert head.headers["content-type"] == get.headers["content-type"], path
        assert head.headers["content-length"] == str(len(get.content)), path
    assert client.head("/api/v1/runs/999999").status_code == 404
    assert client.head("/api/v1/runs/999999").content == b""


def test_401_challenges_for_a_bearer_token(tmp_path: Path) -> None:
    settings = ServerSettings(
        data_dir=tmp_path, run_worker=False, run_webhooks=False, require_auth=True
    )
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        missing = client.get("/api/v1/runs")
        malformed = client.get("/api/v1/runs", headers={"Authorization": "Basic eDp5"})
        unknown = client.get("/api/v1/runs", headers={"Authorization": "Bearer sw_nope"})
        frame = client.post("/api/v1/runs/1/frames", content=b"x")
    assert [a.status_code for a in (missing, malformed, unknown, frame)] == [401] * 4
    assert missing.headers["www-authenticate"] == 'Bearer realm="spectrawatch"'
    assert malformed.headers["www-authenticate"].endswith('error="invalid_request"')
    assert unknown.headers["www-authenticate"].endswith('error="invalid_token"')
    assert frame.headers["www-authenticate"] == 'Bearer realm="spectrawatch"'


@pytest.mark.parametrize(
    "headers",
    [{"content-type": "application/x-www-form-urlencoded"}, {"content-type": ""}, {}],
)
def test_a_json_body_sent_as_another_type_is_415(
    client: TestClient, headers: dict[str, str]
) -> None:
    body = b'{"project": "p", "name": "curl-run"}'
    answer = client.post("/api/v1/runs", content=body, headers=headers)
    assert answer.status_code == 415, answer.text
    error = answer.json()["error"]
    assert error["code"] == "unsupported_media_type"
    assert "Content-Type: application/json" in error["message"]
    json_type = {"content-type": "application/json; charset=utf-8"}
    assert client.post("/api/v1/runs", content=body, headers=json_type).status_code == 201
    missing = client.post("/api/v1/runs", headers=headers)  # no body: a field is missing
    assert missing.status_code == 422


def test_malformed_json_names_the_offset_and_the_reason(client: TestClient) -> None:
    answer = client.post(
        "/api/v1/runs",
        content=b'{"project":"grok",}',
        headers={"content-type": "application/json"},
    )
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error["problems"] == [{"field": "body", "message": ANY}]
    assert error["message"].startswith("body: malformed JSON at character 18: ")
    assert "double quotes" in error["message"]


def test_an_id_beyond_64_bits_is_named(client: TestClient) -> None:
    for path, name in (
        ("/api/v1/runs/99999999999999999999", "run_id"),
        ("/api/v1/webhooks/99999999999999999999", "webhook_id"),
    ):
        answer = client.get(path)
        assert answer.status_code == 422, path
        assert answer.json()["error"]["code"] == "out_of_range"
        assert answer.json()["error"]["message"].startswith(f"{name} out of range"), path
