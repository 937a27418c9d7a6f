"""The API documentation pages (``/docs``, ``/redoc``) served from the package's own files.

FastAPI's defaults load Swagger UI and ReDoc from a CDN: the pages were blank on a server
without internet access, and a script from another origin ran where the dashboards keep their
bearer token (``localStorage``). Here both bundles are vendored under the dashboards' static
folder (``vendor/``, with their licences) and linked by content-versioned URLs.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse

from spectrawatch_server.api.errors import STATIC_URL
from spectrawatch_server.api.static_assets import asset_url

SWAGGER = "vendor/swagger-ui"
REDOC = "vendor/redoc"
CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' blob:; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self' data:; "
    "worker-src 'self' blob:; connect-src 'self'; frame-ancestors 'none'"
)
"""The pages' content security policy: nothing from another origin (ReDoc's footer logo, on
``cdn.redoc.ly``, is refused and hides itself), FastAPI's inline start-up scripts allowed."""


def install(app: FastAPI, static_dir: Path) -> None:
    """Add ``/docs`` and ``/redoc`` to ``app`` (created with ``docs_url=None, redoc_url=None``),
    their scripts from ``static_dir``, mounted at ``STATIC_URL``."""

    def url(name: str) -> str:
        return asset_url(STATIC_URL, static_dir, name)

    title = f"{app.title} API"
    favicon = f"{SWAGGER}/favicon-32x32.png"

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        page = get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=title,
            swagger_js_url=url(f"{SWAGGER}/swagger-ui-bundle.js"),
            swagger_css_url=url(f"{SWAGGER}/swagger-ui.css"),
            swagger_favicon_url=url(favicon),
        )
        page.headers["Content-Security-Policy"] = CSP
        return page

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        page = get_redoc_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=title,
            redoc_js_url=url(f"{REDOC}/redoc.standalone.js"),
            redoc_favicon_url=url(favicon),
            with_google_fonts=False,
        )
        page.headers["Content-Security-Policy"] = CSP
        return page
