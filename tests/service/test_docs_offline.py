"""Every page the app serves works without internet: its assets come from the app itself."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

from tests.service.conftest import TestClient

BASE = "http://testserver/"  # TestClient's origin: the app itself
PAGES = ["/", "/docs"]
URL = re.compile(r"""https?://[^\s"'<>)]+""")
# XML namespace names identify a vocabulary; browsers never fetch them.
NAMESPACES = {"http://www.w3.org/2000/svg"}
TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png", ".svg": "image/svg+xml"}


class _Assets(HTMLParser):
    """src/href of every element, and the spec URL Swagger UI's inline script loads."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]

    def handle_data(self, data: str) -> None:
        self.urls += re.findall(r"url: '([^']+)'", data)


def _assets(client: TestClient, page: str) -> tuple[str, list[str]]:
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), (page, r.status_code)
    parser = _Assets()
    parser.feed(r.text)
    return r.text, [urljoin(BASE + page.lstrip("/"), u) for u in parser.urls]


def _external(text: str) -> list[str]:
    return [u for u in URL.findall(text) if urlsplit(u).hostname != "testserver" and u not in NAMESPACES]


def test_docs_and_every_asset_they_reference_are_served_locally(client: TestClient) -> None:
    html, urls = _assets(client, "/docs")
    paths = {urlsplit(u).path for u in urls}
    assert {
        "/static/swagger/swagger-ui-bundle.js",
        "/static/swagger/swagger-ui.css",
        "/static/swagger/favicon-32x32.png",
        "/openapi.json",
    } <= paths, paths
    for url in urls:
        r = client.get(url)
        assert r.status_code == 200, url
        suffix = "." + url.rsplit(".", 1)[-1]
        if suffix in TYPES:
            assert TYPES[suffix] in r.headers["content-type"], (url, r.headers["content-type"])
    assert '"validatorUrl": null' in html, "the online validator badge would call validator.swagger.io"
    bundle = client.get("/static/swagger/swagger-ui-bundle.js").text
    assert "SwaggerUIBundle" in bundle and len(bundle) > 1_000_000, "the real bundle, not a stub"
    assert client.get("/static/swagger/LICENSE").status_code == 200


def test_no_page_references_another_host(client: TestClient) -> None:
    for page in PAGES:
        html, urls = _assets(client, page)
        assert _external(html) == [], page
        assert all(urlsplit(u).hostname == "testserver" for u in urls), urls
        for url in urls:
            r = client.get(url)
            assert r.status_code == 200, (page, url)
            # The inspector's own scripts and styles too (the vendored Swagger bundle only names
            # specifications and licenses in strings, and its validator is turned off above).
            if "/static/inspector/" in url:
                assert _external(r.text) == [], url


def test_redoc_is_off_and_unknown_static_files_are_problems(client: TestClient) -> None:
    assert client.get("/redoc").status_code == 404
    missing = client.get("/static/no-such-file.js")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
