"""The HTTP servers (the status query API, the bureau console) bound what a caller can make
them buffer before a request reaches the app: oversized headers are refused, and the server
goes on serving."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from shared.webapp import server_config
from tests.support import eventually

GOOD = b"GET /seen HTTP/1.1\r\nHost: status\r\n\r\n"


@pytest.fixture
async def served() -> AsyncIterator[tuple[int, list[str]]]:
    """An app served as the services serve theirs, on a free port; the paths it was asked."""
    asked: list[str] = []

    async def seen(request: Request) -> PlainTextResponse:
        asked.append(request.url.path)
        return PlainTextResponse("seen")

    server = uvicorn.Server(server_config(Starlette(routes=[Route("/seen", seen)]),
                                          "127.0.0.1", 0, access_log=False))
    serving = asyncio.create_task(server.serve())

    async def started() -> bool:
        return server.started

    await eventually(started, timeout_s=10)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield port, asked
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)


async def exchange(port: int, request: bytes) -> bytes:
    """Sends `request` in pieces, as a slow client would; the start of what came back, or
    b"" where the server closed the connection on it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for start in range(0, len(request), 64 * 1024):
            writer.write(request[start:start + 64 * 1024])
            await writer.drain()
        return await asyncio.wait_for(reader.read(64), 10)
    except ConnectionError:
        return b""
    finally:
        writer.close()


def refused(answer: bytes) -> bool:
    return answer == b"" or answer.startswith(b"HTTP/1.1 400")


async def test_the_parser_is_h11_whatever_else_is_installed() -> None:
    config = server_config(Starlette(), "127.0.0.1", 0)
    config.load()
    assert config.http_protocol_class.__name__ == "H11Protocol"


async def test_a_header_of_a_megabyte_is_refused_before_the_app_sees_it(
    served: tuple[int, list[str]],
) -> None:
    port, asked = served
    huge = b"GET /seen HTTP/1.1\r\nHost: status\r\nX-Pad: " + b"a" * (1024 * 1024) + b"\r\n\r\n"

    assert refused(await exchange(port, huge))

    assert asked == []
    assert (await exchange(port, GOOD)).startswith(b"HTTP/1.1 200")
    assert asked == ["/seen"]


async def test_a_hundred_thousand_small_headers_are_refused_too(
    served: tuple[int, list[str]],
) -> None:
    port, asked = served
    many = (b"GET /seen HTTP/1.1\r\nHost: status\r\n"
            + b"".join(b"X-%d: v\r\n" % i for i in range(100_000)) + b"\r\n")

    assert refused(await exchange(port, many))

    assert asked == []
    assert (await exchange(port, GOOD)).startswith(b"HTTP/1.1 200")


async def test_a_garbled_request_line_gets_400(served: tuple[int, list[str]]) -> None:
    port, asked = served

    answer = await exchange(port, b"GAR\x00BAGE / HTTP/1.1\r\n\r\n")

    assert answer.startswith(b"HTTP/1.1 400")
    assert asked == []
