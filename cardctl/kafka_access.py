"""Who may do what on Kafka (DESIGN 8): the SCRAM users and ACLs the local stack creates.

`access_plan` is pure: from the channels and the topics it derives every principal's ACLs.
`apply_access` brings a broker in line with a plan through the Admin API: it upserts the
SCRAM credentials and deletes those of users no longer planned
(Describe/AlterUserScramCredentials, which aiokafka lacks, spoken with its protocol
classes), and creates the missing ACLs and deletes the ones no longer planned, so running
it again, or after the channels file gained or lost a channel, converges.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.protocol.admin import (
    CreateAclsRequest_v1,
    CreateAclsResponse_v1,
    DeleteAclsRequest_v1,
    DeleteAclsResponse_v1,
    DescribeAclsRequest_v1,
    DescribeAclsResponse_v1,
)
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    CompactArray,
    CompactBytes,
    CompactString,
    Int8,
    Int16,
    Int32,
    Schema,
    TaggedFields,
)

from shared.kafka import ADMIN, AUDITOR
from shared.topics import SERVICES, command_topic, dlq_topic, event_topic

STATUS = "status"
# The bureau console's own principal: it follows review.events for its review queue and
# reads the event topics for the audits it runs (its commands go out as its bureau channel,
# under that channel's credentials).
CONSOLE = "console"
# Every principal the stack generates credentials for, in credentials.json.
GENERATED_PRINCIPALS: tuple[str, ...] = (ADMIN, AUDITOR, *SERVICES, STATUS, CONSOLE)
REPLY_TOPIC_PREFIX = "channel.replies."
# Kafka's default and minimum for SCRAM-SHA-512.
SCRAM_ITERATIONS = 4096
_SCRAM_SHA_512 = 2
# A channel id becomes a SASL user name: no SCRAM escapes (`,` `=`), nothing exotic.
CHANNEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class AccessError(RuntimeError):
    """The broker refused to take the planned users or ACLs; the message says why."""


class Resource(IntEnum):
    TOPIC = 2
    GROUP = 3


class Pattern(IntEnum):
    LITERAL = 3
    PREFIXED = 4


class Operation(IntEnum):
    READ = 3
    WRITE = 4
    DESCRIBE = 8


_ALLOW = 3
_ANY = 1


@dataclass(frozen=True, order=True)
class Acl:
    """One ALLOW binding from any host: `principal` may `operation` on a resource."""

    principal: str
    resource: Resource
    name: str
    pattern: Pattern
    operation: Operation


def _consumed(service: str) -> tuple[str, ...]:
    """The topics each service reads (DESIGN 2)."""
    return {
        "auth": (command_topic("auth"),),
        "loss": (command_topic("loss"), event_topic("issuance"), event_topic("review")),
        "review": (command_topic("review"), event_topic("loss")),
        "issuance": (command_topic("issuance"), event_topic("review")),
        STATUS: tuple(event_topic(s) for s in SERVICES),
        # review.events for its queue; every events topic for the audits it runs.
        CONSOLE: tuple(event_topic(s) for s in SERVICES),
    }[service]


def service_acls(service: str) -> list[Acl]:
    """A service writes its own events topic (the status projection has none), the reply
    topics and the DLQs of what it consumes; reads only what it consumes, in its group."""
    user = f"User:{service}"
    acls = [Acl(user, Resource.GROUP, f"carddesk-{service}", Pattern.PREFIXED, Operation.READ)]
    if service != CONSOLE:  # the console answers no channel
        acls.append(Acl(user, Resource.TOPIC, REPLY_TOPIC_PREFIX, Pattern.PREFIXED,
                        Operation.WRITE))
    if service in SERVICES:
        acls.append(Acl(user, Resource.TOPIC, event_topic(service), Pattern.LITERAL,
                        Operation.WRITE))
    for topic in _consumed(service):
        acls.append(Acl(user, Resource.TOPIC, topic, Pattern.LITERAL, Operation.READ))
        acls.append(Acl(user, Resource.TOPIC, dlq_topic(topic), Pattern.LITERAL,
                        Operation.WRITE))
    return acls


def channel_acls(channel_id: str) -> list[Acl]:
    """A channel writes the command topics and reads only its own reply topic (by manual
    assignment, or in the group `<id>` or groups `<id>.*`: a bare `<id>` prefix would let
    channel `mobile` join the groups of channel `mobile-app`)."""
    user = f"User:{channel_id}"
    return [
        *(Acl(user, Resource.TOPIC, command_topic(s), Pattern.LITERAL, Operation.WRITE)
          for s in SERVICES),
        Acl(user, Resource.TOPIC, f"{REPLY_TOPIC_PREFIX}{channel_id}", Pattern.LITERAL,
            Operation.READ),
        Acl(user, Resource.GROUP, channel_id, Pattern.LITERAL, Operation.READ),
        Acl(user, Resource.GROUP, f"{channel_id}.", Pattern.PREFIXED, Operation.READ),
    ]


def auditor_acls() -> list[Acl]:
    """The auditor reads (and describes) the event topics, nothing else."""
    user = f"User:{AUDITOR}"
    return [Acl(user, Resource.TOPIC, event_topic(s), Pattern.LITERAL, op)
            for s in SERVICES for op in (Operation.READ, Operation.DESCRIBE)]


def access_plan(channel_ids: Iterable[str]) -> set[Acl]:
    """Every ACL of the stack."""
    ids = list(channel_ids)
    for channel_id in ids:
        check_channel_id(channel_id)
    plan = {*auditor_acls()}
    for service in (*SERVICES, STATUS, CONSOLE):
        plan.update(service_acls(service))
    for channel_id in ids:
        plan.update(channel_acls(channel_id))
    return plan


def check_channel_id(channel_id: str) -> None:
    """A channel id must be a plain SASL user name and must not impersonate a generated
    principal (a channel called `admin` would otherwise set the superuser's password)."""
    if not CHANNEL_ID.fullmatch(channel_id):
        raise AccessError(f"channel id {channel_id!r} is not a valid Kafka user name "
                          "(letters, digits, `.`, `_`, `-`)")
    if channel_id in GENERATED_PRINCIPALS:
        raise AccessError(f"channel id {channel_id!r} is reserved for a Card Desk principal")


# ----------------------------------------------------------------------------- SCRAM users


def salted_password(password: str, salt: bytes, iterations: int = SCRAM_ITERATIONS) -> bytes:
    """SCRAM's SaltedPassword (RFC 5802): what the broker derives its stored keys from."""
    return hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)


