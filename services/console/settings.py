"""Console settings (`CARDDESK_CONSOLE_*`): its port, channel, sessions, lockout and the
sign-in rate per client address."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network, ip_network

from pydantic import Field, field_validator

from shared.settings import CardDeskSettings


class ConsoleSettings(CardDeskSettings):
    """Where the console serves, which channel it signs as, and how it treats staff."""

    console_port: int = 8090
    # The bureau channel (channels file) whose secret signs every command the console sends.
    console_channel: str = "bureau-console"
    # The status query API it reads what it shows from (empty: this host's CARDDESK_HTTP_PORT).
    console_status_url: str = ""
    console_schema: str = Field(default="console", pattern=r"^[a-z_][a-z0-9_]*$")
    console_consumer_group: str = "carddesk-console"
    # The status projection's schema, which an audit replay compares with the log.
    status_schema: str = Field(default="status", pattern=r"^[a-z_][a-z0-9_]*$")
    # Prepended to review.events (tests isolate with it).
    console_topic_prefix: str = ""
    # A session ends after this long without a request, and after the absolute limit anyway.
    console_session_idle_minutes: float = Field(default=30, gt=0)
    console_session_max_hours: float = Field(default=12, gt=0)
    # Wrong passwords in a row that lock an account, and for how long.
    console_lockout_attempts: int = Field(default=5, ge=1)
    console_lockout_minutes: float = Field(default=15, gt=0)
    # Session cookies carry `Secure` (browsers honour it on https and on localhost).
    console_cookie_secure: bool = True
    # A form body larger than this is refused (413) before it is parsed.
    console_max_form_bytes: int = Field(default=16_384, ge=1024)
    # How long a page waits for a command's reply.
    console_reply_timeout_seconds: float = Field(default=15, gt=0)
    # Sign-in attempts per client address: a bucket of `burst`, refilled at this many a
    # minute; past it, 429 before any password is hashed.
    console_sign_in_per_minute: float = Field(default=20, gt=0)
    console_sign_in_burst: int = Field(default=20, ge=1)
    # Reverse proxies (addresses or networks, comma-separated) whose `X-Forwarded-For` names
    # the client. Empty: the address that connected is the client's, and the header is
    # ignored (anyone may send it).
    console_trusted_proxies: str = ""

    @field_validator("console_trusted_proxies")
    @classmethod
    def _networks(cls, value: str) -> str:
        for entry in value.split(","):
            if entry.strip():
                ip_network(entry.strip(), strict=False)  # ValueError names the bad entry
        return value

    def trusted_proxies(self) -> tuple[IPv4Network | IPv6Network, ...]:
        return tuple(ip_network(entry.strip(), strict=False)
                     for entry in self.console_trusted_proxies.split(",") if entry.strip())

    def status_url(self) -> str:
        return self.console_status_url or f"http://{self.http_host}:{self.http_port}"

    def review_events_topic(self) -> str:
        return f"{self.console_topic_prefix}review.events"
