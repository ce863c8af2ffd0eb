"""What the console shows about a citizen: the status service's query API (DESIGN section 7),
called with the console channel's api key."""

from __future__ import annotations

from typing import Any

import httpx


class StatusUnavailableError(Exception):
    """The query API did not answer as it should."""


class StatusReader:
    def __init__(self, base_url: str, api_key: str | None, timeout_s: float = 5.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout_s)

    async def close(self) -> None:
        await self._http.aclose()

    async def card(self, citizen_ref: str) -> dict[str, Any] | None:
        response = await self._get(f"/v1/citizens/{citizen_ref}/card")
        if response.status_code == 404:
            return None
        card: dict[str, Any] = response.json()
        return card

    async def timeline(self, citizen_ref: str) -> list[dict[str, Any]]:
        response = await self._get(f"/v1/citizens/{citizen_ref}/timeline")
        entries: list[dict[str, Any]] = response.json().get("entries", [])
        return entries

    async def _get(self, path: str) -> httpx.Response:
        try:
            response = await self._http.get(path)
        except httpx.HTTPError as exc:
            raise StatusUnavailableError(str(exc)) from exc
        if response.status_code not in (200, 404):
            raise StatusUnavailableError(f"status API answered {response.status_code}")
        return response
