"""Which channel `cardctl seed`, `demo` and `erase` act as: `--channel`, else the file's first."""

from __future__ import annotations

import pytest

from cardctl.channel import ChannelChoiceError, pick_channel
from shared.channels import Channel, ChannelRegistry

REGISTRY = ChannelRegistry({
    "kiosk": Channel(channel_id="kiosk", secret="s1"),
    "city-hall": Channel(channel_id="city-hall", secret="s2", bureau=True),
    "app": Channel(channel_id="app", secret="s3"),
})


def test_without_a_choice_the_first_citizen_and_the_first_bureau_channel_are_taken() -> None:
    assert pick_channel(REGISTRY, None, bureau=False).channel_id == "kiosk"
    assert pick_channel(REGISTRY, None, bureau=True).channel_id == "city-hall"


def test_a_named_channel_is_taken_as_it_is() -> None:
    assert pick_channel(REGISTRY, "app", bureau=False).channel_id == "app"
    assert pick_channel(REGISTRY, "city-hall", bureau=True).channel_id == "city-hall"


@pytest.mark.parametrize(("requested", "bureau"), [
    ("wechat-oa", False),  # not in this file: the old hard-coded default
    ("", False),
    ("app", True),  # a citizen channel cannot act for a bureau
    ("../../etc/passwd", True),
])
def test_a_channel_the_file_does_not_offer_is_refused_by_name(
    requested: str, bureau: bool,
) -> None:
    with pytest.raises(ChannelChoiceError):
        pick_channel(REGISTRY, requested, bureau=bureau)


def test_a_file_without_a_bureau_channel_says_so() -> None:
    citizens_only = ChannelRegistry({"app": Channel(channel_id="app", secret="s")})
    with pytest.raises(ChannelChoiceError, match="no bureau channel"):
        pick_channel(citizens_only, None, bureau=True)
