"""The follower barrier's checks cost few Kafka requests: concurrent checks share their end
offsets reads, the group's coordinator is looked up once, and a check never takes a read older
than itself."""

from __future__ import annotations

import asyncio

from shared.barrier import FollowerBarrier, SharedRead
from shared.settings import CardDeskSettings
from tests.unit.kernel.kafka_fake import TOPIC, FakeKafka


def barrier_on(kafka: FakeKafka, timeout_s: float = 1.0) -> FollowerBarrier:
    return FollowerBarrier(CardDeskSettings(), "carddesk-review", [TOPIC], timeout_s=timeout_s,
                           offsets=kafka, admin=kafka)


async def test_six_concurrent_checks_share_two_end_offsets_reads_and_one_lookup() -> None:
    kafka = FakeKafka(partitions=6)
    barrier = barrier_on(kafka)  # no followers in this process: the group is asked
    assert await asyncio.gather(*(barrier.caught_up() for _ in range(6))) == [True] * 6
    # The first check's read, then one shared by the five that asked meanwhile (six checks
    # alone would be 6 ListOffsets, and 6 FindCoordinator before their OffsetFetch).
    assert kafka.requests["ListOffsets"] == 2
    assert kafka.requests["FindCoordinator"] == 1
    assert kafka.requests["OffsetFetch"] <= 6


async def test_the_coordinator_is_looked_up_once_for_many_checks() -> None:
    kafka = FakeKafka()
    barrier = barrier_on(kafka)
    for _ in range(5):
        kafka.publish()
        kafka.follow_all()  # applied elsewhere: only the group can tell
        assert await barrier.caught_up() is True
    assert kafka.requests["FindCoordinator"] == 1
    assert kafka.requests["OffsetFetch"] == 5


async def test_a_coordinator_that_moved_is_looked_up_again_within_the_same_check() -> None:
    kafka = FakeKafka()
    barrier = barrier_on(kafka)
    assert await barrier.caught_up() is True
    kafka.coordinator = 2  # the broker answers NOT_COORDINATOR to the cached id
    kafka.publish()
    kafka.follow_all()
    assert await barrier.caught_up() is True
    assert kafka.requests["FindCoordinator"] == 2
    kafka.publish()
    kafka.follow_all()
    assert await barrier.caught_up() is True
    assert kafka.requests["FindCoordinator"] == 2


async def test_a_check_never_takes_end_offsets_read_before_it_was_called() -> None:
    kafka = FakeKafka()
    kafka.gates["ListOffsets"] = asyncio.Event()
    barrier = barrier_on(kafka, timeout_s=0.3)
    first = asyncio.ensure_future(barrier.caught_up())
    await asyncio.sleep(0.01)  # the first check's ListOffsets is with the broker
    kafka.publish()  # an event the followers have not applied...
    second = asyncio.ensure_future(barrier.caught_up())  # ...published before this check
    await asyncio.sleep(0.01)
    kafka.gates["ListOffsets"].set()
    assert await first is True  # the event came after the first check: not its concern
    assert await second is False  # the older read would have said True
    kafka.follow_all()
    assert await barrier.caught_up() is True


async def test_a_check_that_waits_for_followers_sees_them_catch_up() -> None:
    kafka = FakeKafka()
    kafka.publish()
    barrier = barrier_on(kafka)
    check = asyncio.ensure_future(barrier.caught_up())
    await asyncio.sleep(0.05)
    assert not check.done()
    kafka.follow_all()
    assert await asyncio.wait_for(check, 1) is True


async def test_a_shared_read_serves_only_callers_that_asked_before_it_started() -> None:
    started: list[int] = []
    release = asyncio.Event()

    async def read() -> int:
        started.append(len(started))
        await release.wait()
        return started[-1]

    shared = SharedRead(read, bound_s=1)
    first = asyncio.ensure_future(shared.get())
    await asyncio.sleep(0)
    later = [asyncio.ensure_future(shared.get()) for _ in range(3)]
    await asyncio.sleep(0)
    release.set()
    assert await first == 0
    assert await asyncio.gather(*later) == [1, 1, 1]
    assert started == [0, 1]


async def test_a_caller_that_gives_up_leaves_the_shared_read_to_the_others() -> None:
    release = asyncio.Event()

    async def read() -> str:
        await release.wait()
        return "read"

    shared = SharedRead(read, bound_s=1)
    impatient = asyncio.ensure_future(asyncio.wait_for(shared.get(), 0.01))
    patient = asyncio.ensure_future(shared.get())
    await asyncio.sleep(0.05)
    assert impatient.done() and isinstance(impatient.exception(), TimeoutError)
    release.set()
    assert await asyncio.wait_for(patient, 1) == "read"
