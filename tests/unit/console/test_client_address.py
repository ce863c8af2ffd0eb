"""Which address a sign-in counts against: the peer's, or the client a trusted proxy names;
never what a client writes into X-Forwarded-For itself."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from starlette.requests import Request

from services.console.addresses import UNKNOWN, client_address
from services.console.settings import ConsoleSettings

PROXIES = ConsoleSettings(console_trusted_proxies="10.0.0.1, 10.20.0.0/16").trusted_proxies()


def request(peer: str | None, *forwarded: str) -> Request:
    return Request({
        "type": "http", "method": "POST", "path": "/sign-in",
        "client": None if peer is None else (peer, 50_000),
        "headers": [(b"x-forwarded-for", value.encode()) for value in forwarded],
    })


def test_without_trusted_proxies_the_peer_is_the_client_whatever_the_header_says() -> None:
    assert client_address(request("203.0.113.9", "192.0.2.1"), ()) == "203.0.113.9"


def test_an_untrusted_peer_cannot_name_another_client() -> None:
    assert client_address(request("203.0.113.9", "192.0.2.1"), PROXIES) == "203.0.113.9"


def test_a_trusted_proxy_names_the_client_it_was_connected_from() -> None:
    assert client_address(request("10.0.0.1", "198.51.100.7"), PROXIES) == "198.51.100.7"


def test_through_a_chain_of_proxies_the_first_untrusted_address_from_the_right_is_the_client(
) -> None:
    forwarded = request("10.0.0.1", "192.0.2.66, 198.51.100.7, 10.20.3.4")
    assert client_address(forwarded, PROXIES) == "198.51.100.7"
    # Several header lines are one list, in order.
    split = request("10.0.0.1", "192.0.2.66", "198.51.100.7, 10.20.3.4")
    assert client_address(split, PROXIES) == "198.51.100.7"


def test_what_is_not_an_address_ends_the_walk_at_the_last_trusted_hop() -> None:
    assert client_address(request("10.0.0.1", "<script>, 10.20.3.4"), PROXIES) == "10.20.3.4"
    assert client_address(request("10.0.0.1", ""), PROXIES) == "10.0.0.1"


def test_a_request_without_a_peer_address_counts_as_one_unknown_client() -> None:
    assert client_address(request(None, "198.51.100.7"), PROXIES) == UNKNOWN


def test_a_trusted_proxy_setting_that_is_not_an_address_or_network_is_refused() -> None:
    with pytest.raises(ValidationError, match="console_trusted_proxies"):
        ConsoleSettings(console_trusted_proxies="10.0.0.1, proxy.bureau.example")
