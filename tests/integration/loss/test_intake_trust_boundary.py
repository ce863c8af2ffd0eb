"""The command intake's trust boundary on the real Kafka and PostgreSQL (issue 11, sections 2
and 4), through the loss service: who gets a reply and where, stale and repeated commands,
channel-bound tokens, and poison messages that must not hold up a partition."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka import ConsumerRecord

from shared.channels import ChannelRegistry, sign
from shared.contracts.issuance import CardIssued
from shared.tokens import SessionClaims
from shared.topics import reply_topic
from tests.integration.loss.conftest import Harness, Tail

pytestmark = pytest.mark.integration

CHANNELS = ("wechat-oa", "mobile-app", "bureau-counter")
WAIT_S = 30.0


@dataclass
class Watch:
    """Every reply topic and the DLQs of the loss service's inputs, from the module's start."""

    replies: dict[str, Tail]
    commands_dlq: Tail
    issuance_dlq: Tail

    def replies_keyed(self, key: str) -> list[tuple[str, ConsumerRecord]]:
        return [(channel, r) for channel, tail in self.replies.items() for r in tail.records
                if r.key == key.encode()]

    async def reply(self, channel: str, request_id: str) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + WAIT_S
        while asyncio.get_running_loop().time() < deadline:
            for record in self.replies[channel].records:
                if record.key == request_id.encode():
                    return dict(json.loads(record.value))
            await asyncio.sleep(0.05)
        raise AssertionError(f"no reply to {request_id} on {reply_topic(channel)}")


@pytest.fixture(scope="module")
async def watch(harness: Harness) -> AsyncIterator[Watch]:
    bootstrap = harness.settings.kafka_bootstrap
    tails = [Tail(bootstrap, reply_topic(c)) for c in CHANNELS]
    commands_dlq = Tail(bootstrap, "loss.commands.dlq")
    issuance_dlq = Tail(bootstrap, "issuance.events.dlq")
    for tail in (*tails, commands_dlq, issuance_dlq):
        await tail.start()
    try:
        yield Watch(dict(zip(CHANNELS, tails, strict=True)), commands_dlq, issuance_dlq)
    finally:
        for tail in (*tails, commands_dlq, issuance_dlq):
            await tail.stop()


def dead_letters(tail: Tail, key: str) -> list[ConsumerRecord]:
    return [r for r in tail.records if r.key == key.encode()]


async def parked_once(tail: Tail, key: str) -> ConsumerRecord:
    """The one dead letter of `key`, once it has arrived (it follows the reply)."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not dead_letters(tail, key):
        assert asyncio.get_running_loop().time() < deadline, f"no dead letter for {key}"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # room for a duplicate, if one were ever sent
    [record] = dead_letters(tail, key)
    return record


def dlq_code(record: ConsumerRecord) -> str:
    code: bytes = dict(record.headers)["x-dlq-code"]
    return code.decode()


def envelope(channel: str, command_type: str, payload: dict[str, Any], *,
             request_id: str | None = None, issued_at: datetime | None = None) -> bytes:
    return json.dumps({
        "request_id": request_id or str(uuid.uuid4()), "channel": channel,
        "issued_at": (issued_at or datetime.now(UTC)).isoformat(), "type": command_type,
        "payload": payload,
    }).encode()


def secret_of(harness: Harness, channel: str) -> str:
    found = ChannelRegistry.from_file(harness.settings.channels_file).get(channel)
    assert found is not None, channel
    return found.secret


async def send(harness: Harness, value: bytes, *, key: str,
               headers: list[tuple[str, bytes]]) -> None:
    await harness.producer.send_and_wait("loss.commands", value=value, key=key.encode(),
                                         headers=headers)


async def send_signed(harness: Harness, channel: str, value: bytes, *, key: str) -> None:
    await send(harness, value, key=key, headers=[
        ("x-channel-id", channel.encode()),
        ("x-signature", sign(secret_of(harness, channel), value).encode())])


