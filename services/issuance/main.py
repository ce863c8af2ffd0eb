"""The issuance service, declared: `python -m services.issuance.main` runs it, tests
`shared.service.bootstrap(SPEC, ...)`.

Commands on `issuance.commands` (bureau channels only); it follows review (an approval starts
a card's production); its durable production timer makes the card ready when it is made.
"""

from __future__ import annotations

from services.issuance.adapters import issuance_ddl
from services.issuance.handlers import IssuanceHandlers
from services.issuance.settings import IssuanceSettings
from shared.commands import CommandRoute
from shared.contracts.issuance import CollectCard, ImportCard
from shared.erasure import erase_route
from shared.production import MASTER_KEY, PEPPER, SEALING_KEY
from shared.service import Follow, Kit, ServiceSpec, Wiring, run


def wire(kit: Kit[IssuanceSettings]) -> Wiring:
    handlers = IssuanceHandlers(kit)
    return Wiring(
        routes={
            "ImportCard": CommandRoute(ImportCard, handlers.import_card, bureau_only=True,
                                       accepted_message="card recorded"),
            "CollectCard": CommandRoute(CollectCard, handlers.collect_card, bureau_only=True,
                                        accepted_message="card handed over"),
            "EraseSubject": erase_route(handlers.erasure),
        },
        commands="ImportCard, CollectCard and EraseSubject from bureau channels",
        follows=[
            Follow("review.events", handlers.on_review_event,
                   "ReviewApproved starts a card's production",
                   batch_handler=handlers.on_review_events),
        ],
        erased=handlers.streams,
        loops=[handlers.production_timer],
    )


SPEC = ServiceSpec(
    name="issuance", settings=IssuanceSettings, wire=wire, health_port=8084, ddl=issuance_ddl,
    secrets=(PEPPER, MASTER_KEY, SEALING_KEY),
)


if __name__ == "__main__":
    run(SPEC)
