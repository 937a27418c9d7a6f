"""HTML pages refuse to be framed by other sites (clickjacking); JSON is unchanged, and the API
docs pages keep their own content security policy (which refuses framing too)."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from spectrawatch_server.app import create_app
from spectrawatch_server.config import ServerSettings


def test_html_pages_may_not_be_framed(tmp_path: Path) -> None:
    settings = ServerSettings(data_dir=tmp_path, run_worker=False)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        run = client.post("/api/v1/runs", json={"project": "p", "name": "r"}).json()
        html = {"Accept": "text/html"}
        for path in ("/", "/projects/p", f"/runs/{run['id']}", "/runs/999999"):  # last: 404 page
            page = client.get(path, headers=html)
            assert page.headers["content-type"].startswith("text/html"), path
            assert page.headers["X-Frame-Options"] == "DENY", path
            assert page.headers["Content-Security-Policy"] == "frame-ancestors 'none'", path
        api = client.get(f"/api/v1/runs/{run['id']}")
        assert api.headers["content-type"] == "application/json"
        assert "X-Frame-Options" not in api.headers
        for path in ("/docs", "/redoc"):
            page = client.get(path)
            assert page.headers["X-Frame-Options"] == "DENY", path
            policy = page.headers["Content-Security-Policy"]
            assert policy.startswith("default-src 'self'"), path
            assert "frame-ancestors 'none'" in policy, path
