"""Masked display of personal data: ID numbers as 6 + ******** + 4, names as 1 + *."""

from __future__ import annotations

import re

ID_NUMBER_PATTERN = re.compile(r"(?<![0-9A-Za-z])(\d{6})\d{8}(\d{3}[\dXx])(?![0-9A-Za-z])")
PHONE_PATTERN = re.compile(r"(?<!\d)(1\d{2})\d{4}(\d{4})(?!\d)")


def mask_id_number(id_number: str) -> str:
    if len(id_number) < 10:
        return "*" * len(id_number)
    return f"{id_number[:6]}********{id_number[-4:]}"


def mask_name(name: str) -> str:
    return f"{name[:1]}*" if name else ""


def mask_card_no(card_no: str) -> str:
    if len(card_no) <= 4:
        return "*" * len(card_no)
    return f"{'*' * (len(card_no) - 4)}{card_no[-4:]}"


def mask_text(text: str) -> str:
    """Mask anything in free text that looks like an ID number or a mobile number."""
    text = ID_NUMBER_PATTERN.sub(lambda m: f"{m.group(1)}********{m.group(2)[-4:]}", text)
    return PHONE_PATTERN.sub(lambda m: f"{m.group(1)}****{m.group(2)}", text)
