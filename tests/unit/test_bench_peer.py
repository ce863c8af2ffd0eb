"""Run alone, the peer's benchmark says what to start when PostgreSQL is not up, instead of
a traceback."""

from __future__ import annotations

import socket

import pytest

from bench import peer


def a_closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends


def test_without_postgresql_the_peer_stops_with_what_to_start(
        monkeypatch: pytest.MonkeyPatch) -> None:
    port = a_closed_port()
    monkeypatch.setenv("CARDDESK_DATABASE_URL", f"postgresql://carddesk:s3cret@127.0.0.1:{port}/x")
    with pytest.raises(SystemExit) as stopped:
        peer.main(runs=1, seconds=1, writers=1, cards=1)
    message = str(stopped.value)
    assert f"127.0.0.1:{port}" in message
    assert "cardctl stack up --no-services" in message
    assert "s3cret" not in message
