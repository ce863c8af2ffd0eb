"""The citizen's journey of DESIGN section 1, driven as a channel drives it.

Used by `cardctl demo`, the end-to-end tests and the benchmarks.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from cardctl.channel import ChannelSimulator, pick_channel
from cardctl.citizens import SyntheticCitizen
from services.status.settings import StatusSettings
from shared.tokens import session_id_of

# Refusals that only mean another service's view has not caught up with an event yet.
NOT_YET = {
    "ReportLoss": frozenset({"no_card"}),
    "SubmitReissueApplication": frozenset({"no_formal_loss"}),
    "DecideReview": frozenset({"unknown_application"}),
    "CollectCard": frozenset({"unknown_application", "not_ready_for_pickup"}),
}

@dataclass
class Session:
    citizen: SyntheticCitizen
    citizen_ref: str = ""
    token: str = ""
    application_id: str = ""
    log: list[tuple[str, str]] = field(default_factory=list)

    @property
    def key(self) -> str | None:
        return session_id_of(self.token) if self.token else None


class Journey:
    """Each step sends one command and records what came back."""

    def __init__(self, sim: ChannelSimulator, status_url: str | None = None,
                 *, retry_for_s: float = 60.0,
                 also_retry: dict[str, frozenset[str]] | None = None,
                 citizen_channel: str | None = None, bureau_channel: str | None = None,
                 api_key: str | None = None) -> None:
        self.sim = sim
        # The citizen's steps come from one channel, the bureau's from another: by default
        # the first of each kind in the channels file.
        self.citizen_channel = pick_channel(sim.channels, citizen_channel,
                                            bureau=False).channel_id
        self.bureau_channel = pick_channel(sim.channels, bureau_channel, bureau=True).channel_id
        self.status_url = status_url
        # The query API's bearer key (default: CARDDESK_QUERY_API_KEY, else the auditor's).
        self.api_headers = {"Authorization": f"Bearer {api_key or StatusSettings().caller_key()}"}
        self.retry_for_s = retry_for_s
        self.retry_codes = {command: NOT_YET.get(command, frozenset())
                            | (also_retry or {}).get(command, frozenset())
                            for command in {*NOT_YET, *(also_retry or {})}}

    async def _send(self, s: Session, service: str, command: str, payload: dict[str, Any],
                    *, bureau: bool = False) -> dict[str, Any]:
        channel = self.bureau_channel if bureau else self.citizen_channel
        reply = await self.sim.expect_accepted(
            service, command, payload, channel_id=channel, session_key=s.key,
            retry_codes=self.retry_codes.get(command, frozenset()),
            retry_for_s=self.retry_for_s,
        )
        s.log.append((command, reply.code))
        return reply.data

    async def log_in(self, s: Session) -> None:
        captcha = await self._send(s, "auth", "IssueCaptcha", {})
        data = await self._send(s, "auth", "StartSession", {
            "id_number": s.citizen.id_number, "name": s.citizen.name,
            "captcha_id": captcha["captcha_id"], "captcha_code": captcha["code"],
        })
        s.token, s.citizen_ref = data["session_token"], data["citizen_ref"]

    async def authorize_e_card(self, s: Session) -> None:
        await self._send(s, "auth", "AuthorizeElectronicCard", {"session_token": s.token})

    async def verify_portrait(self, s: Session, liveness: float = 0.99) -> None:
        data = await self._send(s, "auth", "VerifyPortrait", {
            "session_token": s.token, "liveness_score": liveness,
            "face_embedding": s.citizen.face_embedding,
        })
        s.token = data["session_token"]

    async def report_loss(self, s: Session, kind: str) -> None:
        await self._send(s, "loss", "ReportLoss", {"session_token": s.token, "kind": kind})

    async def apply_for_reissue(self, s: Session, bureau: str = "bureau-001") -> None:
        data = await self._send(s, "review", "SubmitReissueApplication", {
            "session_token": s.token, "address": s.citizen.address,
            "phone": s.citizen.phone, "photo_ref": s.citizen.photo_ref, "pickup_bureau": bureau,
        })
        s.application_id = data["application_id"]

    async def approve(self, s: Session, reviewer: str = "reviewer-7") -> None:
        await self._send(s, "review", "DecideReview", {
            "application_id": s.application_id, "reviewer_id": reviewer,
            "decision": "approve", "reason": "documents in order",
        }, bureau=True)

    async def collect(self, s: Session, bureau: str = "bureau-001") -> None:
        await self._send(s, "issuance", "CollectCard", {
            "application_id": s.application_id, "bureau_id": bureau,
            "presented_id_number": s.citizen.id_number,
        }, bureau=True)

    async def whole(self, s: Session, *, auto_approved: bool = False) -> None:
        """Captcha to collected card: what `cardctl demo` shows."""
        await self.log_in(s)
        await self.authorize_e_card(s)
        await self.verify_portrait(s)
        await self.report_loss(s, "formal")
        await self.apply_for_reissue(s)
        if not auto_approved:
            await self.approve(s)
        await self.collect(s)

    async def _query(self, path: str, *, attempts: int = 5) -> httpx.Response:
        """GET from the status API; past the caller's rate limit (429), wait as the API asks
        (at most 2 s a time) and try again, a bounded number of times."""
        assert self.status_url, "no status API configured"
        async with httpx.AsyncClient(base_url=self.status_url, timeout=5.0,
                                     headers=self.api_headers) as client:
            for _ in range(attempts - 1):
                response = await client.get(path)
                if response.status_code != 429:
                    return response
                wait = response.headers.get("retry-after", "1")
                await asyncio.sleep(min(2.0, float(wait)) if wait.isdigit() else 1.0)
            return await client.get(path)

    async def card(self, citizen_ref: str) -> dict[str, Any] | None:
        assert self.status_url, "no status API configured"
        response = await self._query(f"/v1/citizens/{citizen_ref}/card")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    async def timeline(self, citizen_ref: str) -> list[dict[str, Any]]:
        assert self.status_url, "no status API configured"
        response = await self._query(f"/v1/citizens/{citizen_ref}/timeline")
        response.raise_for_status()
        return response.json()["entries"]  # type: ignore[no-any-return]

    async def wait_for_timeline(self, citizen_ref: str, *types: str,
                                timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """The timeline, once it holds `types` (a type named twice, at least twice): the
        status service follows several topics, and one may lag behind the others."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        wanted = Counter(types)
        entries: list[dict[str, Any]] = []
        while asyncio.get_running_loop().time() < deadline:
            entries = await self.timeline(citizen_ref)
            if wanted <= Counter(e["type"] for e in entries):
                return entries
            await asyncio.sleep(0.1)
        raise TimeoutError(f"timeline never held {types}; it has {[e['type'] for e in entries]}")

    async def wait_for_status(self, citizen_ref: str, status: str,
                              timeout_s: float = 60.0) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + timeout_s
        row: dict[str, Any] | None = None
        while asyncio.get_running_loop().time() < deadline:
            row = await self.card(citizen_ref)
            if row is not None and row["status"] == status:
                return row
            await asyncio.sleep(0.1)
        raise TimeoutError(f"status never became {status}; last row {row}")
