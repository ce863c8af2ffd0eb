"""Pure rules of the console: lockout, roles, labels, the review queue's projection."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.console.i18n import LABELS, choose_language, translator
from services.console.queue import project
from services.console.staff import (
    Area,
    Attempts,
    LockoutPolicy,
    Role,
    StaffError,
    after_failure,
    check_password,
    check_staff_id,
    is_locked,
    may_use,
)
from shared.contracts import review
from shared.contracts.common import SubjectErased
from tests.unit.status.events import Streams

NOW = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
POLICY = LockoutPolicy(attempts=3, duration=timedelta(minutes=15))


def test_wrong_passwords_below_the_limit_only_count() -> None:
    attempts = after_failure(after_failure(Attempts(0, None), NOW, POLICY), NOW, POLICY)
    assert attempts == Attempts(2, None)
    assert not is_locked(attempts, NOW)


def test_the_limit_locks_the_account_for_the_configured_time() -> None:
    attempts = after_failure(Attempts(2, None), NOW, POLICY)
    assert is_locked(attempts, NOW + timedelta(minutes=14))
    assert not is_locked(attempts, NOW + timedelta(minutes=15))


def test_after_a_lock_the_count_starts_again() -> None:
    locked = after_failure(Attempts(2, None), NOW, POLICY)
    later = NOW + timedelta(minutes=20)
    assert after_failure(locked, later, POLICY) == Attempts(1, None)


@pytest.mark.parametrize(("role", "area", "allowed"), [
    (Role.REVIEWER, Area.REVIEW, True), (Role.REVIEWER, Area.COUNTER, False),
    (Role.REVIEWER, Area.AUDIT, False), (Role.COUNTER, Area.COUNTER, True),
    (Role.COUNTER, Area.REVIEW, False), (Role.AUDITOR, Area.AUDIT, True),
    (Role.AUDITOR, Area.COUNTER, False), (Role.ADMIN, Area.AUDIT, True),
    (Role.COUNTER, Area.LOOKUP, True),
])
def test_each_role_uses_only_its_areas(role: Role, area: Area, allowed: bool) -> None:
    assert may_use(role, area) is allowed


@pytest.mark.parametrize("staff_id", ["A", "li na", "x" * 65, "../admin", "li\nna", ""])
def test_a_staff_id_outside_the_pattern_is_refused(staff_id: str) -> None:
    with pytest.raises(StaffError):
        check_staff_id(staff_id)


def test_a_short_or_huge_password_is_refused() -> None:
    with pytest.raises(StaffError):
        check_password("too-short")
    with pytest.raises(StaffError):
        check_password("p" * 257)
    assert check_password("twelve chars") == "twelve chars"


def test_every_label_has_both_languages() -> None:
    for key, (zh, en) in LABELS.items():
        assert zh and en, key
    assert translator("zh")("approve") == "通过"
    assert translator("en")("approve") == "Approve"


@pytest.mark.parametrize(("cookie", "header", "language"), [
    ("en", "zh-CN", "en"), (None, "en-GB,en;q=0.9", "en"), (None, "zh-CN,zh;q=0.9", "zh"),
    (None, None, "zh"), ("xx", "fr-FR", "zh"),
])
def test_the_language_is_the_cookie_else_the_browser_else_chinese(
        cookie: str | None, header: str | None, language: str) -> None:
    assert choose_language(cookie, header) == language


def test_the_queue_follows_an_application_from_applied_to_decided() -> None:
    s = Streams()
    applied = s.emit("review.events", review.ReissueApplied(
        application_id="app-1", loss_id="l", old_card_no=None, address="enc:v1:a",
        phone="enc:v1:p", photo_ref="enc:v1:f", pickup_bureau="futian", channel="wechat-oa"))
    row = project(None, applied, review.ReissueApplied.model_validate(
        {"type": "ReissueApplied", **applied.data}))
    assert row is not None and row.status == "pending" and row.pickup_bureau == "futian"
    rejected_event = review.ReviewRejected(application_id="app-1", reviewer_id="li.na",
                                           reason="photo unclear")
    rejected = project(row, s.emit("review.events", rejected_event), rejected_event)
    assert rejected is not None
    assert (rejected.status, rejected.decided_by, rejected.reason) == (
        "rejected", "li.na", "photo unclear")
    erased_event = SubjectErased(reason="request")
    erased = project(rejected, s.emit("review.events", erased_event), erased_event)
    assert erased is not None and erased.status == "erased"
    assert erased.pickup_bureau == "[erased]"


def test_a_decision_for_an_unknown_application_makes_no_row() -> None:
    event = review.ReviewApproved(application_id="app-x", reviewer_id="r", pickup_bureau="b",
                                  old_card_no=None)
    assert project(None, Streams().emit("review.events", event), event) is None
