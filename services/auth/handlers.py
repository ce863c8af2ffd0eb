"""Auth command handlers: verify inputs against tokens, captchas and the registry, then decide.

Each runs inside the command intake's transaction (see `shared.commands`). A refusal that
must keep what it wrote (a burnt captcha, a failed portrait attempt) returns `Refusal`;
any other `DomainError` undoes the handler's writes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from datetime import datetime
from typing import Any

import asyncpg
import structlog

from services.auth import domain
from services.auth.adapters import (
    CaptchaStore,
    LoginFailureLog,
    PopulationRegistry,
    RegistryEntries,
    begin_login,
    new_captcha_code,
    postgres_registry,
)
from services.auth.settings import AuthSettings
from shared.application import Streams
from shared.commands import CommandContext, Refusal
from shared.contracts.auth import (
    AuthEvent,
    AuthorizeElectronicCard,
    IssueCaptcha,
    SessionStarted,
    StartSession,
    VerifyPortrait,
)
from shared.crypto import DataKeyDestroyedError, MasterKeys, Vault
from shared.erasure import Erasure
from shared.errors import DomainError, SubjectErasedError
from shared.events import EventMeta
from shared.identity import citizen_ref, is_valid_id_number
from shared.intake.prepare import prepared, session_citizen
from shared.service import Kit
from shared.tokens import SessionClaims, TokenSigner, TokenVerifier

log = structlog.get_logger()


def portrait_policy(settings: AuthSettings) -> domain.PortraitPolicy:
    return domain.PortraitPolicy(
        similarity_threshold=settings.portrait_similarity_threshold,
        liveness_threshold=settings.portrait_liveness_threshold,
        max_failures=settings.portrait_max_failures,
        failure_window=settings.portrait_failure_window,
        lockout=settings.portrait_lockout,
    )


def login_policy(settings: AuthSettings) -> domain.LoginPolicy:
    return domain.LoginPolicy(
        max_failures_per_citizen=settings.login_max_failures_per_citizen,
        max_failures_per_channel=settings.login_max_failures_per_channel,
        window=settings.login_failure_window,
    )


async def forget_entry(conn: asyncpg.Connection, citizen_ref: str) -> None:
    """An erased citizen's entry, read with the batch before their key was destroyed, is not
    the one to go by for the rest of the batch."""
    read = prepared(conn)
    if isinstance(read, RegistryEntries):
        read.forget(citizen_ref)


def bind_citizen(ref: str) -> None:
    structlog.contextvars.bind_contextvars(citizen_ref=ref)


class AuthHandlers:
    """The application layer of auth: one method per command type, and the purge loop."""

    def __init__(
        self,
        kit: Kit[AuthSettings],
        *,
        registry_for: Callable[[asyncpg.Connection], PopulationRegistry] | None = None,
        new_code: Callable[[int], str] = new_captcha_code,
    ) -> None:
        settings = kit.settings
        self.settings = settings
        self.clock = kit.clock
        self.ids = kit.ids
        self.schema = kit.schema
        # The registry in auth's own schema, whose entries a batch reads at once (`prepare`).
        self.registry_in_schema = registry_for is None
        self.registry_for = registry_for or (
            lambda conn: postgres_registry(conn, settings, kit.schema))
        self.new_code = new_code
        self.pepper = settings.citizen_ref_pepper.get_secret_value()
        self.captchas = CaptchaStore(kit.schema, self.pepper)
        self.signer = TokenSigner.from_settings(settings)
        self.verifier = TokenVerifier.from_settings(settings)
        # Whose stream a command decides on, before it runs (`CommandRoute.citizen`).
        self.citizen = session_citizen(self.verifier)
        self.policy = portrait_policy(settings)
        self.login_policy = login_policy(settings)
        self.login_failures = LoginFailureLog(kit.schema)
        self.streams = Streams(domain.DECIDER, kit.schema, kit.events_topic)
        self.erasure = Erasure(self.streams, Vault(kit.schema, MasterKeys.from_settings(settings)),
                               on_erased=forget_entry)

    async def prepare(self, conn: asyncpg.Connection,
                      citizen_refs: Collection[str]) -> RegistryEntries | None:
        """A command batch's citizens' streams read in one statement and their registry
        entries in one more (`shared.intake.prepare`); the registry takes the entries."""
        await self.streams.warm(conn, citizen_refs)
        if not self.registry_in_schema:
            return None
        return await RegistryEntries.read(conn, self.schema, citizen_refs)

    def login_citizen(self, _ctx: CommandContext, cmd: StartSession) -> str | None:
        """Whose stream a login decides on, and whose failures it counts, if its ID number is
        well formed (the handler still checks the captcha and the name before it decides)."""
        if not is_valid_id_number(cmd.id_number):
            return None
        return citizen_ref(self.pepper, cmd.id_number)

    async def issue_captcha(
        self, conn: asyncpg.Connection, ctx: CommandContext, _cmd: IssueCaptcha
    ) -> dict[str, Any]:
        captcha_id = self.ids()
        code = self.new_code(self.settings.captcha_code_length)
        expires_at = ctx.received_at + self.settings.captcha_ttl
        await self.captchas.issue(conn, captcha_id, code, expires_at)
        log.info("auth.captcha_issued", captcha_id=captcha_id)
        return {"captcha_id": captcha_id, "code": code}

    async def start_session(
        self, conn: asyncpg.Connection, ctx: CommandContext, cmd: StartSession
    ) -> dict[str, Any] | Refusal:
        now = ctx.received_at
        # Failures count by citizen_ref (never the ID number) and by channel. The captcha is
        # burnt by this attempt whatever follows: refusals below must keep that write.
        presented = self.login_citizen(ctx, cmd)
        captcha, failures = await begin_login(
            conn, self.captchas, self.login_failures, cmd.captcha_id, now, presented,
            ctx.channel.channel_id, now - self.login_policy.window)
        try:
            domain.check_login_throttle(failures, self.login_policy)
        except domain.TooManyAttemptsError as exc:  # not itself a failure: the window runs out
            log.info("auth.session_refused", code=exc.code)
            return Refusal(exc.code, exc.message)
        try:
            id_number = domain.require_valid_id_number(cmd.id_number)
            domain.check_captcha(captcha, self.captchas.digest(cmd.captcha_id, cmd.captcha_code),
                                 now)
            ref = citizen_ref(self.pepper, id_number)
            bind_citizen(ref)
            if not await self.registry_for(conn).name_matches(ref, cmd.name):
                raise domain.IdentityMismatchError()
            expires_at = now + self.settings.session_ttl
            events = await self._decide(conn, ctx, ref, domain.BeginSession(
                channel=ctx.channel.channel_id, expires_at=expires_at))
            session_id = next(e for e in events if isinstance(e, SessionStarted)).session_id
        except DomainError as exc:
            await self.login_failures.record(conn, presented, ctx.channel.channel_id, now)
            log.info("auth.session_refused", code=exc.code)
            return Refusal(exc.code, exc.message)
        if failures.citizen:
            await self.login_failures.clear_citizen(conn, ref)
        token = self.signer.sign(SessionClaims(
            kid=self.signer.key_id, session_id=session_id, citizen_ref=ref,
            channel=ctx.channel.channel_id, level="realname",
            issued_at=now, expires_at=expires_at,
        ))
        log.info("auth.session_started", session_id=session_id)
        return {"session_token": token, "citizen_ref": ref, "expires_at": expires_at.isoformat()}

    async def authorize_electronic_card(
        self, conn: asyncpg.Connection, ctx: CommandContext, cmd: AuthorizeElectronicCard
    ) -> None:
        claims = self.verifier.verify(cmd.session_token, now=ctx.received_at,
                                      channel=ctx.channel.channel_id)
        bind_citizen(claims.citizen_ref)
        await self._decide(conn, ctx, claims.citizen_ref, domain.AuthorizeCard(
            session_id=claims.session_id, channel=ctx.channel.channel_id))
        log.info("auth.electronic_card_authorized", session_id=claims.session_id)

    async def verify_portrait(
        self, conn: asyncpg.Connection, ctx: CommandContext, cmd: VerifyPortrait
    ) -> dict[str, Any] | Refusal:
        now = ctx.received_at
        claims = self.verifier.verify(cmd.session_token, now=now, channel=ctx.channel.channel_id)
        bind_citizen(claims.citizen_ref)
        try:
            template = await self.registry_for(conn).face_template(claims.citizen_ref)
        except DataKeyDestroyedError as exc:
            raise SubjectErasedError() from exc
        if template is None:
            raise domain.IdentityMismatchError("no portrait is enrolled for this citizen")
        # The embedding stops here: only the score reaches the decider and the log.
        similarity = domain.cosine_similarity(cmd.face_embedding, template)
        events = await self._decide(conn, ctx, claims.citizen_ref, domain.AttemptPortrait(
            session_id=claims.session_id, liveness_score=cmd.liveness_score,
            similarity=similarity))
        refusal = domain.refusal_for(events)
        if refusal is not None:
            log.info("auth.portrait_failed", code=refusal.code)
            return Refusal(refusal.code, refusal.message)
        upgraded = claims.model_copy(
            update={"level": "portrait", "portrait_verified_at": now, "issued_at": now}
        )
        log.info("auth.portrait_verified", session_id=claims.session_id)
        return {"session_token": self.signer.sign(upgraded)}

    async def _decide(
        self, conn: asyncpg.Connection, ctx: CommandContext, ref: str, command: domain.AuthCommand
    ) -> list[AuthEvent]:
        now: datetime = ctx.received_at
        context = domain.DecisionContext(now=now, new_id=self.ids, policy=self.policy)
        envelopes = await self.streams.decide(conn, command, context, EventMeta(
            citizen_ref=ref, occurred_at=now,
            correlation_id=ctx.correlation_id, causation_id=ctx.causation_id))
        return [domain.decode_event(e) for e in envelopes]

    # ------------------------------------------------------------------------- purge

    async def purge(self, pool: asyncpg.Pool) -> tuple[int, int]:
        """Delete expired captchas and failed logins outside every window; returns how many
        of each."""
        now = self.clock()
        async with pool.acquire() as conn:
            purged = await self.captchas.purge(conn, now - self.settings.captcha_ttl)
            forgotten = await self.login_failures.purge(
                conn, now - self.settings.login_failure_window)
        if purged:
            log.info("auth.captchas_purged", count=purged)
        if forgotten:
            log.info("auth.login_failures_purged", count=forgotten)
        return purged, forgotten

    async def purge_loop(self, pool: asyncpg.Pool) -> None:
        """Expired captchas and failed logins outside the window serve no purpose; keep the
        tables small."""
        while True:
            await self.purge(pool)
            await asyncio.sleep(min(self.settings.captcha_ttl_seconds,
                                    self.settings.login_failure_window_seconds))
