"""The AsyncAPI docs page loads nothing from another host: bureaus run on closed networks."""

from __future__ import annotations

import re
from typing import Any

import httpx

from services.status.api import QueryBackend, create_app
from services.status.settings import StatusSettings

REFERENCE = re.compile(r"""(?:src|href|action)\s*=\s*["']([^"']*)["']""", re.IGNORECASE)


def external_references(html: str) -> list[str]:
    """Every src/href/action that names a host (absolute or protocol-relative URL)."""
    return [url for url in REFERENCE.findall(html)
            if re.match(r"^\s*(?:[a-z][a-z0-9+.-]*:)?//", url, re.IGNORECASE)]


def client() -> httpx.AsyncClient:
    def no_pool() -> Any:
        raise AssertionError("the docs need no database")

    async def no_kafka() -> dict[str, str | None]:
        return {"kafka": "does not answer"}

    app = create_app(QueryBackend(StatusSettings(), "status", no_pool, no_kafka))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://docs")


def test_the_external_reference_finder_sees_cdn_links() -> None:
    page = ('<script src="https://unpkg.com/x.js"></script><link href="//cdn.example/s.css">'
            '<script src="/docs/static/asyncapi/index.js"></script>')
    assert external_references(page) == ["https://unpkg.com/x.js", "//cdn.example/s.css"]


async def test_the_asyncapi_page_references_no_external_host() -> None:
    async with client() as http:
        page = await http.get("/docs/asyncapi")
    assert page.status_code == 200
    assert "AsyncApiStandalone" in page.text
    assert external_references(page.text) == []
    assert "unpkg" not in page.text and "jsdelivr" not in page.text


async def test_the_asyncapi_page_script_and_styles_are_served_locally() -> None:
    async with client() as http:
        page = (await http.get("/docs/asyncapi")).text
        local = [url for url in REFERENCE.findall(page) if url.startswith("/")]
        assert {"/docs/static/asyncapi/index.js",
                "/docs/static/asyncapi/default.min.css"} <= set(local)
        for url in local:
            response = await http.get(url)
            assert response.status_code == 200, url
            assert len(response.content) > 1000, url
        assert "AsyncApiStandalone" in (await http.get("/docs/static/asyncapi/index.js")).text


async def test_the_embedded_document_cannot_close_the_script_early() -> None:
    async with client() as http:
        page = (await http.get("/docs/asyncapi")).text
    script = page.split('<script>', 1)[1]
    assert script.count("</script>") == 1
