"""How every Kafka client of a process authenticates: one place for the security options.

A process's credentials come from `CARDDESK_KAFKA_USER` / `CARDDESK_KAFKA_PASSWORD`. In
development the local stack writes every principal's into `<state_dir>/kafka/credentials.json`
(`{"<principal>": {"username", "password"}}`, mode 0600); tools that are not given explicit
credentials pick theirs from there with `as_principal`.
"""

from __future__ import annotations

import asyncio
import json
import time
from itertools import chain
from pathlib import Path
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from faststream.kafka.subscriber.usecase import BatchSubscriber
from faststream.security import SASLScram512
from pydantic import SecretStr

from shared.channels import Channel
from shared.commits import COMMITS, DeferredCommits
from shared.settings import CardDeskSettings

S = TypeVar("S", bound=CardDeskSettings)

SASL_MECHANISM = "SCRAM-SHA-512"
ADMIN = "admin"
AUDITOR = "auditor"


# How often an idle consumer wakes: aiokafka's fetcher routine (`consumer_timeout_ms`,
# aiokafka's default 200 ms) and a reply reader's `getmany`. A record that arrives ends the
# wait at once, so this costs no latency; at rest a consumer wakes once a second.
IDLE_WAKE_MS = 1000

class CredentialsError(RuntimeError):
    """A principal's Kafka credentials are not where they should be."""


def client_options(settings: CardDeskSettings) -> dict[str, Any]:
    """Keyword arguments for any aiokafka client (producer, consumer, admin) of this process:
    SASL/SCRAM-SHA-512 when `CARDDESK_KAFKA_USER` is set, else none."""
    if settings.kafka_user is None:
        return {}
    password = settings.kafka_password.get_secret_value() if settings.kafka_password else ""
    return {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": SASL_MECHANISM,
        "sasl_plain_username": settings.kafka_user,
        "sasl_plain_password": password,
    }


def broker_security(settings: CardDeskSettings) -> SASLScram512 | None:
    """The same credentials for a FastStream `KafkaBroker(..., security=...)`."""
    if settings.kafka_user is None:
        return None
    password = settings.kafka_password.get_secret_value() if settings.kafka_password else ""
    return SASLScram512(username=settings.kafka_user, password=password)


def credentials_path(settings: CardDeskSettings) -> Path:
    """Where the local stack keeps the generated Kafka credentials."""
    return settings.state_dir.resolve() / "kafka" / "credentials.json"


def read_credentials(path: Path) -> dict[str, tuple[str, str]]:
    """principal → (username, password) from a credentials file; empty if there is none."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise CredentialsError(f"{path} cannot be read: {type(exc).__name__}") from exc
    if not isinstance(raw, dict):
        raise CredentialsError(f"{path} is not a JSON object")
    result = {}
    for principal, entry in raw.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("username"), str)
                and isinstance(entry.get("password"), str)):
            raise CredentialsError(f"{path}: entry {principal!r} lacks username/password")
        result[principal] = (entry["username"], entry["password"])
    return result


def with_credentials(settings: S, username: str, password: str) -> S:
    return settings.model_copy(
        update={"kafka_user": username, "kafka_password": SecretStr(password)})


def as_principal(settings: S, principal: str) -> S:
    """`settings` with `principal`'s credentials from the local stack's credentials file,
    unless the process was given `CARDDESK_KAFKA_USER` (explicit credentials win) or no file
    exists (a broker without authentication)."""
    if settings.kafka_user is not None:
        return settings
    credentials = read_credentials(credentials_path(settings))
    if not credentials:
        return settings
    if principal not in credentials:
        raise CredentialsError(
            f"{credentials_path(settings)} has no credentials for {principal!r}")
    username, password = credentials[principal]
    return with_credentials(settings, username, password)


def as_channel(settings: S, channel: Channel) -> S:
    """`settings` with a channel's own credentials (user = its id, password = its
    `kafka_password`): a process acting as a channel is that channel, whatever else it is
    allowed; a channel without a password keeps `settings`' credentials."""
    if channel.kafka_password is None:
        return settings
    return with_credentials(settings, channel.channel_id, channel.kafka_password)