def token(harness: Harness, citizen_ref: str, channel: str) -> str:
    now = datetime.now(UTC)
    return harness.signer.sign(SessionClaims(
        kid="", session_id=str(uuid.uuid4()), citizen_ref=citizen_ref, channel=channel,
        level="realname", issued_at=now, expires_at=now + timedelta(minutes=30)))


async def citizen_with_card(harness: Harness) -> str:
    citizen_ref = harness.new_citizen()
    card_no = f"C{uuid.uuid4().int % 10**9:09d}"
    await harness.publish("issuance.events",
                          harness.seal(f"card-{citizen_ref}", citizen_ref,
                                       CardIssued(card_no=card_no)))
    await harness.eventually("SELECT card_no FROM {schema}.cards WHERE citizen_ref = $1",
                             citizen_ref, expect=card_no)
    return citizen_ref


async def test_a_token_presented_by_another_channel_is_refused_channel_mismatch(
    harness: Harness, watch: Watch,
) -> None:
    citizen_ref = await citizen_with_card(harness)
    stolen = token(harness, citizen_ref, "wechat-oa")
    request_id = str(uuid.uuid4())

    await send_signed(harness, "mobile-app", envelope(
        "mobile-app", "ReportLoss", {"session_token": stolen, "kind": "temporary"},
        request_id=request_id), key=request_id)

    reply = await watch.reply("mobile-app", request_id)
    assert (reply["status"], reply["code"]) == ("rejected", "channel_mismatch")
    await harness.eventually("SELECT count(*) FROM {schema}.events WHERE citizen_ref = $1",
                             citizen_ref, expect=0)


@pytest.mark.parametrize("skew", [timedelta(minutes=-10), timedelta(minutes=10)],
                         ids=["replayed-old", "from-the-future"])
async def test_a_command_issued_outside_the_window_is_refused_stale_and_dead_lettered(
    harness: Harness, watch: Watch, skew: timedelta,
) -> None:
    citizen_ref = await citizen_with_card(harness)
    request_id = str(uuid.uuid4())
    value = envelope("wechat-oa", "ReportLoss",
                     {"session_token": token(harness, citizen_ref, "wechat-oa"),
                      "kind": "temporary"},
                     request_id=request_id, issued_at=datetime.now(UTC) + skew)

    await send_signed(harness, "wechat-oa", value, key=request_id)

    reply = await watch.reply("wechat-oa", request_id)
    assert (reply["status"], reply["code"]) == ("rejected", "stale_command")
    parked = await parked_once(watch.commands_dlq, request_id)
    assert dlq_code(parked) == "stale_command"
    assert parked.value == value
    await harness.eventually("SELECT count(*) FROM {schema}.events WHERE citizen_ref = $1",
                             citizen_ref, expect=0)


async def test_an_unauthenticated_message_with_a_victims_request_id_gets_no_reply_anywhere(
    harness: Harness, watch: Watch,
) -> None:
    citizen_ref = await citizen_with_card(harness)
    victim_request = str(uuid.uuid4())
    victims = envelope("wechat-oa", "ReportLoss",
                       {"session_token": token(harness, citizen_ref, "wechat-oa"),
                        "kind": "temporary"}, request_id=victim_request)
    squatter = envelope("wechat-oa", "ReportLoss", {"session_token": "x", "kind": "temporary"},
                        request_id=victim_request)
    # Same key, so same partition: the victim's own command comes after the attacks.
    await send(harness, squatter, key=victim_request, headers=[])
    await send(harness, squatter, key=victim_request,
               headers=[("x-channel-id", b"wechat-oa"), ("x-signature", b"ab" * 32)])
    await send(harness, squatter, key=victim_request,
               headers=[("x-channel-id", b"wechat-\xff\xfe"), ("x-signature", b"00")])
    await send(harness, squatter, key=victim_request,
               headers=[("x-channel-id", b"pirate-channel"),
                        ("x-signature", sign("pirate", squatter).encode())])
    await send_signed(harness, "wechat-oa", victims, key=victim_request)

    # The victim's command was not squatted: it got its own outcome, the one reply there is.
    reply = await watch.reply("wechat-oa", victim_request)
    assert (reply["status"], reply["code"]) == ("accepted", "accepted"), reply
    await asyncio.sleep(1.0)  # room for a stray reply to show up, if one were ever sent
    assert [channel for channel, _ in watch.replies_keyed(victim_request)] == ["wechat-oa"]
    parked = dead_letters(watch.commands_dlq, victim_request)
    assert sorted(dlq_code(r) for r in parked) == [
        "bad_signature", "unknown_channel", "unknown_channel", "unknown_channel"]


