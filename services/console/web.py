"""The console's pages (Starlette + Jinja2): sign-in, review queue, counter, lookup, audit.

Every form is CSRF-checked against the session's token (the sign-in form against a
cookie of its own), every page checks the staff member's role, every action is a signed
command of the console's bureau channel carrying the staff id, and logged with it.
"""

from __future__ import annotations

import hmac
import math
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl

import structlog
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.console.addresses import client_address
from services.console.audits import AuditBusyError, AuditRunner
from services.console.channel import ReplyTimeoutError
from services.console.i18n import LANGUAGES, choose_language, translator
from services.console.queue import QueueReader
from services.console.reads import StatusUnavailableError
from services.console.settings import ConsoleSettings
from services.console.staff import Area, Role, StaffDirectory, StaffSession, may_use
from shared.commands import Reply
from shared.identity import citizen_ref, is_valid_id_number, normalise_id_number
from shared.masking import mask_id_number
from shared.ratelimit import RateLimiter

log = structlog.get_logger()

HERE = Path(__file__).resolve().parent
CITIZEN_REF = re.compile(r"^[0-9a-f]{64}$")
APPLICATION_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
JOB_ID = re.compile(r"^[0-9a-f]{16}$")
# The longest value each form field may carry; anything longer is refused whole (400).
FIELD_LIMITS: Mapping[str, int] = {
    "csrf_token": 128, "staff_id": 64, "password": 256, "reason": 500, "decision": 16,
    "id_number": 32, "presented_id_number": 32, "proxy_id_number": 32, "proxy_name": 64,
    "authorisation_ref": 64, "by_proxy": 8, "application_id": 64, "citizen_ref": 64,
    "query": 64, "kind": 16, "scope": 8,
}
MAX_FIELDS = 24
HOME: Mapping[Role, str] = {Role.REVIEWER: "/review", Role.COUNTER: "/counter",
                            Role.AUDITOR: "/audit", Role.ADMIN: "/review"}
NAV = (("review", "nav_review", Area.REVIEW), ("counter", "nav_counter", Area.COUNTER),
       ("lookup", "nav_lookup", Area.LOOKUP), ("audit", "nav_audit", Area.AUDIT))


Endpoint = Callable[[Request, StaffSession], Awaitable[Response]]
ASGIEndpoint = Callable[[Request], Awaitable[Response]]


class CommandSender(Protocol):
    async def send_until_decided(self, service: str, command_type: str,
                                 payload: Mapping[str, Any], *, issued_at: datetime,
                                 attempts: int = 5) -> Reply: ...


class StatusSource(Protocol):
    async def card(self, citizen_ref: str) -> dict[str, Any] | None: ...

    async def timeline(self, citizen_ref: str) -> list[dict[str, Any]]: ...


@dataclass
class Console:
    """What the pages need from the running process."""

    settings: ConsoleSettings
    staff: Callable[[], StaffDirectory]
    queue: Callable[[], QueueReader]
    channel: Callable[[], CommandSender]
    status: Callable[[], StatusSource]
    audits: AuditRunner
    clock: Callable[[], datetime]
    database_answers: Callable[[], Awaitable[bool]]


class RefusedError(Exception):
    """A request the console turns away: an HTTP status and the label to show."""

    def __init__(self, status_code: int, label: str) -> None:
        super().__init__(label)
        self.status_code = status_code
        self.label = label


