"""No page of a command service loads anything from another host: FastStream's own AsyncAPI
page would (a CDN), so the command services serve none; the status service's is vendored."""

from __future__ import annotations

import httpx

from services.loss.main import SPEC
from services.loss.settings import LossSettings
from shared.service import bootstrap


async def test_a_command_service_serves_no_asyncapi_page_of_its_own() -> None:
    app = bootstrap(SPEC, LossSettings()).runtime.app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://loss") as http:
        for path in ("/docs/asyncapi", "/docs/asyncapi.json"):
            response = await http.get(path)
            assert response.status_code == 404, path
            assert "cdn" not in response.text.lower()
