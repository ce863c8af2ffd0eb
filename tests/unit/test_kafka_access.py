"""Who may do what on Kafka (DESIGN 8), as planned; where each process gets its credentials."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from pathlib import Path

import pytest

from cardctl.kafka_access import (
    AccessError,
    Operation,
    Pattern,
    Resource,
    access_plan,
    salted_password,
)
from shared.channels import Channel
from shared.kafka import (
    CredentialsError,
    as_channel,
    as_principal,
    broker_security,
    client_options,
    read_credentials,
)
from shared.settings import CardDeskSettings

CHANNELS = ("wechat-oa", "mobile-app", "bureau-counter")
PLAN = access_plan(CHANNELS)


def allowed(principal: str, operation: Operation, topic: str) -> bool:
    """Whether the plan lets `principal` do `operation` on `topic` (literal or prefix)."""
    for acl in PLAN:
        if acl.principal != f"User:{principal}" or acl.resource is not Resource.TOPIC:
            continue
        if acl.operation is not operation:
            continue
        if acl.pattern is Pattern.LITERAL and acl.name == topic:
            return True
        if acl.pattern is Pattern.PREFIXED and topic.startswith(acl.name):
            return True
    return False


def test_only_the_owning_service_writes_an_events_topic() -> None:
    for topic in ("auth.events", "loss.events", "review.events", "issuance.events"):
        writers = {name for name in ("auth", "loss", "review", "issuance", "status",
                                     "auditor", *CHANNELS)
                   if allowed(name, Operation.WRITE, topic)}
        assert writers == {topic.removesuffix(".events")}


def test_a_service_reads_only_what_it_consumes() -> None:
    topics = [f"{s}.{kind}" for s in ("auth", "loss", "review", "issuance")
              for kind in ("commands", "events")]
    reads = {name: {t for t in topics if allowed(name, Operation.READ, t)}
             for name in ("auth", "loss", "review", "issuance", "status")}
    assert reads == {
        "auth": {"auth.commands"},
        "loss": {"loss.commands", "issuance.events", "review.events"},
        "review": {"review.commands", "loss.events"},
        "issuance": {"issuance.commands", "review.events"},
        "status": {"auth.events", "loss.events", "review.events", "issuance.events"},
    }


def test_a_service_writes_the_dead_letters_of_what_it_consumes_and_every_reply_topic() -> None:
    assert allowed("loss", Operation.WRITE, "review.events.dlq")
    assert not allowed("loss", Operation.WRITE, "auth.commands.dlq")
    assert allowed("auth", Operation.WRITE, "channel.replies.wechat-oa")
    assert not allowed("auth", Operation.READ, "channel.replies.wechat-oa")


def test_a_channel_writes_commands_and_reads_only_its_own_replies() -> None:
    for service in ("auth", "loss", "review", "issuance"):
        assert allowed("mobile-app", Operation.WRITE, f"{service}.commands")
        assert not allowed("mobile-app", Operation.READ, f"{service}.commands")
        assert not allowed("mobile-app", Operation.READ, f"{service}.events")
    assert allowed("mobile-app", Operation.READ, "channel.replies.mobile-app")
    assert not allowed("mobile-app", Operation.READ, "channel.replies.wechat-oa")
    assert not allowed("mobile-app", Operation.WRITE, "channel.replies.mobile-app")


def group_allowed(principal: str, group: str) -> bool:
    return any(
        acl.principal == f"User:{principal}" and acl.resource is Resource.GROUP
        and (acl.name == group if acl.pattern is Pattern.LITERAL else group.startswith(acl.name))
        for acl in access_plan(["mobile", "mobile-app"]))


def test_a_channel_joins_only_its_own_groups_even_when_another_id_extends_its_own() -> None:
    assert group_allowed("mobile", "mobile")
    assert group_allowed("mobile", "mobile.replies")
    assert not group_allowed("mobile", "mobile-app")
    assert not group_allowed("mobile", "mobile-app.replies")
    assert not group_allowed("mobile", "carddesk-auth")


def test_the_auditor_reads_event_topics_only() -> None:
    everything = [f"{s}.{kind}" for s in ("auth", "loss", "review", "issuance")
                  for kind in ("commands", "events", "commands.dlq", "events.dlq")]
    assert {t for t in everything if allowed("auditor", Operation.READ, t)} == {
        "auth.events", "loss.events", "review.events", "issuance.events"}
    assert not any(allowed("auditor", Operation.WRITE, t) for t in everything)


def test_nobody_but_the_superuser_gets_cluster_or_wildcard_rights() -> None:
    assert all(acl.resource in (Resource.TOPIC, Resource.GROUP) for acl in PLAN)
    assert not any(acl.name in ("", "*") for acl in PLAN)
    assert not any(acl.principal in ("User:admin", "User:*") for acl in PLAN)


@pytest.mark.parametrize("hostile", [
    "admin", "auditor", "auth", "status",  # would take over a generated principal
    "a,b", "x=y", "", " wechat", "ch/../x", "é-channel", "a" * 64, "-leading-dash",
])
def test_a_channel_id_that_is_no_plain_user_name_or_is_reserved_is_refused(
    hostile: str,
) -> None:
    with pytest.raises(AccessError):
        access_plan([*CHANNELS, hostile])


def test_the_salted_password_is_rfc_5802s_pbkdf2() -> None:
    salt = b"0123456789abcdef"
    expected = hashlib.pbkdf2_hmac("sha512", b"pencil", salt, 4096)
    assert salted_password("pencil", salt) == expected
    assert salted_password("pencil", salt) != salted_password("pencil", salt[::-1])
    # The broker derives ClientKey from it: a different password gives a different key.
    key = hmac.new(expected, b"Client Key", hashlib.sha512).digest()
    other = hmac.new(salted_password("pencil!", salt), b"Client Key", hashlib.sha512).digest()
    assert base64.b64encode(key) != base64.b64encode(other)


# ----------------------------------------------------------------------------- credentials


def settings_in(state_dir: Path, **overrides: object) -> CardDeskSettings:
    return CardDeskSettings(state_dir=state_dir, kafka_user=None, kafka_password=None,
                            **overrides)  # type: ignore[arg-type]


def write_credentials(state_dir: Path, body: object) -> Path:
    path = state_dir / "kafka" / "credentials.json"
    path.parent.mkdir(parents=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(body))
    return path


def test_a_tool_takes_its_principals_credentials_from_the_stack(tmp_path: Path) -> None:
    write_credentials(tmp_path, {"auditor": {"username": "auditor", "password": "pw"}})
    resolved = as_principal(settings_in(tmp_path), "auditor")
    assert client_options(resolved) == {
        "security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "auditor", "sasl_plain_password": "pw"}
    security = broker_security(resolved)
    assert security is not None and security.username == "auditor"


def test_explicit_credentials_win_over_the_file(tmp_path: Path) -> None:
    write_credentials(tmp_path, {"auditor": {"username": "auditor", "password": "pw"}})
    explicit = settings_in(tmp_path).model_copy(update={"kafka_user": "ops"})
    assert as_principal(explicit, "auditor").kafka_user == "ops"


def test_without_a_file_nothing_authenticates_and_a_missing_principal_is_an_error(
    tmp_path: Path,
) -> None:
    assert client_options(as_principal(settings_in(tmp_path), "auditor")) == {}
    write_credentials(tmp_path, {"admin": {"username": "admin", "password": "pw"}})
    with pytest.raises(CredentialsError):
        as_principal(settings_in(tmp_path), "auditor")


@pytest.mark.parametrize("body", [
    "not json", json.dumps([1, 2]), json.dumps({"admin": "pw"}),
    json.dumps({"admin": {"username": "admin"}}),
    json.dumps({"admin": {"username": 1, "password": "pw"}}),
    json.dumps({"admin": {"username": "admin", "password": None}}),
])
def test_a_malformed_credentials_file_is_refused_without_echoing_it(
    tmp_path: Path, body: str,
) -> None:
    path = tmp_path / "credentials.json"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(CredentialsError) as refused:
        read_credentials(path)
    assert "pw" not in str(refused.value)


def test_a_channel_acts_with_its_own_kafka_password() -> None:
    channel = Channel(channel_id="kiosk", secret="s", kafka_password="kiosk-pw")
    settings = CardDeskSettings(kafka_user="admin")
    resolved = as_channel(settings, channel)
    assert client_options(resolved)["sasl_plain_username"] == "kiosk"
    assert client_options(resolved)["sasl_plain_password"] == "kiosk-pw"
    bare = Channel(channel_id="old", secret="s")
    assert as_channel(settings, bare).kafka_user == "admin"


def test_the_local_broker_has_no_unauthenticated_listener(tmp_path: Path) -> None:
    from cardctl.stack import Stack

    stack = Stack(settings_in(tmp_path, kafka_bootstrap="127.0.0.1:39092",
                              kafka_controller_port=39093))
    properties = dict(line.split("=", 1) for line in
                      stack._server_properties(tmp_path, "s3cret").splitlines() if line)
    protocols = dict(pair.split(":") for pair in
                     properties["listener.security.protocol.map"].split(","))
    assert set(protocols.values()) == {"SASL_PLAINTEXT"}
    assert properties["listeners"].split(",")[1] == "CONTROLLER://127.0.0.1:39093"
    assert properties["authorizer.class.name"] == (
        "org.apache.kafka.metadata.authorizer.StandardAuthorizer")
    assert properties["super.users"] == "User:admin"
    assert properties["allow.everyone.if.no.acl.found"] == "false"
    assert properties["auto.create.topics.enable"] == "false"
    assert properties["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"


def test_the_local_controller_marks_an_idle_metadata_log_every_five_seconds(
        tmp_path: Path) -> None:
    from cardctl.stack import Stack

    stack = Stack(settings_in(tmp_path))
    properties = dict(line.split("=", 1) for line in
                      stack._server_properties(tmp_path, "s3cret").splitlines() if line)
    assert properties["metadata.max.idle.interval.ms"] == "5000"  # Kafka's default: 500


def test_the_local_broker_sizes_its_request_threads_to_the_machine() -> None:
    from cardctl.stack import broker_threads

    assert broker_threads(2) == ["num.io.threads=2", "num.network.threads=2"]
    assert broker_threads(1) == ["num.io.threads=2", "num.network.threads=2"]
    assert broker_threads(64) == ["num.io.threads=8", "num.network.threads=3"]  # the defaults
