"""The review service, declared: `python -m services.review.main` runs it, tests
`shared.service.bootstrap(SPEC, ...)`.

Commands on `review.commands`; it follows loss (whether a formal loss is in force, and a
cancelled loss withdraws its application).
"""

from __future__ import annotations

from services.review.adapters import review_ddl
from services.review.handlers import ReviewHandlers
from services.review.settings import ReviewSettings
from shared.commands import CommandRoute
from shared.contracts.review import DecideReview, SubmitReissueApplication
from shared.erasure import erase_route
from shared.production import MASTER_KEY, SEALING_KEY, SESSION_PUBLIC_KEY
from shared.service import Follow, Kit, ServiceSpec, Wiring, run


def wire(kit: Kit[ReviewSettings]) -> Wiring:
    handlers = ReviewHandlers(kit)
    return Wiring(
        routes={
            "SubmitReissueApplication": CommandRoute(
                SubmitReissueApplication, handlers.submit,
                accepted_message="reissue application received", citizen=handlers.citizen),
            "DecideReview": CommandRoute(
                DecideReview, handlers.decide, bureau_only=True,
                accepted_message="review decision recorded"),
            "EraseSubject": erase_route(handlers.erasure),
        },
        commands="SubmitReissueApplication; DecideReview and EraseSubject (bureau only)",
        follows=[
            Follow("loss.events", handlers.on_loss_event,
                   "Loss cases: whether a formal loss is in force; cancellation withdraws",
                   batch_handler=handlers.on_loss_events),
        ],
        erased=handlers.streams,
        prepare=handlers.prepare,
    )


SPEC = ServiceSpec(
    name="review", settings=ReviewSettings, wire=wire, health_port=8083, ddl=review_ddl,
    secrets=(MASTER_KEY, SESSION_PUBLIC_KEY, SEALING_KEY),
)


if __name__ == "__main__":
    run(SPEC)
