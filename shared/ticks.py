"""uvicorn's server loop, ticking once a second instead of ten times.

`uvicorn.Server.main_loop` sleeps 100 ms between ticks, only to see whether the server was
asked to stop and, every tenth tick, to renew the `Date` header. Every service serves HTTP
through uvicorn (the status API, the console, and `/health` and `/metrics` of the others),
so each woke ten times a second with nothing to do: counted at rest on 2026-12-02, that sleep
was 474 of the 810-1,050 waits each service began in 50 s (README, Performance). Ticking
once a second keeps the header's one-second resolution; a stop is noticed within a second
instead of a tenth, against a 10 s bound per step of stopping.
"""

from __future__ import annotations

import asyncio

import uvicorn

TICK_S = 1.0
# uvicorn counts its ticks in tenths of a second (`on_tick` renews the header at multiples
# of ten), so each of ours counts ten.
_TENTHS_PER_TICK = 10
_COUNTER_WRAP = 864_000  # uvicorn's own: a day in tenths


async def _main_loop(self: uvicorn.Server) -> None:
    counter = 0
    should_exit = await self.on_tick(counter)
    while not should_exit:
        counter = (counter + _TENTHS_PER_TICK) % _COUNTER_WRAP
        await asyncio.sleep(TICK_S)
        should_exit = await self.on_tick(counter)


def tick_once_a_second() -> None:
    """Every uvicorn server of this process ticks once a second (`_main_loop`)."""
    uvicorn.Server.main_loop = _main_loop  # type: ignore[method-assign]
