"""Settings shared by every Card Desk process, read from `CARDDESK_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class CardDeskSettings(BaseSettings):
    """What every service needs to reach Kafka and PostgreSQL; each service subclasses it."""

    model_config = SettingsConfigDict(env_prefix="CARDDESK_", extra="ignore", frozen=True)

    # `production` refuses every secret and file shipped in the repository; the local stack,
    # the demo and the tests run in `development`.
    env: Literal["development", "production"] = "production"
    kafka_bootstrap: str = "127.0.0.1:9092"
    # SASL/SCRAM-SHA-512 credentials of this process (unset: read from the local stack's
    # `<state_dir>/kafka/credentials.json` where a tool does so, else no authentication).
    kafka_user: str | None = None
    kafka_password: SecretStr | None = None
    database_url: str = "postgresql://carddesk@127.0.0.1:5432/carddesk"
    http_port: int = 8080
    http_host: str = "127.0.0.1"
    # The /health and AsyncAPI port of a command service; each has its own default.
    health_port: int | None = None
    channels_file: Path = PROJECT_ROOT / "config" / "channels.dev.json"
    partitions: int = 6
    # Local development secrets; production sets its own through the environment.
    citizen_ref_pepper: SecretStr = SecretStr("carddesk-dev-pepper-change-me")
    # base64 of 32 bytes: wraps the per-citizen data keys (AES-256-GCM).
    master_key: SecretStr = SecretStr("Y2FyZGRlc2stZGV2LW1hc3Rlci1rZXktMzItYnl0ZXM=")
    # Ed25519, base64 raw: only auth holds the private seed; every service has the public key.
    session_signing_key: SecretStr = SecretStr("kFePrAOdaWJbcyBJV6pDodw4NqVIYNuzzX+77ioPv1U=")
    session_public_key: str = "+xNIdtO9G3+tXicUQYJI2LTaAxlGTYyLu2bGe/fr8Hc="
    # X25519, base64 raw: channels seal commands' personal fields to the public key, the
    # services open them with the private one (shared/sealing.py).
    command_sealing_key: SecretStr = SecretStr("Uy+Gs+y+C4lJVPwW4qfgWA9TTjSjvJPW2ILCLnHmdCQ=")
    command_sealing_public_key: str = "HMaso7R6kCdiJXoHTq+J2ZoE47IoReIIj2QXBuuWZDQ="
    state_dir: Path = PROJECT_ROOT / ".local"
    log_level: str = "INFO"
    kafka_controller_port: int = 9093
    kafka_version: str = "4.0.0"
    kafka_heap: str = "512m"
    postgres_bin: Path = Path("/usr/lib/postgresql/15/bin")
    outbox_poll_ms: int = 100
    # Sent outbox rows are kept this long (for an operator looking into a delivery), then purged.
    outbox_retention_hours: float = 24.0
    consumer_max_attempts: int = 5
    # Records a consumer takes at once, and how long it waits for them (ms).
    consumer_batch_size: int = 200
    consumer_batch_wait_ms: int = 5
    # /health: how long the database may take to run a query; how long a consumer may go
    # without an assignment or a fetch before it counts as not consuming (seconds).
    health_timeout_seconds: float = Field(default=3.0, gt=0)
    consumer_stall_seconds: float = Field(default=30.0, gt=0)
    # A service unhealthy this long without a break exits (status 70) for its supervisor to
    # restart it; 0 never exits.
    unhealthy_exit_seconds: float = Field(default=60.0, ge=0)

    def event_topic(self, service: str) -> str:
        return f"{service}.events"
