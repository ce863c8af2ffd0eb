"""bench.hops joins what it read off Kafka by request id into per-hop latencies."""

from __future__ import annotations

import orjson

from bench.hops import HOPS, Seen, hop_latencies, seen_of


def record(topic: str, sent: float, read: float, **body: str) -> Seen:
    return seen_of(topic, sent, read, orjson.dumps(body))


def test_each_hop_is_measured_from_the_records_of_one_request() -> None:
    seen = [
        record("loss.commands", 1000, 1001, request_id="r1", type="ReportLoss"),
        record("loss.events", 1040, 1041, correlation_id="r1", type="LossReported"),
        record("loss.events", 1030, 1042, correlation_id="r1", type="CardFrozen"),
        record("channel.replies.wechat-oa", 1050, 1070, request_id="r1"),
        # another request's event and a command whose reply was not read: left out
        record("loss.events", 1010, 1011, correlation_id="r2", type="LossReported"),
        record("auth.commands", 1000, 1002, request_id="r3", type="IssueCaptcha"),
    ]
    hops = hop_latencies(seen)
    assert list(hops) == ["ReportLoss"]
    assert hops["ReportLoss"] == {HOPS[0]: [30], HOPS[1]: [20], HOPS[2]: [50], HOPS[3]: [20]}


def test_a_command_without_events_has_only_its_reply_hops() -> None:
    seen = [record("auth.commands", 0, 1, request_id="c", type="IssueCaptcha"),
            record("channel.replies.mobile-app", 12, 15, request_id="c")]
    assert hop_latencies(seen) == {"IssueCaptcha": {HOPS[2]: [12], HOPS[3]: [3]}}


def test_a_record_that_is_not_a_json_object_is_kept_without_ids() -> None:
    for value in (b"not json", b"[1, 2]", None):
        seen = seen_of("auth.commands", 1, 2, value)
        assert (seen.request_id, seen.correlation_id, seen.command_type) == (None, None, None)
    assert hop_latencies([seen_of("auth.commands", 1, 2, b"{")]) == {}
