"""bench.budget's consumer batches: what each consumer and barrier did between two scrapes."""

from __future__ import annotations

from bench.budget import batch_rows
from cardctl.top import parse

BEFORE = """\
carddesk_consumer_batch_size_count{topic="loss.commands"} 10.0
carddesk_consumer_batch_size_sum{topic="loss.commands"} 30.0
carddesk_consumer_batch_size_count{topic="issuance.events,review.events"} 4.0
carddesk_consumer_batch_size_sum{topic="issuance.events,review.events"} 8.0
carddesk_barrier_wait_seconds_count{group="carddesk-loss-followers",status="caught_up"} 10.0
carddesk_barrier_wait_seconds_sum{group="carddesk-loss-followers",status="caught_up"} 1.0
"""

AFTER = """\
carddesk_consumer_batch_size_count{topic="loss.commands"} 60.0
carddesk_consumer_batch_size_sum{topic="loss.commands"} 230.0
carddesk_consumer_batch_size_count{topic="issuance.events,review.events"} 24.0
carddesk_consumer_batch_size_sum{topic="issuance.events,review.events"} 128.0
carddesk_barrier_wait_seconds_count{group="carddesk-loss-followers",status="caught_up"} 55.0
carddesk_barrier_wait_seconds_sum{group="carddesk-loss-followers",status="caught_up"} 2.5
carddesk_barrier_wait_seconds_count{group="carddesk-loss-followers",status="behind"} 5.0
carddesk_barrier_wait_seconds_sum{group="carddesk-loss-followers",status="behind"} 15.0
"""


def test_batches_and_waits_are_counted_between_the_scrapes_per_command() -> None:
    rows = dict(batch_rows({"loss": parse(BEFORE)}, {"loss": parse(AFTER)}, commands=100))
    # 50 batches of 200 records; 20 of 120: only what happened between the scrapes counts.
    assert rows["loss ← loss.commands"] == "0.500 batches per command, 4.0 records per batch"
    assert rows["loss ← issuance.events,review.events"] == (
        "0.200 batches per command, 6.0 records per batch")
    # 45 + 5 waits, of 1.5 + 15 s: the statuses together.
    assert rows["loss: barrier"] == "0.500 waits per command, 330.0 ms mean"
    assert rows["all consumers"] == "0.70 batches per command"


def test_a_service_that_started_meanwhile_counts_from_zero_and_a_silent_one_is_named() -> None:
    rows = dict(batch_rows({"loss": None, "status": None},
                           {"loss": parse(AFTER), "status": None}, commands=60))
    assert rows["loss ← loss.commands"] == "1.000 batches per command, 3.8 records per batch"
    assert rows["status"] == "no /metrics"
    assert rows["all consumers"] == "1.40 batches per command"
