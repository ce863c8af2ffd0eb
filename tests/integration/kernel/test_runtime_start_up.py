"""A service process freezes what its start-up made; services that tests run in-process
leave the test process's collector as it was."""

from __future__ import annotations

import gc

from shared.runtime import ServiceRuntime
from shared.settings import CardDeskSettings
from tests.support import unique


async def test_only_a_runtime_that_owns_its_process_freezes_its_start_up(
    settings: CardDeskSettings,
) -> None:
    name = unique("startup")
    in_process = ServiceRuntime(name, settings)
    await in_process.start()
    try:
        assert gc.get_freeze_count() == 0
    finally:
        await in_process.stop()

    owning = ServiceRuntime(name, settings)
    owning.owns_process = True
    try:
        await owning.start()
        assert gc.get_freeze_count() > 0
        assert not any(o is owning.pool for o in gc.get_objects())  # frozen with the rest
    finally:
        gc.unfreeze()
        await owning.stop()
