"""The published language: every command payload and event data model of DESIGN sections 4-5.

Services own their events, but the shapes are a contract other services, the projection and
auditors rely on, so they live here. Personal data fields hold `enc:v1:` ciphertext only.
"""

from __future__ import annotations

from shared.contracts import auth, issuance, loss, review

EVENT_TOPICS = {
    "auth": "auth.events",
    "loss": "loss.events",
    "review": "review.events",
    "issuance": "issuance.events",
}

KNOWN_EVENT_TYPES: dict[str, frozenset[str]] = {
    "auth.events": auth.EVENT_TYPES,
    "loss.events": loss.EVENT_TYPES,
    "review.events": review.EVENT_TYPES,
    "issuance.events": issuance.EVENT_TYPES,
}
