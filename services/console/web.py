"""The console's pages (Starlette + Jinja2): sign-in, review queue, counter, lookup, audit.

Every form is CSRF-checked against the session's token (the sign-in form against a
cookie of its own), every page checks the staff member's role, every action is a signed
command of the console's bureau channel carrying the staff id, and logged with it.
"""

from __future__ import annotations

import hmac
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


def create_app(console: Console, lifespan: Callable[[Starlette],
               AbstractAsyncContextManager[None]] | None = None) -> Starlette:
    settings = console.settings
    session_cookie, login_cookie = cookie_names(settings)
    templates = Environment(loader=FileSystemLoader(HERE / "templates"),
                            autoescape=select_autoescape(["html"]), auto_reload=False)

    def render(request: Request, template: str, staff: StaffSession | None,
               status_code: int = 200, **context: Any) -> HTMLResponse:
        lang = choose_language(request.cookies.get("cd_lang"),
                               request.headers.get("accept-language"))
        t = translator(lang)
        message = context.pop("message", None)
        nav = [(path, label) for path, label, area in NAV
               if staff is not None and may_use(staff.role, area)]
        page = templates.get_template(template).render(
            t=t, lang=lang, staff=staff, nav=nav, message=t(message) if message else None,
            **context)
        return HTMLResponse(page, status_code=status_code)

    async def current(request: Request) -> StaffSession | None:
        token = request.cookies.get(session_cookie)
        if not token:
            return None
        return await console.staff().session(token, console.clock())

    def same_origin(request: Request) -> bool:
        origin = request.headers.get("origin")
        if origin is None:  # older browsers send none on same-origin posts; CSRF token decides
            return True
        host = request.headers.get("host", "")
        return origin in (f"http://{host}", f"https://{host}")

    async def checked_form(request: Request, staff: StaffSession) -> dict[str, str]:
        if not same_origin(request):
            raise RefusedError(403, "csrf_refused")
        form = await read_form(request, settings.console_max_form_bytes)
        if not hmac.compare_digest(form.get("csrf_token", "").encode(),
                                   staff.csrf_token.encode()):
            log.warning("console.csrf_refused", staff_id=staff.staff_id, path=request.url.path)
            raise RefusedError(403, "csrf_refused")
        return form

    def guarded(area: Area | None, endpoint: Endpoint) -> Callable[[Request], Awaitable[Response]]:
        async def handle(request: Request) -> Response:
            staff = await current(request)
            if staff is None:
                if request.method == "POST":
                    raise RefusedError(403, "csrf_refused")
                return RedirectResponse("/sign-in", status_code=303)
            if area is not None and not may_use(staff.role, area):
                log.warning("console.forbidden", staff_id=staff.staff_id, role=staff.role.value,
                            path=request.url.path)
                return render(request, "error.html", staff, 403, message="forbidden")
            return await endpoint(request, staff)

        return handle

    # --- sign-in --------------------------------------------------------------------------

    async def sign_in_page(request: Request) -> Response:
        if await current(request) is not None:
            return RedirectResponse("/", status_code=303)
        return sign_in_form(request)

    def sign_in_form(request: Request, status_code: int = 200,
                     message: str | None = None) -> Response:
        token = secrets.token_urlsafe(32)
        response = render(request, "sign_in.html", None, status_code, login_csrf=token,
                          message=message, message_kind="error")
        response.set_cookie(login_cookie, token, max_age=3600, httponly=True,
                            secure=settings.console_cookie_secure, samesite="strict")
        return response

    async def sign_in(request: Request) -> Response:
        if not same_origin(request):
            raise RefusedError(403, "csrf_refused")
        form = await read_form(request, settings.console_max_form_bytes)
        expected = request.cookies.get(login_cookie, "")
        if not expected or not hmac.compare_digest(form.get("csrf_token", "").encode(),
                                                   expected.encode()):
            raise RefusedError(403, "csrf_refused")
        staff_id = form.get("staff_id", "").strip().lower()
        result = await console.staff().sign_in(staff_id, form.get("password", ""),
                                               console.clock())
        log.info("console.sign_in", staff_id=staff_id, outcome=result.outcome)
        if result.outcome == "locked":
            return sign_in_form(request, 423, "locked")
        if result.outcome != "ok" or result.session is None or result.session_token is None:
            return sign_in_form(request, 401, "bad_credentials")
        response = RedirectResponse(HOME[result.session.role], status_code=303)
        response.set_cookie(session_cookie, result.session_token, httponly=True,
                            secure=settings.console_cookie_secure, samesite="strict",
                            max_age=int(settings.console_session_max_hours * 3600))
        response.delete_cookie(login_cookie, secure=settings.console_cookie_secure,
                               httponly=True, samesite="strict")
        return response

    async def sign_out(request: Request, staff: StaffSession) -> Response:
        await checked_form(request, staff)
        await console.staff().sign_out(request.cookies.get(session_cookie, ""))
        log.info("console.sign_out", staff_id=staff.staff_id)
        response = RedirectResponse("/sign-in", status_code=303)
        response.delete_cookie(session_cookie, secure=settings.console_cookie_secure,
                               httponly=True, samesite="strict")
        return response

    async def home(request: Request, staff: StaffSession) -> Response:
        return RedirectResponse(HOME[staff.role], status_code=303)

    async def language(request: Request) -> Response:
        lang = request.path_params["lang"]
        response = RedirectResponse("/", status_code=303)
        if lang in LANGUAGES:
            response.set_cookie("cd_lang", lang, max_age=365 * 86400, httponly=True,
                                secure=settings.console_cookie_secure, samesite="strict")
        return response

    # --- review ---------------------------------------------------------------------------

    async def review_queue(request: Request, staff: StaffSession) -> Response:
        bureau = request.query_params.get("bureau") or None
        if bureau is not None and len(bureau) > 64:
            raise RefusedError(400, "bad_form")
        queue = console.queue()
        return render(request, "queue.html", staff, current="review", bureau=bureau,
                      applications=await queue.pending(bureau), bureaus=await queue.bureaus())

    async def citizen_view(citizen: str) -> dict[str, Any]:
        try:
            card = await console.status().card(citizen)
            timeline = await console.status().timeline(citizen)
        except StatusUnavailableError:
            return {"card": None, "timeline": [], "message": "status_unavailable"}
        portrait = [e["occurred_at"][:19].replace("T", " ") for e in timeline
                    if e.get("type") == "IdentityVerified"
                    and str(e.get("description", "")).startswith("Portrait")]
        return {"card": card, "timeline": timeline, "portrait_at": portrait[-1] if portrait
                else None}

    async def application_page(request: Request, staff: StaffSession,
                               reply: Reply | None = None, status_code: int = 200,
                               message: str | None = None) -> Response:
        application_id = request.path_params["application_id"]
        if not APPLICATION_ID.fullmatch(application_id):
            raise RefusedError(404, "not_found")
        application = await console.queue().get(application_id)
        if application is None:
            raise RefusedError(404, "not_found")
        view = await citizen_view(application.citizen_ref)
        if message is not None:
            view["message"] = message
        return render(request, "application.html", staff, status_code, current="review",
                      application=application, reply=reply, **view)

    async def application(request: Request, staff: StaffSession) -> Response:
        return await application_page(request, staff)

    async def decide(request: Request, staff: StaffSession) -> Response:
        form = await checked_form(request, staff)
        application_id = request.path_params["application_id"]
        decision, reason = form.get("decision", ""), form.get("reason", "").strip()
        if decision not in ("approve", "reject") or not APPLICATION_ID.fullmatch(application_id):
            raise RefusedError(400, "bad_form")
        if decision == "reject" and not reason:
            return await application_page(request, staff, status_code=400,
                                          message="reason_required")
        try:
            reply = await console.channel().send_until_decided(
                "review", "DecideReview",
                {"application_id": application_id, "reviewer_id": staff.staff_id,
                 "decision": decision, "reason": reason}, issued_at=console.clock())
        except ReplyTimeoutError:
            log.warning("console.no_reply", staff_id=staff.staff_id, command="DecideReview",
                        application_id=application_id)
            return await application_page(request, staff, status_code=504, message="no_reply")
        log.info("console.review_decided", staff_id=staff.staff_id,
                 application_id=application_id, decision=decision, code=reply.code)
        return await application_page(request, staff, reply=reply)

    # --- counter --------------------------------------------------------------------------

    async def counter(request: Request, staff: StaffSession) -> Response:
        return render(request, "counter.html", staff, current="counter")

    async def counter_find(request: Request, staff: StaffSession) -> Response:
        form = await checked_form(request, staff)
        id_number = form.get("id_number", "")
        if not is_valid_id_number(id_number):
            return render(request, "counter.html", staff, 400, current="counter",
                          message="invalid_id_number", message_kind="error")
        ref = citizen_ref(settings.citizen_ref_pepper.get_secret_value(), id_number)
        view = await citizen_view(ref)
        log.info("console.counter_lookup", staff_id=staff.staff_id, citizen_ref=ref,
                 found=view["card"] is not None)
        return render(request, "counter.html", staff, current="counter", found=True,
                      masked_id=mask_id_number(normalise_id_number(id_number)), **view)

    async def counter_collect(request: Request, staff: StaffSession) -> Response:
        form = await checked_form(request, staff)
        ref, application_id = form.get("citizen_ref", ""), form.get("application_id", "")
        presented = form.get("presented_id_number", "")
        if not CITIZEN_REF.fullmatch(ref) or not APPLICATION_ID.fullmatch(application_id):
            raise RefusedError(400, "bad_form")
        if not is_valid_id_number(presented):
            return render(request, "counter.html", staff, 400, current="counter",
                          message="invalid_id_number", message_kind="error")
        view = await citizen_view(ref)
        card = view["card"]
        if card is None or card.get("application_id") != application_id \
                or card.get("status") != "READY_FOR_PICKUP":
            return render(request, "counter.html", staff, 409, current="counter", found=True,
                          **view)
        payload: dict[str, Any] = {"application_id": application_id,
                                   "bureau_id": card["pickup_bureau"],
                                   "presented_id_number": normalise_id_number(presented)}
        if form.get("by_proxy") == "yes":
            proxy_id = form.get("proxy_id_number", "")
            if not is_valid_id_number(proxy_id):
                return render(request, "counter.html", staff, 400, current="counter",
                              message="invalid_id_number", message_kind="error")
            payload["proxy"] = {"id_number": normalise_id_number(proxy_id),
                                "name": form.get("proxy_name", "").strip(),
                                "authorisation_ref": form.get("authorisation_ref", "").strip()}
        try:
            reply = await console.channel().send_until_decided(
                "issuance", "CollectCard", payload, issued_at=console.clock())
        except ReplyTimeoutError:
            log.warning("console.no_reply", staff_id=staff.staff_id, command="CollectCard",
                        citizen_ref=ref, application_id=application_id)
            return render(request, "counter.html", staff, 504, current="counter",
                          message="no_reply", message_kind="error")
        log.info("console.card_collection", staff_id=staff.staff_id, citizen_ref=ref,
                 application_id=application_id, by_proxy="proxy" in payload, code=reply.code)
        return render(request, "counter.html", staff, current="counter", reply=reply,
                      card=card)

    # --- lookup ---------------------------------------------------------------------------

    async def lookup(request: Request, staff: StaffSession) -> Response:
        return render(request, "lookup.html", staff, current="lookup")

    async def lookup_search(request: Request, staff: StaffSession) -> Response:
        form = await checked_form(request, staff)
        query = form.get("query", "").strip()
        if CITIZEN_REF.fullmatch(query.lower()):
            ref = query.lower()
        elif is_valid_id_number(query):
            ref = citizen_ref(settings.citizen_ref_pepper.get_secret_value(), query)
        else:
            return render(request, "lookup.html", staff, 400, current="lookup",
                          message="invalid_id_number", message_kind="error")
        log.info("console.citizen_lookup", staff_id=staff.staff_id, citizen_ref=ref)
        return render(request, "lookup.html", staff, current="lookup", searched=True,
                      **await citizen_view(ref))

    # --- audit ----------------------------------------------------------------------------

    def recent_jobs() -> list[Any]:
        return sorted(console.audits.jobs.values(), key=lambda j: j.started_at,
                      reverse=True)[:10]

    async def audit(request: Request, staff: StaffSession) -> Response:
        return render(request, "audit.html", staff, current="audit", jobs=recent_jobs())

    async def audit_start(request: Request, staff: StaffSession) -> Response:
        form = await checked_form(request, staff)
        kind, scope = form.get("kind", ""), form.get("scope", "all")
        if kind not in ("verify", "replay") or scope not in ("all", "one"):
            raise RefusedError(400, "bad_form")
        ref: str | None = None
        if kind == "replay" and scope == "one":
            id_number = form.get("id_number", "")
            if not is_valid_id_number(id_number):
                return render(request, "audit.html", staff, 400, current="audit",
                              jobs=recent_jobs(), message="invalid_id_number",
                              message_kind="error")
            ref = citizen_ref(settings.citizen_ref_pepper.get_secret_value(), id_number)
        try:
            job = console.audits.start("verify" if kind == "verify" else "replay", ref,
                                       staff.staff_id)
        except AuditBusyError:
            return render(request, "audit.html", staff, 409, current="audit",
                          jobs=recent_jobs(), message="audit_busy", message_kind="error")
        return RedirectResponse(f"/audit/{job.job_id}", status_code=303)

    def job_of(request: Request) -> Any:
        job_id = request.path_params["job_id"]
        job = console.audits.jobs.get(job_id) if JOB_ID.fullmatch(job_id) else None
        if job is None:
            raise RefusedError(404, "not_found")
        return job

    async def audit_job(request: Request, staff: StaffSession) -> Response:
        return render(request, "audit_job.html", staff, current="audit", job=job_of(request))

    async def audit_progress(request: Request, staff: StaffSession) -> Response:
        return render(request, "_audit_progress.html", staff, job=job_of(request))

    # --- plumbing -------------------------------------------------------------------------

    async def health(_request: Request) -> JSONResponse:
        if await console.database_answers():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable"}, status_code=503)

    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RefusedError)
        staff = None
        try:
            staff = await current(request)
        except Exception:  # the refusal is shown even when the database does not answer
            log.warning("console.session_unreadable", exc_info=True)
        return render(request, "error.html", staff, exc.status_code,
                      message=exc.label, message_kind="error")

    def page(path: str, area: Area | None, endpoint: Endpoint, methods: list[str]) -> Route:
        return Route(path, guarded(area, endpoint), methods=methods)

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/sign-in", sign_in_page, methods=["GET"]),
            Route("/sign-in", sign_in, methods=["POST"]),
            Route("/lang/{lang}", language, methods=["GET"]),
            page("/", None, home, ["GET"]),
            page("/sign-out", None, sign_out, ["POST"]),
            page("/review", Area.REVIEW, review_queue, ["GET"]),
            page("/review/{application_id}", Area.REVIEW, application, ["GET"]),
            page("/review/{application_id}/decision", Area.REVIEW, decide, ["POST"]),
            page("/counter", Area.COUNTER, counter, ["GET"]),
            page("/counter/find", Area.COUNTER, counter_find, ["POST"]),
            page("/counter/collect", Area.COUNTER, counter_collect, ["POST"]),
            page("/lookup", Area.LOOKUP, lookup, ["GET"]),
            page("/lookup", Area.LOOKUP, lookup_search, ["POST"]),
            page("/audit", Area.AUDIT, audit, ["GET"]),
            page("/audit", Area.AUDIT, audit_start, ["POST"]),
            page("/audit/{job_id}", Area.AUDIT, audit_job, ["GET"]),
            page("/audit/{job_id}/progress", Area.AUDIT, audit_progress, ["GET"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ],
        exception_handlers={RefusedError: refused},
        lifespan=lifespan,
    )
    app.add_middleware(SecurityHeaders)
    return app
