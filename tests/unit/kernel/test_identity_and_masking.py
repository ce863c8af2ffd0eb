"""ID number checksum (GB 11643-1999), citizen_ref and masked displays."""

from __future__ import annotations

import json

import pytest
import structlog

from shared.identity import (
    check_char,
    citizen_ref,
    is_valid_id_number,
    name_digest,
    normalise_id_number,
    normalise_name,
)
from shared.logging import configure_logging
from shared.masking import mask_card_no, mask_id_number, mask_name, mask_text

VALID = "11010519491231002X"


def test_the_standard_example_id_number_passes_the_checksum() -> None:
    assert is_valid_id_number(VALID)
    assert is_valid_id_number(VALID.lower())


@pytest.mark.parametrize(
    "bad", ["110105194912310021", "11010519491231002", "1101051949123100XX", ""])
def test_a_wrong_check_character_or_shape_fails(bad: str) -> None:
    assert not is_valid_id_number(bad)


def test_check_char_computes_the_iso_7064_mod_11_2_character() -> None:
    assert check_char(VALID[:17]) == "X"


def test_citizen_ref_is_keyed_and_case_insensitive_on_x() -> None:
    assert citizen_ref("p", VALID) == citizen_ref("p", VALID.lower())
    assert citizen_ref("p", VALID) != citizen_ref("q", VALID)
    assert VALID not in citizen_ref("p", VALID)


def test_displays_mask_id_numbers_names_and_card_numbers() -> None:
    assert mask_id_number(VALID) == "110105********002X"
    assert mask_name("张三丰") == "张*"
    assert mask_card_no("CD0000001234") == "********1234"
    assert mask_text(f"id {VALID} phone 13812345678") == "id 110105********002X phone 138****5678"


def test_log_lines_never_carry_a_raw_id_number_name_or_address(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("test")
    structlog.get_logger().info("probe", id_number=VALID, name="张三丰", address="1 Road",
                                note=f"contains {VALID}")
    line = capsys.readouterr().out.strip().splitlines()[-1]
    record = json.loads(line)
    assert VALID not in line and "张三丰" not in line and "1 Road" not in line
    assert record["id_number"] == "110105********002X"
    assert record["name"] == "张*"
    assert record["service"] == "test"


# --- normal forms: ASCII ID numbers, NFC names --------------------------------------------

FULL_WIDTH = VALID.translate(str.maketrans("0123456789X", "０１２３４５６７８９Ｘ"))


@pytest.mark.parametrize("hostile", [
    FULL_WIDTH,  # full-width digits and X: a Unicode-aware checksum accepts them
    VALID[:17].translate(str.maketrans("0123456789", "０１２３４５６７８９")) + "X",
    "١١٠١٠٥١٩٤٩١٢٣١٠٠٢X",  # Arabic-Indic digits
    "\u3000" + VALID,  # an ideographic space is not a blank we strip
    VALID + "\n1",
])
def test_an_id_number_of_non_ascii_digits_fails_even_when_its_checksum_holds(
    hostile: str,
) -> None:
    assert not is_valid_id_number(hostile)


def test_the_full_width_form_would_have_hashed_to_another_citizen() -> None:
    # Why the shape check matters: the two spellings would name two citizens.
    assert citizen_ref("p", FULL_WIDTH) != citizen_ref("p", VALID)


def test_blanks_around_an_id_number_and_a_lower_case_x_still_pass() -> None:
    assert is_valid_id_number(f" {VALID.lower()}\t")
    assert normalise_id_number(f" {VALID.lower()}\t") == VALID


def test_a_decomposed_name_normalises_and_hashes_like_its_composed_form() -> None:
    composed, decomposed = "Zoë Lü", "Zoe\u0308 Lu\u0308"
    assert composed != decomposed
    assert normalise_name(decomposed) == composed
    assert name_digest("p", decomposed) == name_digest("p", composed)
    assert name_digest("p", " 张三 ") == name_digest("p", "张三")
    assert name_digest("p", "Zoe Lu") != name_digest("p", composed)