async def _long_poll_batch(self: Any, consumer: Any) -> tuple[Any, ...]:
    """FastStream's batch subscriber, without its sleep after an empty fetch, and with a
    linger after a short one.

    FastStream (0.7) asks `getmany(timeout_ms=batch_timeout_ms)`, a long poll that returns
    as soon as any record is there, and then, when it came back empty, sleeps another
    `batch_timeout_ms`: a record arriving during that sleep waits for it. With a short wait
    (low latency) an idle consumer therefore loops hundreds of times a second (the idle
    burn of issue 12); with a long one every quiet partition adds its wait to the next
    record's latency. Here an empty long poll is simply asked again, so the wait can be
    long (idle consumers wake a few times a second) and a record is taken the moment it
    arrives. Only when `getmany` came back empty early (no partitions assigned yet, a
    rebalance) is the rest of the wait slept, so that never spins.

    A fetch that brought fewer records than a batch holds waits `linger_s` (the
    subscriber's, set by `linger`) and takes what arrived meanwhile into the same batch:
    below saturation a batch otherwise carries a record or two, each paying a transaction,
    an offset commit and a relay round of its own.

    Records `getmany` returned have moved the consumer's position: dropping them would let
    the next batch's offset commit pass over them unprocessed. So an error of the lingering
    fetch (a fetch or group error aiokafka reports on the call after the one that returned
    records) does not lose the batch in hand: it is returned, and the error is raised on the
    next call, where FastStream's loop reports it as it would have.
    """
    pending: BaseException | None = getattr(self, PENDING_ATTRIBUTE, None)
    if pending is not None:
        setattr(self, PENDING_ATTRIBUTE, None)
        raise pending
    timeout_s = self.batch_timeout_ms / 1000
    started = time.monotonic()
    messages = await consumer.getmany(timeout_ms=self.batch_timeout_ms,
                                      max_records=self.max_records)
    if not messages:
        left = timeout_s - (time.monotonic() - started)
        if left > 0:
            await asyncio.sleep(left)
        return ()
    wanted = self.max_records - sum(len(records) for records in messages.values())
    linger_s = getattr(self, LINGER_ATTRIBUTE, 0.0)
    if linger_s > 0 and wanted > 0:
        try:
            await asyncio.sleep(linger_s)
            more = await consumer.getmany(timeout_ms=0, max_records=wanted)
        except Exception as error:  # raised on the next call, once this batch is handed over
            setattr(self, PENDING_ATTRIBUTE, error)
            more = {}
        for tp, records in more.items():
            messages.setdefault(tp, []).extend(records)  # a partition's records stay in order
    return tuple(chain.from_iterable(messages.values()))


LINGER_ATTRIBUTE = "_carddesk_linger_s"
# An error of a lingering fetch, held until the batch in hand has been handed over.
PENDING_ATTRIBUTE = "_carddesk_pending_error"


def linger(subscriber: Any, linger_ms: int) -> None:
    """After a fetch short of a full batch, `subscriber` waits `linger_ms` for more."""
    setattr(subscriber, LINGER_ATTRIBUTE, linger_ms / 1000)


class BatchEndsCommit:
    """The consumer FastStream acknowledges a batch through, committing only the partitions
    the batch moved, on the timer of `shared.commits` (with the batches handled meanwhile).

    FastStream's acknowledgement calls aiokafka's `commit()` without offsets, which commits
    the position of every assigned partition: each batch wrote one `__consumer_offsets`
    record per partition the consumer holds (24 for the status service's four topics),
    however few it moved. Here the commit names the offset after each partition's last
    record of the batch, which is the position the batch moved it to, so what the group has
    committed after each batch is what it was before. A partition revoked while the batch
    ran is left out, as aiokafka's own commit leaves out what is no longer assigned. A
    rewind (`seek`, FastStream's negative acknowledgement) goes to the consumer itself, for
    the partitions still assigned: aiokafka refuses to seek any other, and FastStream rewinds
    a batch's partitions in a loop that such a refusal would end, leaving the partitions
    after it past records never handled (the next batch's commit would then pass over
    them). A revoked partition needs no rewind: its next owner reads it from the last
    committed offset.
    """

    def __init__(self, consumer: AIOKafkaConsumer,
                 records: tuple[ConsumerRecord[Any, Any], ...],
                 commits: DeferredCommits = COMMITS) -> None:
        self._consumer = consumer
        self._ends = {TopicPartition(r.topic, r.partition): r.offset + 1 for r in records}
        self._commits = commits

    async def commit(self) -> None:
        """Hand the batch's ends to `commits`, which commits them on its timer (at once with
        an interval of 0), only for partitions the consumer still holds then."""
        await self._commits.handled(self._consumer, self._ends)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        if partition in self._consumer.assignment():
            self._consumer.seek(partition, offset)


def commit_batch_ends(message: Any, records: tuple[ConsumerRecord[Any, Any], ...]) -> Any:
    """`message` (FastStream's, of the batch `records`) acknowledged by `BatchEndsCommit`;
    one of FastStream's test broker, which has no Kafka consumer, is left as it is."""
    if isinstance(message.consumer, AIOKafkaConsumer):
        message.consumer = BatchEndsCommit(message.consumer, records)
    return message


def use_long_poll_batches() -> None:
    """Every FastStream batch subscriber of this process long-polls (`_long_poll_batch`)."""
    BatchSubscriber.get_msg = _long_poll_batch  # type: ignore[method-assign]


use_long_poll_batches()
