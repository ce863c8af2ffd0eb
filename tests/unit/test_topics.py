"""The contract's topics: one reply topic per channel, and no shared one."""

from __future__ import annotations

import pytest

from shared.topics import COMMANDS_RETENTION, all_topics, reply_topic


def test_every_channel_gets_its_own_reply_topic_and_there_is_no_shared_one() -> None:
    topics = {t.name: t for t in all_topics(3, ["wechat-oa", "bureau-counter", "wechat-oa"])}
    replies = sorted(name for name in topics if name.startswith("channel.replies"))
    assert replies == ["channel.replies.bureau-counter", "channel.replies.wechat-oa"]
    assert topics["channel.replies.wechat-oa"].config == COMMANDS_RETENTION
    assert topics["channel.replies.wechat-oa"].partitions == 3


@pytest.mark.parametrize("channel_id", ["", "a.b", "a/b", "a b", "é", "x" * 201])
def test_a_channel_id_that_makes_no_valid_topic_name_is_refused(channel_id: str) -> None:
    with pytest.raises(ValueError, match="channel id"):
        reply_topic(channel_id)
