"""Status settings (`CARDDESK_*`): where the read models live and which topics feed them."""

from __future__ import annotations

from pydantic import Field

from shared.contracts import EVENT_TOPICS
from shared.settings import CardDeskSettings


class StatusSettings(CardDeskSettings):
    """The projection's schema and consumer group, and the topics it reads."""

    status_schema: str = Field(default="status", pattern=r"^[a-z_][a-z0-9_]*$")
    status_consumer_group: str = "carddesk-status"
    # Prepended to every consumed topic; empty in production, unique in isolated tests.
    status_topic_prefix: str = ""

    def consumed_topics(self) -> dict[str, str]:
        """The contract's event topic → the topic actually consumed."""
        return {topic: f"{self.status_topic_prefix}{topic}" for topic in EVENT_TOPICS.values()}
