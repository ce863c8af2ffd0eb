"""A service that serves its own Starlette app (the status query API, the bureau console)
around its runtime, instead of the runtime's FastStream app (`ServiceRuntime.app`).

The app's lifespan starts the runtime (pool, schema, producer, dead letters, loops), then the
broker in the background: the app serves, and its `/health` says 503, while Kafka is slow.
Stopping is bounded step by step, as every service's (`shared.runtime.stop_step`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import uvicorn
from starlette.applications import Starlette

from shared.runtime import STOP_STEP_TIMEOUT_S, ServiceRuntime, stop_step, supervise

Lifespan = Callable[[Starlette], AbstractAsyncContextManager[None]]

# A step of stopping: its name (logged if it runs out of time) and the work.
StopStep = tuple[str, Callable[[], Awaitable[object]]]


def runtime_lifespan(runtime: ServiceRuntime, *,
                     started: Callable[[], Awaitable[None]] | None = None,
                     stopping: Sequence[StopStep] = ()) -> Lifespan:
    """The lifespan of an app served around `runtime`: `started` runs once the runtime has
    (the app's own clients), `stopping` after the broker stopped, before the runtime does."""

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await runtime.start()
        if started is not None:
            await started()
        broker = asyncio.create_task(supervise(f"{runtime.name}.broker", runtime.broker.start))
        try:
            yield
        finally:
            broker.cancel()
            await asyncio.wait({broker}, timeout=STOP_STEP_TIMEOUT_S)
            # A consumer stuck retrying a dead database must not hold the stop for ever.
            await stop_step("broker", runtime.broker.stop(), 2 * STOP_STEP_TIMEOUT_S)
            for step, work in stopping:
                await stop_step(step, work())
            await runtime.stop()

    return lifespan


def server_config(app: Starlette, host: str, port: int, *,
                  access_log: bool = True) -> uvicorn.Config:
    """uvicorn's settings for `app`, logging through the service's structlog configuration.

    The HTTP parser is named, not left to uvicorn: it would take httptools wherever that is
    installed, and it buffers a request's headers for httptools without bound (a 20 MB
    header was answered 200; README, "Tried and not kept"). h11 refuses a request line and
    headers over 16 KB."""
    return uvicorn.Config(app, host=host, port=port, log_config=None, access_log=access_log,
                          http="h11")


async def serve(app: Starlette, host: str, port: int, *, access_log: bool = True) -> None:
    """Serve `app` with uvicorn (`server_config`)."""
    await uvicorn.Server(server_config(app, host, port, access_log=access_log)).serve()
