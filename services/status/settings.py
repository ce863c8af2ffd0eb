"""Status settings (`CARDDESK_*`): where the read models live and which topics feed them."""

from __future__ import annotations

from pydantic import Field, SecretStr

from shared.contracts import EVENT_TOPICS
from shared.settings import CardDeskSettings

# The auditor key the repository ships: it works in development and is refused in production.
DEV_AUDITOR_API_KEY = "carddesk-dev-auditor-key"


class StatusSettings(CardDeskSettings):
    """Where the read models live, the topics they are read from, and the query API's
    callers: auditors (their own keys) beside the channels (their `api_key`)."""

    # The service's schema; the rebuild, `cardctl audit replay` and the console read it.
    status_schema: str = Field(default="status", pattern=r"^[a-z_][a-z0-9_]*$")
    # Prepended to every consumed topic; empty in production. A rebuild or an audit replay
    # reads a copy of the log with it; isolated tests publish to topics of their own.
    status_topic_prefix: str = ""
    # JSON {"auditor-id": "api key"}: auditors may query every citizen.
    auditor_api_keys: dict[str, SecretStr] = Field(
        default_factory=lambda: {"auditor": SecretStr(DEV_AUDITOR_API_KEY)})
    # Per caller (channel or auditor): a token bucket refilled at this rate, holding `burst`.
    api_rate_limit_per_second: float = Field(default=50.0, gt=0)
    api_rate_limit_burst: int = Field(default=100, ge=1)

    # The key a client of the API sends (`cardctl status`/`timeline`, the demo, the bench);
    # unset: the first auditor's key.
    query_api_key: SecretStr | None = None

    def caller_key(self) -> str:
        """What `Authorization: Bearer` carries for this process as a client of the API."""
        if self.query_api_key is not None:
            return self.query_api_key.get_secret_value()
        return next(iter(self.auditor_api_keys.values())).get_secret_value()

    def shipped_auditor_keys(self) -> list[str]:
        """The auditors whose key is the development one (refused in production)."""
        return [auditor for auditor, key in self.auditor_api_keys.items()
                if key.get_secret_value() == DEV_AUDITOR_API_KEY]

    def consumed_topics(self) -> dict[str, str]:
        """The contract's event topic → the topic actually consumed."""
        return {topic: f"{self.status_topic_prefix}{topic}" for topic in EVENT_TOPICS.values()}
