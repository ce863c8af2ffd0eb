"""structlog JSON logging with per-message context and masking of personal data."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog

from shared.masking import mask_id_number, mask_name, mask_text

# Keys whose values are personal data wherever they appear in a log call.
_MASKERS = {
    "id_number": mask_id_number,
    "presented_id_number": mask_id_number,
    "name": mask_name,
}
_REDACTED = {"address", "phone", "photo_ref", "face_embedding", "captcha_code",
             "session_token", "secret", "captcha"}


def _mask_value(key: str, value: Any) -> Any:
    if key in _REDACTED:
        return "[redacted]"
    if key in _MASKERS and isinstance(value, str):
        return _MASKERS[key](value)
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, Mapping):
        return {k: _mask_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask_value(key, v) for v in value]
    return value


def mask_personal_data(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: no raw ID number, name, phone or address reaches a log line."""
    for key, value in list(event_dict.items()):
        event_dict[key] = _mask_value(key, value)
    return event_dict


def configure_logging(service: str, level: str = "INFO") -> None:
    logging.basicConfig(format="%(message)s", stream=sys.stdout, level=level)
    for noisy in ("aiokafka", "kafka", "faststream"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            mask_personal_data,
            structlog.processors.JSONRenderer(ensure_ascii=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        # No stream argument: print to whatever sys.stdout is at call time, so a stream
        # replaced or closed after configuration (test capture, daemonising) is never pinned.
        logger_factory=structlog.PrintLoggerFactory(),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service)


def bind_message_context(**values: Any) -> None:
    """Bind per-message context; the previous message's keys are dropped first."""
    service = structlog.contextvars.get_contextvars().get("service")
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service, **values)
