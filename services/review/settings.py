"""Configuration of the review service (`CARDDESK_REVIEW_*`): the region's approval rule."""

from __future__ import annotations

from pydantic import Field

from services.review.domain import AutoApprovalRule
from shared.settings import CardDeskSettings


class ReviewSettings(CardDeskSettings):
    """The automatic-approval rule is per-region configuration (the Measures, art. 16)."""

    # Whether clean cases are approved without a reviewer.
    review_auto_approve: bool = False
    # A clean case has had at most this many rejections for the same loss (0: a first
    # application with no earlier rejection).
    review_auto_approve_max_rejections: int = Field(default=0, ge=0)
    # Pickup bureaus whose applications may be approved automatically; empty means all.
    # From the environment as JSON: CARDDESK_REVIEW_AUTO_APPROVE_BUREAUS='["bureau-1"]'.
    review_auto_approve_bureaus: frozenset[str] = frozenset()
    # The reviewer id recorded on automatic decisions.
    review_auto_reviewer_id: str = Field(default="auto-rule", min_length=1, max_length=64)

    def auto_approval_rule(self) -> AutoApprovalRule:
        return AutoApprovalRule(
            enabled=self.review_auto_approve,
            max_rejections=self.review_auto_approve_max_rejections,
            bureaus=self.review_auto_approve_bureaus,
            reviewer_id=self.review_auto_reviewer_id,
        )