class SecurityHeaders:
    """Headers on every response: no framing, no sniffing, only this host's scripts."""

    HEADERS = (
        (b"content-security-policy",
         b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
         b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"),
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
        (b"referrer-policy", b"same-origin"),
    )

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.extend(self.HEADERS)
                if not scope["path"].startswith("/static/"):
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


def cookie_names(settings: ConsoleSettings) -> tuple[str, str]:
    """The session and sign-in cookies; `__Host-` pins them to this host, path /, Secure."""
    if settings.console_cookie_secure:
        return "__Host-cd_console", "__Host-cd_login"
    return "cd_console", "cd_login"


async def read_form(request: Request, limit: int) -> dict[str, str]:
    """A urlencoded form, refused before parsing when larger than `limit` bytes, and field
    by field when a value is longer than its limit."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise RefusedError(415, "bad_form")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise RefusedError(413, "too_large")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise RefusedError(413, "too_large")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True,
                          max_num_fields=MAX_FIELDS)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RefusedError(400, "bad_form") from exc
    form: dict[str, str] = {}
    for name, value in pairs:
        if len(value) > FIELD_LIMITS.get(name, 256):
            raise RefusedError(413, "too_large")
        form.setdefault(name, value)
    return form


def same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is None:  # older browsers send none on same-origin posts; CSRF token decides
        return True
    host = request.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")


class Pages:
    """What every page has to hand: templates, the staff session, CSRF-checked forms, the
    role guard, and a citizen's card and timeline. Each area of the console is a subclass
    holding its pages' endpoints; `create_app` lists the routes."""

    def __init__(self, console: Console, templates: Environment) -> None:
        self.console = console
        self.settings = console.settings
        self.templates = templates
        self.session_cookie, self.login_cookie = cookie_names(console.settings)

    def render(self, request: Request, template: str, staff: StaffSession | None,
               status_code: int = 200, **context: Any) -> HTMLResponse:
        lang = choose_language(request.cookies.get("cd_lang"),
                               request.headers.get("accept-language"))
        t = translator(lang)
        message = context.pop("message", None)
        nav = [(path, label) for path, label, area in NAV
               if staff is not None and may_use(staff.role, area)]
        page = self.templates.get_template(template).render(
            t=t, lang=lang, staff=staff, nav=nav, message=t(message) if message else None,
            **context)
        return HTMLResponse(page, status_code=status_code)

    async def current(self, request: Request) -> StaffSession | None:
        token = request.cookies.get(self.session_cookie)
        if not token:
            return None
        return await self.console.staff().session(token, self.console.clock())

    async def checked_form(self, request: Request, staff: StaffSession) -> dict[str, str]:
        if not same_origin(request):
            raise RefusedError(403, "csrf_refused")
        form = await read_form(request, self.settings.console_max_form_bytes)
        if not hmac.compare_digest(form.get("csrf_token", "").encode(),
                                   staff.csrf_token.encode()):
            log.warning("console.csrf_refused", staff_id=staff.staff_id, path=request.url.path)
            raise RefusedError(403, "csrf_refused")
        return form

    def page(self, path: str, area: Area | None, *, get: Endpoint | None = None,
             post: Endpoint | None = None) -> list[Route]:
        """The routes of a page for signed-in staff whose role may use `area` (any role when
        None): its GET and its POST endpoint."""
        methods = (("GET", get), ("POST", post))
        return [Route(path, self.guarded(area, endpoint), methods=[method])
                for method, endpoint in methods if endpoint is not None]

    def guarded(self, area: Area | None, endpoint: Endpoint) -> ASGIEndpoint:
        async def handle(request: Request) -> Response:
            staff = await self.current(request)
            if staff is None:
                if request.method == "POST":
                    raise RefusedError(403, "csrf_refused")
                return RedirectResponse("/sign-in", status_code=303)
            if area is not None and not may_use(staff.role, area):
                log.warning("console.forbidden", staff_id=staff.staff_id, role=staff.role.value,
                            path=request.url.path)
                return self.render(request, "error.html", staff, 403, message="forbidden")
            return await endpoint(request, staff)

        return handle

    def citizen_ref(self, id_number: str) -> str:
        return citizen_ref(self.settings.citizen_ref_pepper.get_secret_value(), id_number)

    async def citizen_view(self, citizen: str) -> dict[str, Any]:
        try:
            card = await self.console.status().card(citizen)
            timeline = await self.console.status().timeline(citizen)
        except StatusUnavailableError:
            return {"card": None, "timeline": [], "message": "status_unavailable"}
        portrait = [e["occurred_at"][:19].replace("T", " ") for e in timeline
                    if e.get("type") == "IdentityVerified"
                    and str(e.get("description", "")).startswith("Portrait")]
        return {"card": card, "timeline": timeline, "portrait_at": portrait[-1] if portrait
                else None}

    async def health(self, _request: Request) -> JSONResponse:
        if await self.console.database_answers():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable"}, status_code=503)

    async def refused(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RefusedError)
        staff = None
        try:
            staff = await self.current(request)
        except Exception:  # the refusal is shown even when the database does not answer
            log.warning("console.session_unreadable", exc_info=True)
        return self.render(request, "error.html", staff, exc.status_code,
                           message=exc.label, message_kind="error")


class AccountPages(Pages):
    """Signing in and out, the home redirect and the language switch."""

    # Client addresses whose sign-in buckets are kept; the least recently seen go first.
    ADDRESSES_KEPT = 10_000

    def __init__(self, console: Console, templates: Environment) -> None:
        super().__init__(console, templates)
        settings = console.settings
        self.trusted_proxies = settings.trusted_proxies()
        self.sign_ins = RateLimiter(settings.console_sign_in_per_minute / 60,
                                    settings.console_sign_in_burst,
                                    capacity=self.ADDRESSES_KEPT)

    async def sign_in_page(self, request: Request) -> Response:
        if await self.current(request) is not None:
            return RedirectResponse("/", status_code=303)
        return self.sign_in_form(request)

    def sign_in_form(self, request: Request, status_code: int = 200,
                     message: str | None = None, retry_after_s: float | None = None) -> Response:
        """The sign-in page; a refusal to come back later says when, in whole seconds (at
        least one), in `Retry-After`."""
        token = secrets.token_urlsafe(32)
        response = self.render(request, "sign_in.html", None, status_code, login_csrf=token,
                               message=message, message_kind="error")
        if retry_after_s is not None:
            response.headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
        response.set_cookie(self.login_cookie, token, max_age=3600, httponly=True,
                            secure=self.settings.console_cookie_secure, samesite="strict")
        return response

    async def sign_in(self, request: Request) -> Response:
        if not same_origin(request):
            raise RefusedError(403, "csrf_refused")
        # Before the form is read or a password hashed: one address cannot take every turn
        # at the hasher. The address is not logged (it may be a person's).
        wait = self.sign_ins.allow(client_address(request, self.trusted_proxies))
        if wait is not None:
            log.warning("console.sign_in_limited")
            return self.sign_in_form(request, 429, "too_many_sign_ins", retry_after_s=wait)
        form = await read_form(request, self.settings.console_max_form_bytes)
        expected = request.cookies.get(self.login_cookie, "")
        if not expected or not hmac.compare_digest(form.get("csrf_token", "").encode(),
                                                   expected.encode()):
            raise RefusedError(403, "csrf_refused")
        staff_id = form.get("staff_id", "").strip().lower()
        result = await self.console.staff().sign_in(staff_id, form.get("password", ""),
                                                    self.console.clock())
        log.info("console.sign_in", staff_id=staff_id, outcome=result.outcome)
        if result.outcome == "locked":
            return self.sign_in_form(request, 423, "locked")
        if result.outcome == "busy":
            # The wait this directory gives a sign-in.
            return self.sign_in_form(request, 503, "busy",
                                     retry_after_s=self.console.staff().passwords.wait_s)
        if result.outcome != "ok" or result.session is None or result.session_token is None:
            return self.sign_in_form(request, 401, "bad_credentials")
        secure = self.settings.console_cookie_secure
        response = RedirectResponse(HOME[result.session.role], status_code=303)
        response.set_cookie(self.session_cookie, result.session_token, httponly=True,
                            secure=secure, samesite="strict",
                            max_age=int(self.settings.console_session_max_hours * 3600))
        response.delete_cookie(self.login_cookie, secure=secure, httponly=True,
                               samesite="strict")
        return response

    async def sign_out(self, request: Request, staff: StaffSession) -> Response:
        await self.checked_form(request, staff)
        await self.console.staff().sign_out(request.cookies.get(self.session_cookie, ""))
        log.info("console.sign_out", staff_id=staff.staff_id)
        response = RedirectResponse("/sign-in", status_code=303)
        response.delete_cookie(self.session_cookie, secure=self.settings.console_cookie_secure,
                               httponly=True, samesite="strict")
        return response

    async def home(self, request: Request, staff: StaffSession) -> Response:
        return RedirectResponse(HOME[staff.role], status_code=303)

    async def language(self, request: Request) -> Response:
        lang = request.path_params["lang"]
        response = RedirectResponse("/", status_code=303)
        if lang in LANGUAGES:
            response.set_cookie("cd_lang", lang, max_age=365 * 86400, httponly=True,
                                secure=self.settings.console_cookie_secure, samesite="strict")
        return response


class ReviewPages(Pages):
    """The review queue, one application, and the reviewer's decision on it."""

    async def queue(self, request: Request, staff: StaffSession) -> Response:
        bureau = request.query_params.get("bureau") or None
        if bureau is not None and len(bureau) > 64:
            raise RefusedError(400, "bad_form")
        queue = self.console.queue()
        return self.render(request, "queue.html", staff, current="review", bureau=bureau,
                           applications=await queue.pending(bureau),
                           bureaus=await queue.bureaus())

    async def application_page(self, request: Request, staff: StaffSession,
                               reply: Reply | None = None, status_code: int = 200,
                               message: str | None = None) -> Response:
        application_id = request.path_params["application_id"]
        if not APPLICATION_ID.fullmatch(application_id):
            raise RefusedError(404, "not_found")
        application = await self.console.queue().get(application_id)
        if application is None:
            raise RefusedError(404, "not_found")
        view = await self.citizen_view(application.citizen_ref)
        if message is not None:
            view["message"] = message
        return self.render(request, "application.html", staff, status_code, current="review",
                           application=application, reply=reply, **view)

    async def application(self, request: Request, staff: StaffSession) -> Response:
        return await self.application_page(request, staff)

    async def decide(self, request: Request, staff: StaffSession) -> Response:
        form = await self.checked_form(request, staff)
        application_id = request.path_params["application_id"]
        decision, reason = form.get("decision", ""), form.get("reason", "").strip()
        if decision not in ("approve", "reject") or not APPLICATION_ID.fullmatch(application_id):
            raise RefusedError(400, "bad_form")
        if decision == "reject" and not reason:
            return await self.application_page(request, staff, status_code=400,
                                               message="reason_required")
        try:
            reply = await self.console.channel().send_until_decided(
                "review", "DecideReview",
                {"application_id": application_id, "reviewer_id": staff.staff_id,
                 "decision": decision, "reason": reason}, issued_at=self.console.clock())
        except ReplyTimeoutError:
            log.warning("console.no_reply", staff_id=staff.staff_id, command="DecideReview",
                        application_id=application_id)
            return await self.application_page(request, staff, status_code=504,
                                               message="no_reply")
        log.info("console.review_decided", staff_id=staff.staff_id,
                 application_id=application_id, decision=decision, code=reply.code)
        return await self.application_page(request, staff, reply=reply)


class CounterPages(Pages):
    """The bureau counter: find a citizen by ID number, hand over a card ready for pickup."""

    def counter_page(self, request: Request, staff: StaffSession, status_code: int = 200,
                     **context: Any) -> HTMLResponse:
        return self.render(request, "counter.html", staff, status_code, current="counter",
                           **context)

    def invalid_id_number(self, request: Request, staff: StaffSession) -> HTMLResponse:
        return self.counter_page(request, staff, 400, message="invalid_id_number",
                                 message_kind="error")

    async def show(self, request: Request, staff: StaffSession) -> Response:
        return self.counter_page(request, staff)

    async def find(self, request: Request, staff: StaffSession) -> Response:
        form = await self.checked_form(request, staff)
        id_number = form.get("id_number", "")
        if not is_valid_id_number(id_number):
            return self.invalid_id_number(request, staff)
        ref = self.citizen_ref(id_number)
        view = await self.citizen_view(ref)
        log.info("console.counter_lookup", staff_id=staff.staff_id, citizen_ref=ref,
                 found=view["card"] is not None)
        return self.counter_page(request, staff, found=True,
                                 masked_id=mask_id_number(normalise_id_number(id_number)),
                                 **view)

    async def collect(self, request: Request, staff: StaffSession) -> Response:
        form = await self.checked_form(request, staff)
        ref, application_id = form.get("citizen_ref", ""), form.get("application_id", "")
        presented = form.get("presented_id_number", "")
        if not CITIZEN_REF.fullmatch(ref) or not APPLICATION_ID.fullmatch(application_id):
            raise RefusedError(400, "bad_form")
        if not is_valid_id_number(presented):
            return self.invalid_id_number(request, staff)
        view = await self.citizen_view(ref)
        card = view["card"]
        if card is None or card.get("application_id") != application_id \
                or card.get("status") != "READY_FOR_PICKUP":
            return self.counter_page(request, staff, 409, found=True, **view)
        payload: dict[str, Any] = {"application_id": application_id,
                                   "bureau_id": card["pickup_bureau"],
                                   "presented_id_number": normalise_id_number(presented)}
        if form.get("by_proxy") == "yes":
            proxy_id = form.get("proxy_id_number", "")
            if not is_valid_id_number(proxy_id):
                return self.invalid_id_number(request, staff)
            payload["proxy"] = {"id_number": normalise_id_number(proxy_id),
                                "name": form.get("proxy_name", "").strip(),
                                "authorisation_ref": form.get("authorisation_ref", "").strip()}
        try:
            reply = await self.console.channel().send_until_decided(
                "issuance", "CollectCard", payload, issued_at=self.console.clock())
        except ReplyTimeoutError:
            log.warning("console.no_reply", staff_id=staff.staff_id, command="CollectCard",
                        citizen_ref=ref, application_id=application_id)
            return self.counter_page(request, staff, 504, message="no_reply",
                                     message_kind="error")
        log.info("console.card_collection", staff_id=staff.staff_id, citizen_ref=ref,
                 application_id=application_id, by_proxy="proxy" in payload, code=reply.code)
        return self.counter_page(request, staff, reply=reply, card=card)


class LookupPages(Pages):
    """A citizen's card and timeline, by ID number or citizen reference."""

    async def show(self, request: Request, staff: StaffSession) -> Response:
        return self.render(request, "lookup.html", staff, current="lookup")

    async def search(self, request: Request, staff: StaffSession) -> Response:
        form = await self.checked_form(request, staff)
        query = form.get("query", "").strip()
        if CITIZEN_REF.fullmatch(query.lower()):
            ref = query.lower()
        elif is_valid_id_number(query):
            ref = self.citizen_ref(query)
        else:
            return self.render(request, "lookup.html", staff, 400, current="lookup",
                               message="invalid_id_number", message_kind="error")
        log.info("console.citizen_lookup", staff_id=staff.staff_id, citizen_ref=ref)
        return self.render(request, "lookup.html", staff, current="lookup", searched=True,
                           **await self.citizen_view(ref))


class AuditPages(Pages):
    """The auditor's runs of `verify` and `replay`, and their progress."""

    def audit_page(self, request: Request, staff: StaffSession, status_code: int = 200,
                   **context: Any) -> HTMLResponse:
        return self.render(request, "audit.html", staff, status_code, current="audit",
                           jobs=self.recent_jobs(), **context)

    def recent_jobs(self) -> list[Any]:
        return sorted(self.console.audits.jobs.values(), key=lambda j: j.started_at,
                      reverse=True)[:10]

    def job_of(self, request: Request) -> Any:
        job_id = request.path_params["job_id"]
        job = self.console.audits.jobs.get(job_id) if JOB_ID.fullmatch(job_id) else None
        if job is None:
            raise RefusedError(404, "not_found")
        return job

    async def show(self, request: Request, staff: StaffSession) -> Response:
        return self.audit_page(request, staff)

    async def start(self, request: Request, staff: StaffSession) -> Response:
        form = await self.checked_form(request, staff)
        kind, scope = form.get("kind", ""), form.get("scope", "all")
        if kind not in ("verify", "replay") or scope not in ("all", "one"):
            raise RefusedError(400, "bad_form")
        ref: str | None = None
        if kind == "replay" and scope == "one":
            id_number = form.get("id_number", "")
            if not is_valid_id_number(id_number):
                return self.audit_page(request, staff, 400, message="invalid_id_number",
                                       message_kind="error")
            ref = self.citizen_ref(id_number)
        try:
            job = self.console.audits.start("verify" if kind == "verify" else "replay", ref,
                                            staff.staff_id)
        except AuditBusyError:
            return self.audit_page(request, staff, 409, message="audit_busy",
                                   message_kind="error")
        return RedirectResponse(f"/audit/{job.job_id}", status_code=303)

    async def job(self, request: Request, staff: StaffSession) -> Response:
        return self.render(request, "audit_job.html", staff, current="audit",
                           job=self.job_of(request))

    async def progress(self, request: Request, staff: StaffSession) -> Response:
        return self.render(request, "_audit_progress.html", staff, job=self.job_of(request))


def create_app(console: Console, lifespan: Callable[[Starlette],
               AbstractAsyncContextManager[None]] | None = None) -> Starlette:
    templates = Environment(loader=FileSystemLoader(HERE / "templates"),
                            autoescape=select_autoescape(["html"]), auto_reload=False)
    pages = Pages(console, templates)
    account = AccountPages(console, templates)
    review = ReviewPages(console, templates)
    counter = CounterPages(console, templates)
    lookup = LookupPages(console, templates)
    audit = AuditPages(console, templates)
    app = Starlette(
        routes=[
            Route("/health", pages.health, methods=["GET"]),
            Route("/sign-in", account.sign_in_page, methods=["GET"]),
            Route("/sign-in", account.sign_in, methods=["POST"]),
            Route("/lang/{lang}", account.language, methods=["GET"]),
            *pages.page("/", None, get=account.home),
            *pages.page("/sign-out", None, post=account.sign_out),
            *pages.page("/review", Area.REVIEW, get=review.queue),
            *pages.page("/review/{application_id}", Area.REVIEW, get=review.application),
            *pages.page("/review/{application_id}/decision", Area.REVIEW, post=review.decide),
            *pages.page("/counter", Area.COUNTER, get=counter.show),
            *pages.page("/counter/find", Area.COUNTER, post=counter.find),
            *pages.page("/counter/collect", Area.COUNTER, post=counter.collect),
            *pages.page("/lookup", Area.LOOKUP, get=lookup.show, post=lookup.search),
            *pages.page("/audit", Area.AUDIT, get=audit.show, post=audit.start),
            *pages.page("/audit/{job_id}", Area.AUDIT, get=audit.job),
            *pages.page("/audit/{job_id}/progress", Area.AUDIT, get=audit.progress),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ],
        exception_handlers={RefusedError: pages.refused},
        lifespan=lifespan,
    )
    app.add_middleware(SecurityHeaders)
    return app