async def test_the_same_request_id_from_two_channels_gets_two_independent_outcomes(
    harness: Harness, watch: Watch,
) -> None:
    first, second = await citizen_with_card(harness), await citizen_with_card(harness)
    request_id = str(uuid.uuid4())

    await send_signed(harness, "wechat-oa", envelope(
        "wechat-oa", "ReportLoss",
        {"session_token": token(harness, first, "wechat-oa"), "kind": "temporary"},
        request_id=request_id), key=request_id)
    await send_signed(harness, "mobile-app", envelope(
        "mobile-app", "ReportLoss",
        {"session_token": token(harness, second, "mobile-app"), "kind": "formal"},
        request_id=request_id), key=request_id)

    on_wechat = await watch.reply("wechat-oa", request_id)
    on_mobile = await watch.reply("mobile-app", request_id)
    assert (on_wechat["code"], on_wechat["data"]["kind"]) == ("accepted", "temporary")
    # The second is decided on its own: a formal loss needs a portrait verification.
    assert (on_mobile["status"], on_mobile["code"]) == ("rejected", "portrait_required")
    await harness.eventually("SELECT count(*) FROM {schema}.events WHERE citizen_ref = $1",
                             first, expect=1)


async def test_a_repeat_gets_the_identical_reply_changes_nothing_and_is_stored_sealed(
    harness: Harness, watch: Watch,
) -> None:
    citizen_ref = await citizen_with_card(harness)
    request_id = str(uuid.uuid4())
    value = envelope("wechat-oa", "ReportLoss",
                     {"session_token": token(harness, citizen_ref, "wechat-oa"),
                      "kind": "temporary"}, request_id=request_id)

    await send_signed(harness, "wechat-oa", value, key=request_id)
    first = await watch.reply("wechat-oa", request_id)
    await send_signed(harness, "wechat-oa", value, key=request_id)

    deadline = asyncio.get_running_loop().time() + WAIT_S
    while len(watch.replies_keyed(request_id)) < 2:
        assert asyncio.get_running_loop().time() < deadline, "the repeat got no reply"
        await asyncio.sleep(0.05)
    [(_, one), (_, two)] = watch.replies_keyed(request_id)
    assert one.value == two.value
    assert first["status"] == "accepted"
    await harness.eventually("SELECT count(*) FROM {schema}.events WHERE citizen_ref = $1",
                             citizen_ref, expect=1)
    stored = await harness.db.fetchval(
        f"SELECT reply FROM {harness.schema}.stored_replies"
        " WHERE channel = 'wechat-oa' AND request_id = $1", request_id)
    assert first["data"]["loss_id"].encode() not in bytes(stored)  # sealed, not plain


ONE_MB = 1_000_000


