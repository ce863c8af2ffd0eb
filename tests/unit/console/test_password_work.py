"""The console's password hashing: one Argon2id run at a time, a bounded wait for it, and
the cost each hash holds."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from argon2 import PasswordHasher, extract_parameters

from services.console.staff import PasswordWork, PasswordWorkBusyError, password_hasher


class SlowHasher:
    """Stands in for argon2's `PasswordHasher`: takes its time in a thread, counting how
    many of its runs overlap."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.running = self.most_at_once = 0
        self._count = threading.Lock()

    def hash(self, password: str) -> str:
        with self._count:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(self.seconds)
        with self._count:
            self.running -= 1
        return f"hashed:{password}"


async def test_concurrent_hashes_run_one_at_a_time_and_all_finish() -> None:
    hasher = SlowHasher(0.02)
    work = PasswordWork(hasher, wait_s=5)  # type: ignore[arg-type]
    digests = await asyncio.gather(*(work.hash(f"password-{i}") for i in range(6)))
    assert digests == [f"hashed:password-{i}" for i in range(6)]
    assert hasher.most_at_once == 1


async def test_a_turn_not_free_within_the_wait_is_refused_as_busy_and_not_taken() -> None:
    work = PasswordWork(SlowHasher(0), wait_s=0.05)  # type: ignore[arg-type]
    async with work.turn():
        started = time.monotonic()
        with pytest.raises(PasswordWorkBusyError):
            async with work.turn():
                pytest.fail("two turns at once")
        assert time.monotonic() - started < 2
    # The refused wait left nothing held: the next turn is had at once.
    async with asyncio.timeout(1), work.turn():
        assert await work.run(str.upper, "free") == "FREE"


async def test_work_outside_a_turn_is_a_program_error() -> None:
    work = PasswordWork(SlowHasher(0))  # type: ignore[arg-type]
    with pytest.raises(AssertionError):
        await work.run(str.upper, "no turn")


def test_a_hash_holds_19_mib_for_two_passes_in_one_lane_and_the_old_default_is_made_again(
        ) -> None:
    digest = password_hasher().hash("a password of twelve")
    cost = extract_parameters(digest)
    assert (cost.memory_cost, cost.time_cost, cost.parallelism) == (19 * 1024, 2, 1)
    assert not password_hasher().check_needs_rehash(digest)

    old = PasswordHasher().hash("a password of twelve")  # argon2-cffi's default: 64 MiB
    assert extract_parameters(old).memory_cost == 64 * 1024
    assert password_hasher().verify(old, "a password of twelve")
    assert password_hasher().check_needs_rehash(old)
