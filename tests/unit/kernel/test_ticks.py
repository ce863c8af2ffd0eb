"""uvicorn's server loop in a service process ticks once a second (`shared.ticks`), and each
tick still does what uvicorn's tenth did: the `Date` header, the stop."""

from __future__ import annotations

import asyncio

import pytest
import uvicorn

from shared.ticks import TICK_S, _main_loop, tick_once_a_second


async def app(scope: object, receive: object, send: object) -> None:
    """Never called: the loop under test serves no request."""


def server() -> uvicorn.Server:
    config = uvicorn.Config(app, log_config=None)
    config.load()
    return uvicorn.Server(config)


async def test_each_tick_is_a_second_renews_the_date_header_and_sees_a_stop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    under_test = server()
    counters: list[int] = []
    on_tick = under_test.on_tick

    async def counted(counter: int) -> bool:
        counters.append(counter)
        under_test.server_state.default_headers = []  # what the tick must put back
        return await on_tick(counter)

    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 3:
            under_test.should_exit = True

    monkeypatch.setattr(under_test, "on_tick", counted)
    monkeypatch.setattr(asyncio, "sleep", sleep)
    await _main_loop(under_test)

    assert slept == [TICK_S] * 3 == [1.0] * 3
    # uvicorn counts tenths and renews the header on every tenth: so on every tick of ours.
    assert counters == [0, 10, 20, 30]
    assert b"date" in [name for name, _ in under_test.server_state.default_headers]


def test_a_service_process_installs_the_loop_on_every_uvicorn_server(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def uvicorns_own(_self: uvicorn.Server) -> None:
        """Stands in for uvicorn's loop (another test may have installed ours already)."""

    monkeypatch.setattr(uvicorn.Server, "main_loop", uvicorns_own)  # uvicorn's, put back after
    tick_once_a_second()
    assert uvicorn.Server.main_loop is _main_loop
