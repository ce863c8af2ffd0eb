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
    # The current master key's id, recorded with every data key it wraps; rotation keeps the
    # previous keys in `retired_master_keys` (JSON {"id": "base64 key"}), which still unwrap
    # the data keys they wrapped but wrap nothing new.
    master_key_id: str = Field(default="dev", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    retired_master_keys: dict[str, SecretStr] = Field(default_factory=dict)
    # Ed25519, base64 raw: only auth holds the private seed; every service has the public key.
    session_signing_key: SecretStr = SecretStr("kFePrAOdaWJbcyBJV6pDodw4NqVIYNuzzX+77ioPv1U=")
    session_public_key: str = "+xNIdtO9G3+tXicUQYJI2LTaAxlGTYyLu2bGe/fr8Hc="
    # The key id (`kid`) of that signing key; tokens name it so that keys can be rotated.
    session_key_id: str = "dev-session-1"
    # Older keys still accepted while their tokens run out: JSON `{"kid": "base64 public"}`.
    session_public_keys: dict[str, str] = {}
    # No token is honoured for longer than this from its issue, whatever it claims.
    session_max_lifetime_seconds: int = Field(default=7200, gt=0)
    # X25519, base64 raw: channels seal commands' personal fields to the public key, the
    # services open them with the private one (shared/sealing.py).
    command_sealing_key: SecretStr = SecretStr("Uy+Gs+y+C4lJVPwW4qfgWA9TTjSjvJPW2ILCLnHmdCQ=")
    command_sealing_public_key: str = "HMaso7R6kCdiJXoHTq+J2ZoE47IoReIIj2QXBuuWZDQ="
    # Refuse commands whose personal fields arrive in plain form (`unsealed_personal_data`).
    # Unset: on in production, off in development (where DESIGN's plain shapes still work).
    require_sealed_fields: bool | None = None
    state_dir: Path = PROJECT_ROOT / ".local"
    log_level: str = "INFO"
    kafka_controller_port: int = 9093
    kafka_version: str = "4.0.0"
    kafka_heap: str = "512m"
    postgres_bin: Path = Path("/usr/lib/postgresql/15/bin")
    outbox_poll_ms: int = 1000
    # Sent outbox rows are kept this long (for an operator looking into a delivery), then purged.
    outbox_retention_hours: float = 24.0
    consumer_max_attempts: int = 5
    # A follower's record of each event it took (`processed`, `followed_chain`) is kept this
    # long, then purged (each followed stream's last row stays). A redelivery of an event
    # taken over half of this ago is skipped as settled, by the stream's record alone.
    follower_retention_hours: float = Field(default=24.0, gt=0)
    # How long a command waits for the service's followers to apply every event published
    # before it; past that it is refused `not_yet_consistent` (shared/barrier.py).
    consistency_wait_ms: int = 3000
    # A command's `issued_at` may differ from the receiver's clock by this much either way
    # (older or newer: `stale_command`); repeats are answered from the stored reply as long.
    command_freshness_seconds: int = Field(default=300, gt=0)
    # Limits checked before any JSON parsing of a command or event (larger or deeper: DLQ).
    max_message_bytes: int = Field(default=256 * 1024, ge=1024)
    max_json_depth: int = Field(default=32, ge=4, le=200)
    # Records a consumer takes at once, and how long it waits for them (ms).
    consumer_batch_size: int = 200
    consumer_batch_wait_ms: int = 500
    # How long the broker holds a consumer's fetch that finds no records (ms). A partition
    # whose records are being handled is left out of the fetch sent meanwhile (one fetch in
    # flight per broker), so a record arriving for it waits for that fetch to come back:
    # this bounds that wait, and sets how often an idle consumer asks again.
    consumer_fetch_wait_ms: int = Field(default=500, ge=1, le=5000)
    # How long after a batch was handled its offsets are committed, with those of the
    # batches handled meanwhile (ms; shared/commits.py); 0 commits every batch at once.
    consumer_commit_interval_ms: int = Field(default=100, ge=0, le=5000)
    # The same for a consumer that holds every partition of its topics (one instance of the
    # service): no other instance's barrier reads its commits, so they can wait longer.
    consumer_commit_interval_alone_ms: int = Field(default=1000, ge=0, le=5000)
    # After a fetch short of a full batch, how long a consumer waits for more records to
    # take into the same batch (ms; shared/kafka.py); 0 takes each fetch as it comes. At
    # half the sustained rate 20 ms made status visible sooner than 5 ms did (README,
    # Performance); at low rates it is up to 20 ms more on each hop.
    consumer_linger_ms: int = Field(default=20, ge=0, le=1000)
    # /health: how long the database may take to run a query; how long a consumer may go
    # without an assignment or a fetch before it counts as not consuming (seconds).
    health_timeout_seconds: float = Field(default=3.0, gt=0)
    consumer_stall_seconds: float = Field(default=30.0, gt=0)
    # A service unhealthy this long without a break exits (status 70) for its supervisor to
    # restart it; 0 never exits.
    unhealthy_exit_seconds: float = Field(default=60.0, ge=0)
    # How often the outbox backlog and the consumer lag are sampled for /metrics (seconds).
    metrics_interval_seconds: float = Field(default=15.0, gt=0)
    # Where spans are exported (OTLP over HTTP, e.g. http://collector:4318/v1/traces);
    # unset: spans are made for their trace ids (logs, Kafka headers) and not exported.
    otlp_endpoint: str | None = None

    @property
    def sealed_fields_required(self) -> bool:
        if self.require_sealed_fields is not None:
            return self.require_sealed_fields
        return self.env == "production"

    def retired_master_keys_b64(self) -> dict[str, str]:
        return {key_id: key.get_secret_value()
                for key_id, key in self.retired_master_keys.items()}

    def event_topic(self, service: str) -> str:
        return f"{service}.events"