class AlterUserScramCredentialsResponse_v0(Response):  # type: ignore[misc]  # noqa: N801
    API_KEY = 51
    API_VERSION = 0
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("results", CompactArray(("user", CompactString("utf-8")), ("error_code", Int16),
                                 ("error_message", CompactString("utf-8")),
                                 ("tags", TaggedFields))),
        ("tags", TaggedFields),
    )


class AlterUserScramCredentialsRequest_v0(RequestStruct):  # type: ignore[misc]  # noqa: N801
    FLEXIBLE_VERSION = True
    API_KEY = 51
    API_VERSION = 0
    RESPONSE_TYPE = AlterUserScramCredentialsResponse_v0
    SCHEMA = Schema(
        ("deletions", CompactArray(("name", CompactString("utf-8")), ("mechanism", Int8),
                                   ("tags", TaggedFields))),
        ("upsertions", CompactArray(("name", CompactString("utf-8")), ("mechanism", Int8),
                                    ("iterations", Int32), ("salt", CompactBytes),
                                    ("salted_password", CompactBytes),
                                    ("tags", TaggedFields))),
        ("tags", TaggedFields),
    )


class AlterUserScramCredentials(Request[AlterUserScramCredentialsRequest_v0]):  # type: ignore[misc]
    API_KEY = 51

    def __init__(self, users: Mapping[str, str], deletions: Iterable[str] = ()) -> None:
        """Upsert each of `users`' SCRAM-SHA-512 credential; delete those of `deletions`."""
        self._deletions: list[tuple[str, int, dict[int, bytes]]] = [
            (name, _SCRAM_SHA_512, {}) for name in sorted(deletions)]
        self._upsertions: list[tuple[str, int, int, bytes, bytes, dict[int, bytes]]] = []
        for name, password in sorted(users.items()):
            salt = os.urandom(32)
            self._upsertions.append((name, _SCRAM_SHA_512, SCRAM_ITERATIONS, salt,
                                     salted_password(password, salt), {}))

    def build(self, request_struct_class: type[AlterUserScramCredentialsRequest_v0],
              ) -> AlterUserScramCredentialsRequest_v0:
        return request_struct_class(self._deletions, self._upsertions, {})


class DescribeUserScramCredentialsResponse_v0(Response):  # type: ignore[misc]  # noqa: N801
    API_KEY = 50
    API_VERSION = 0
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("error_code", Int16),
        ("error_message", CompactString("utf-8")),
        ("results", CompactArray(("user", CompactString("utf-8")), ("error_code", Int16),
                                 ("error_message", CompactString("utf-8")),
                                 ("credential_infos", CompactArray(
                                     ("mechanism", Int8), ("iterations", Int32),
                                     ("tags", TaggedFields))),
                                 ("tags", TaggedFields))),
        ("tags", TaggedFields),
    )


class DescribeUserScramCredentialsRequest_v0(RequestStruct):  # type: ignore[misc]  # noqa: N801
    FLEXIBLE_VERSION = True
    API_KEY = 50
    API_VERSION = 0
    RESPONSE_TYPE = DescribeUserScramCredentialsResponse_v0
    SCHEMA = Schema(
        ("users", CompactArray(("name", CompactString("utf-8")), ("tags", TaggedFields))),
        ("tags", TaggedFields),
    )


