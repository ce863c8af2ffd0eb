"""`with_retries`: infrastructure faults never exhaust a message's attempts; only a fault of
the message's own handling, again and again, sends it to the DLQ."""

from __future__ import annotations

import asyncpg

from shared.consumer import Inbound, with_retries
from tests.support import RecordingDeadLetters

MSG = Inbound("loss.events", 0, 7, b"ref", b"{}")


class Failing:
    """A `process` raising each of `faults` in turn, then succeeding; counts its calls."""

    def __init__(self, *faults: BaseException) -> None:
        self.faults, self.calls = list(faults), 0

    async def __call__(self) -> None:
        self.calls += 1
        if self.faults:
            raise self.faults.pop(0)


async def retry(process: Failing, dead: RecordingDeadLetters) -> None:
    await with_retries(MSG, process, dead, max_attempts=3, base_delay=0.0)  # type: ignore[arg-type]


async def test_an_outage_with_odd_errors_in_between_is_retried_until_it_passes() -> None:
    # A postmaster killed: refused connections, a crashed backend's notice, a client left in
    # a broken state; more odd errors in all than the limit, but never that many in a row.
    odd = asyncpg.exceptions.InternalClientError("cannot switch to state 15")
    process = Failing(ConnectionRefusedError(), odd, odd,
                      asyncpg.exceptions.CrashShutdownError("crash of another process"),
                      odd, odd, asyncpg.exceptions.CannotConnectNowError("in recovery"), odd)
    dead = RecordingDeadLetters()
    await retry(process, dead)
    assert process.calls == 9 and dead.sent == []


async def test_a_handling_fault_in_a_row_max_attempts_times_is_dead_lettered() -> None:
    process = Failing(ConnectionRefusedError(), *[KeyError("bug")] * 5)
    dead = RecordingDeadLetters()
    await retry(process, dead)
    assert process.calls == 4 and dead.sent == [(7, "processing_failed")]
