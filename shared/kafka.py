"""How every Kafka client of a process authenticates: one place for the security options."""

from __future__ import annotations

from typing import Any

from shared.settings import CardDeskSettings


def client_options(settings: CardDeskSettings) -> dict[str, Any]:
    """Keyword arguments for any aiokafka client (producer, consumer, admin) of this process:
    SASL/SCRAM-SHA-512 when `CARDDESK_KAFKA_USER` is set, else none."""
    if settings.kafka_user is None:
        return {}
    password = settings.kafka_password.get_secret_value() if settings.kafka_password else ""
    return {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": settings.kafka_user,
        "sasl_plain_password": password,
    }
