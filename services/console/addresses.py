"""Which address a request comes from, for the sign-in rate limit: the address that
connected, or, when that is one of the bureau's own reverse proxies, the client that proxy
names in `X-Forwarded-For`. Each proxy appends the address it was connected from, so the
header is read from the right, for as long as the address reached is a trusted proxy; what
lies left of the first untrusted address is the client's own say and is ignored."""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Network, IPv6Network, ip_address

from starlette.requests import Request

UNKNOWN = "unknown"  # no peer address (an in-process transport)


def client_address(request: Request,
                   trusted: Sequence[IPv4Network | IPv6Network]) -> str:
    address = request.client.host if request.client is not None else UNKNOWN
    if not trusted:
        return address
    hops = [hop.strip() for header in request.headers.getlist("x-forwarded-for")
            for hop in header.split(",")]
    while hops and _is_trusted(address, trusted):
        hop = hops.pop()
        if not _is_address(hop):  # a proxy passes along what it was given: stop here
            break
        address = hop
    return address


def _is_address(text: str) -> bool:
    try:
        ip_address(text)
    except ValueError:
        return False
    return True


def _is_trusted(address: str, trusted: Sequence[IPv4Network | IPv6Network]) -> bool:
    try:
        parsed = ip_address(address)
    except ValueError:
        return False
    return any(parsed in network for network in trusted)
