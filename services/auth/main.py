"""The auth service, declared: `python -m services.auth.main` runs it, tests
`shared.service.bootstrap(SPEC, ...)`.

Commands on `auth.commands` from the channels; it follows no other service; a background
loop purges expired captchas and failed logins outside their window.
"""

from __future__ import annotations

from services.auth.adapters import auth_ddl
from services.auth.handlers import AuthHandlers
from services.auth.settings import AuthSettings
from shared.commands import CommandRoute
from shared.contracts.auth import (
    AuthorizeElectronicCard,
    IssueCaptcha,
    StartSession,
    VerifyPortrait,
)
from shared.erasure import erase_route
from shared.production import (
    MASTER_KEY,
    PEPPER,
    SEALING_KEY,
    SESSION_PUBLIC_KEY,
    SESSION_SIGNING_KEY,
)
from shared.service import Kit, ServiceSpec, Wiring, run


def wire(kit: Kit[AuthSettings]) -> Wiring:
    handlers = AuthHandlers(kit)
    return Wiring(
        routes={
            "IssueCaptcha": CommandRoute(IssueCaptcha, handlers.issue_captcha,
                                         accepted_message="captcha issued"),
            "StartSession": CommandRoute(StartSession, handlers.start_session,
                                         accepted_message="session started",
                                         citizen=handlers.login_citizen),
            "AuthorizeElectronicCard": CommandRoute(
                AuthorizeElectronicCard, handlers.authorize_electronic_card,
                accepted_message="electronic card authorised", citizen=handlers.citizen),
            "VerifyPortrait": CommandRoute(VerifyPortrait, handlers.verify_portrait,
                                           accepted_message="portrait verified",
                                           citizen=handlers.citizen),
            "EraseSubject": erase_route(handlers.erasure),
        },
        commands="IssueCaptcha, StartSession, AuthorizeElectronicCard, VerifyPortrait from the "
                 "channels; EraseSubject (bureau)",
        loops=[handlers.purge_loop],
        prepare=handlers.prepare,
    )


SPEC = ServiceSpec(
    name="auth", settings=AuthSettings, wire=wire, health_port=8081, ddl=auth_ddl,
    secrets=(PEPPER, MASTER_KEY, SESSION_SIGNING_KEY, SESSION_PUBLIC_KEY, SEALING_KEY),
)


if __name__ == "__main__":
    run(SPEC)
