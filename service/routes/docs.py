"""`/docs` from vendored Swagger UI assets, and the `/static` files, so no page needs the internet.

FastAPI's own `/docs` loads Swagger UI from a CDN, which fails on air-gapped hosts; the app is
built with `docs_url=None, redoc_url=None` and this router serves the same page from local files.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
STATIC_PATH = "/static"

router = APIRouter(include_in_schema=False)


def static_files() -> StaticFiles:
    """The app's static files (inspector page, vendored Swagger UI), mounted at `STATIC_PATH`."""
    return StaticFiles(directory=STATIC_DIR)


@router.get("/docs", response_class=HTMLResponse)
async def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI for `/openapi.json`, every asset served by this app."""
    # root_path: behind a proxy that mounts the app under a prefix, asset URLs need the prefix too.
    prefix = request.scope.get("root_path", "").rstrip("/")
    assets = f"{prefix}{STATIC_PATH}/swagger"
    return get_swagger_ui_html(
        openapi_url=f"{prefix}{request.app.openapi_url}",
        title=f"{request.app.title} - API docs",
        swagger_js_url=f"{assets}/swagger-ui-bundle.js",
        swagger_css_url=f"{assets}/swagger-ui.css",
        swagger_favicon_url=f"{assets}/favicon-32x32.png",
        # The default validator badge sends the spec to validator.swagger.io.
        swagger_ui_parameters={"validatorUrl": None},
    )
