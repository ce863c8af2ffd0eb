"""The loss service, declared: `python -m services.loss.main` runs it, tests
`shared.service.bootstrap(SPEC, ...)`.

Commands on `loss.commands`; it follows issuance (which card each citizen holds, a reissue
closes the loss) and review (a pending application blocks cancellation); its durable expiry
timers lift temporary losses.
"""

from __future__ import annotations

from services.loss.adapters import loss_ddl
from services.loss.handlers import LossHandlers
from services.loss.settings import LossSettings
from shared.commands import CommandRoute
from shared.contracts.loss import CancelLoss, ReportLoss
from shared.erasure import erase_route
from shared.production import MASTER_KEY, SEALING_KEY, SESSION_PUBLIC_KEY
from shared.service import Follow, Kit, ServiceSpec, Wiring, run


def wire(kit: Kit[LossSettings]) -> Wiring:
    handlers = LossHandlers(kit)
    return Wiring(
        routes={
            "ReportLoss": CommandRoute(ReportLoss, handlers.report_loss,
                                       accepted_message="loss reported; the card is frozen",
                                       citizen=handlers.citizen),
            "CancelLoss": CommandRoute(CancelLoss, handlers.cancel_loss,
                                       accepted_message="loss cancelled; the card works again",
                                       citizen=handlers.citizen),
            "EraseSubject": erase_route(handlers.erasure),
        },
        commands="ReportLoss, CancelLoss; EraseSubject (bureau only)",
        follows=[
            Follow("issuance.events", handlers.on_issuance_event,
                   "which card each citizen holds; a reissue closes the loss",
                   batch_handler=handlers.on_issuance_events),
            Follow("review.events", handlers.on_review_event,
                   "reissue applications: a pending one blocks cancellation",
                   batch_handler=handlers.on_review_events),
        ],
        erased=handlers.streams,
        prepare=handlers.prepare,
        loops=[handlers.expiry_loop],
    )


SPEC = ServiceSpec(
    name="loss", settings=LossSettings, wire=wire, health_port=8082, ddl=loss_ddl,
    secrets=(MASTER_KEY, SESSION_PUBLIC_KEY, SEALING_KEY),
)


if __name__ == "__main__":
    run(SPEC)
