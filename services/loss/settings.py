"""Configuration of the loss service (`CARDDESK_LOSS_*`): the region's loss rules."""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field

from shared.settings import CardDeskSettings


class LossSettings(CardDeskSettings):
    """Durations are per-region configuration (the Measures, art. 16), never literals."""

    # A temporary loss lifts itself after this period (seconds or ISO 8601 duration).
    loss_temporary_period: timedelta = Field(default=timedelta(days=15), gt=timedelta(0))
    # A formal loss needs a portrait verification no older than this.
    loss_portrait_max_age: timedelta = Field(default=timedelta(seconds=600), gt=timedelta(0))
    # How often the durable expiry timers are scanned.
    loss_expiry_scan_interval: timedelta = Field(default=timedelta(seconds=1), gt=timedelta(0))
    # How many due timers one scan handles before looking again.
    loss_expiry_batch_size: int = Field(default=100, ge=1)
    # Whether a loss freezes the card's financial (bank) function.
    loss_financial_freeze: bool = True