class DescribeAllScramUsers(Request[DescribeUserScramCredentialsRequest_v0]):  # type: ignore[misc]
    API_KEY = 50

    def build(self, request_struct_class: type[DescribeUserScramCredentialsRequest_v0],
              ) -> DescribeUserScramCredentialsRequest_v0:
        return request_struct_class(None, {})  # null: every user


# ----------------------------------------------------------------------------- ACL requests


def _acl_row(acl: Acl) -> tuple[int, str, int, str, str, int, int]:
    return (acl.resource, acl.name, acl.pattern, acl.principal, "*", acl.operation, _ALLOW)


class CreateAcls(Request[CreateAclsRequest_v1]):  # type: ignore[misc]
    API_KEY = 30

    def __init__(self, acls: Sequence[Acl]) -> None:
        self._rows = [_acl_row(acl) for acl in acls]

    def build(self, request_struct_class: type[CreateAclsRequest_v1]) -> CreateAclsRequest_v1:
        return request_struct_class(self._rows)


class DeleteAcls(Request[DeleteAclsRequest_v1]):  # type: ignore[misc]
    API_KEY = 31

    def __init__(self, acls: Sequence[Acl]) -> None:
        self._filters = [_acl_row(acl) for acl in acls]

    def build(self, request_struct_class: type[DeleteAclsRequest_v1]) -> DeleteAclsRequest_v1:
        return request_struct_class(self._filters)


class DescribeAllAcls(Request[DescribeAclsRequest_v1]):  # type: ignore[misc]
    API_KEY = 29

    def build(self, request_struct_class: type[DescribeAclsRequest_v1],
              ) -> DescribeAclsRequest_v1:
        # resource ANY, name null, pattern ANY, principal/host null, operation/permission ANY
        return request_struct_class(_ANY, None, _ANY, None, None, _ANY, _ANY)


async def _send(admin: AIOKafkaAdminClient, request: Request[Any]) -> Any:
    # aiokafka's admin client has no public way to send a request it does not wrap.
    return await admin._send_request(request)


async def describe_acls(admin: AIOKafkaAdminClient) -> set[Acl]:
    """The broker's ALLOW bindings that this module can express (others are left alone)."""
    response: DescribeAclsResponse_v1 = await _send(admin, DescribeAllAcls())
    error_code, error_message = response.error_code, response.error_message
    if error_code != 0:
        raise AccessError(f"DescribeAcls failed: {error_code} {error_message}")
    found = set()
    for resource_type, name, pattern, acls in response.resources:
        for principal, host, operation, permission in acls:
            if (host != "*" or permission != _ALLOW or resource_type not in Resource.__members__
                    .values() or pattern not in Pattern.__members__.values()
                    or operation not in Operation.__members__.values()):
                continue
            found.add(Acl(principal, Resource(resource_type), name, Pattern(pattern),
                          Operation(operation)))
    return found


async def scram_users(admin: AIOKafkaAdminClient) -> set[str]:
    """Every user the broker holds a SCRAM credential for."""
    response: DescribeUserScramCredentialsResponse_v0 = await _send(
        admin, DescribeAllScramUsers())
    if response.error_code != 0:
        raise AccessError("DescribeUserScramCredentials failed: "
                          f"{response.error_code} {response.error_message}")
    return {user for user, code, _message, _infos, _tags in response.results if code == 0}


async def apply_access(admin: AIOKafkaAdminClient, users: Mapping[str, str],
                       plan: set[Acl]) -> tuple[int, int, int]:
    """Make the broker's SCRAM users equal to `users` (each credential upserted, every other
    user's deleted but the superuser's: a channel that left the file can no longer log in),
    then its ACLs equal to `plan`; returns (ACLs created, ACLs deleted, users deleted)."""
    stale = await scram_users(admin) - set(users) - {ADMIN}
    response: AlterUserScramCredentialsResponse_v0 = await _send(
        admin, AlterUserScramCredentials(users, deletions=stale))
    failed = [(user, code, message) for user, code, message, _ in response.results if code]
    if failed:
        raise AccessError(f"AlterUserScramCredentials failed: {failed}")
    existing = await describe_acls(admin)
    missing = sorted(plan - existing)
    extra = sorted(acl for acl in existing - plan if acl.principal != f"User:{ADMIN}")
    if missing:
        created: CreateAclsResponse_v1 = await _send(admin, CreateAcls(missing))
        errors = [(code, msg) for code, msg in created.creation_responses if code]
        if errors:
            raise AccessError(f"CreateAcls failed: {errors[:3]}")
    if extra:
        deleted: DeleteAclsResponse_v1 = await _send(admin, DeleteAcls(extra))
        errors = [(row[0], row[1]) for row in deleted.filter_responses if row[0]]
        if errors:
            raise AccessError(f"DeleteAcls failed: {errors[:3]}")
    return len(missing), len(extra), len(stale)
