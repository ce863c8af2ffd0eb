"""One decoder per event topic, upcasting old schema versions on read: the owning service
folds its stream with it, followers and the projection read the topic with it."""

from __future__ import annotations

from shared.contracts.auth import AUTH_EVENTS, AuthEvent
from shared.contracts.issuance import ISSUANCE_EVENTS, IssuanceEvent
from shared.contracts.loss import LOSS_EVENTS, LossEvent
from shared.contracts.review import REVIEW_EVENTS, ReviewEvent
from shared.contracts.upcasters import UPCASTERS
from shared.events import EventDecoder

AUTH: EventDecoder[AuthEvent] = EventDecoder(AUTH_EVENTS, UPCASTERS)
LOSS: EventDecoder[LossEvent] = EventDecoder(LOSS_EVENTS, UPCASTERS)
REVIEW: EventDecoder[ReviewEvent] = EventDecoder(REVIEW_EVENTS, UPCASTERS)
ISSUANCE: EventDecoder[IssuanceEvent] = EventDecoder(ISSUANCE_EVENTS, UPCASTERS)