def command_poison(channel: str, key: str) -> dict[str, bytes]:
    huge = envelope(channel, "ReportLoss", {"session_token": [0] * 60_000, "kind": "temporary"},
                    request_id=key)
    return {
        "deep nesting": b"[" * 100_000,
        "huge array": huge,
        "invalid UTF-8": b'{"request_id": "\xff\xfe", "channel": "' + channel.encode() + b'"}',
        "wrong types": json.dumps({"request_id": 5, "channel": channel, "issued_at": [],
                                   "type": {}, "payload": "x"}).encode(),
        "1 MB": b"[" + b"0," * ((ONE_MB - 2) // 2) + b"0]",
    }


async def test_poison_commands_reach_the_dlq_once_and_the_command_behind_them_is_processed(
    harness: Harness, watch: Watch,
) -> None:
    key = str(uuid.uuid4())
    poison = command_poison("wechat-oa", key)
    for value in poison.values():  # signed: each also earns its refusal
        await send_signed(harness, "wechat-oa", value, key=key)
    await send(harness, b"[" * 100_000, key=key, headers=[])  # unsigned: the DLQ only
    citizen_ref = await citizen_with_card(harness)
    request_id = str(uuid.uuid4())
    await send_signed(harness, "wechat-oa", envelope(
        "wechat-oa", "ReportLoss",
        {"session_token": token(harness, citizen_ref, "wechat-oa"), "kind": "temporary"},
        request_id=request_id), key=key)

    reply = await watch.reply("wechat-oa", request_id)
    assert reply["code"] == "accepted", reply
    await asyncio.sleep(1.0)  # room for a duplicate dead letter, if one were ever sent
    parked = dead_letters(watch.commands_dlq, key)
    assert sorted(dlq_code(r) for r in parked) == sorted([
        "too_deeply_nested", "invalid_payload", "malformed_json", "malformed_command",
        "message_too_large", "unknown_channel"])
    [too_large] = [r for r in parked if dlq_code(r) == "message_too_large"]
    # Parked cut short, so the DLQ write itself can never be refused and retried for ever.
    assert dict(too_large.headers)["x-dlq-original-size"] == str(len(poison["1 MB"])).encode()
    assert poison["1 MB"].startswith(too_large.value) and len(too_large.value) < ONE_MB
    refusals = [json.loads(r.value)["code"] for _, r in watch.replies_keyed(key)]
    assert sorted(refusals) == sorted([
        "too_deeply_nested", "invalid_payload", "malformed_json", "malformed_command",
        "message_too_large"])
    assert harness.runtime.broker.running


async def test_an_oversized_signed_command_is_refused_under_its_own_request_id(
    harness: Harness, watch: Watch,
) -> None:
    """Keyed by its session, as a command with a session is: a refusal under the key could
    not be matched to the request by the channel."""
    session_key, request_id = f"session-{uuid.uuid4()}", str(uuid.uuid4())
    value = envelope("wechat-oa", "ReportLoss",
                     {"session_token": "x" * 400_000, "kind": "temporary"}, request_id=request_id)
    assert len(value) > harness.settings.max_message_bytes
    await send_signed(harness, "wechat-oa", value, key=session_key)
    reply = await watch.reply("wechat-oa", request_id)
    assert (reply["status"], reply["code"]) == ("rejected", "message_too_large")
    assert dlq_code(await parked_once(watch.commands_dlq, session_key)) == "message_too_large"
    assert watch.replies_keyed(session_key) == []


async def test_poison_events_reach_the_dlq_once_and_the_event_behind_them_is_applied(
    harness: Harness, watch: Watch,
) -> None:
    citizen_ref = harness.new_citizen()  # the key of the poison and of the good event alike
    card_no = f"C{uuid.uuid4().int % 10**9:09d}"
    poison = {
        "deep nesting": b"[" * 100_000,
        "huge array": json.dumps({"data": list(range(30_000))}).encode(),
        "invalid UTF-8": b'{"type": "CardIssued\xff"}',
        "wrong types": json.dumps({"event_id": 5, "type": ["CardIssued"], "version": "1",
                                   "citizen_ref": None, "data": []}).encode(),
        "1 MB": b"[" + b"0," * ((ONE_MB - 2) // 2) + b"0]",
    }
    for value in poison.values():
        await harness.producer.send_and_wait("issuance.events", value=value,
                                             key=citizen_ref.encode())
    await harness.publish("issuance.events",
                          harness.seal(f"card-{citizen_ref}", citizen_ref,
                                       CardIssued(card_no=card_no)))

    await harness.eventually("SELECT card_no FROM {schema}.cards WHERE citizen_ref = $1",
                             citizen_ref, expect=card_no)
    await asyncio.sleep(1.0)
    parked = dead_letters(watch.issuance_dlq, citizen_ref)
    assert sorted(dlq_code(r) for r in parked) == sorted([
        "too_deeply_nested", "malformed_event", "malformed_json", "malformed_event",
        "message_too_large"])
    assert harness.runtime.broker.running
