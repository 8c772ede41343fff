"""units.py: byte counts read the same everywhere (``ckptguard ls``, error messages, doctor)."""

from __future__ import annotations

import math

import pytest

from ckptguard.units import format_bytes


@pytest.mark.parametrize(
    ("n", "shown"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (1 << 20, "1.0 MiB"),
        (int(3.2 * (1 << 20)), "3.2 MiB"),
        (1 << 30, "1.00 GiB"),
        (int(1.25 * (1 << 30)), "1.25 GiB"),
        (2 << 40, "2.00 TiB"),
        (5 << 50, "5.00 PiB"),
        (1 << 60, "1.00 EiB"),
    ],
)
def test_each_unit_has_its_own_precision(n: int, shown: str) -> None:
    assert format_bytes(n) == shown


def test_a_size_past_every_unit_stays_in_eib_instead_of_failing() -> None:
    assert format_bytes(3 << 70) == "3072.00 EiB"  # an absurd estimate is shown, never an IndexError


@pytest.mark.parametrize(("n", "shown"), [(math.inf, "inf B"), (math.nan, "nan B"), (-1.0, "-1 B")])
def test_non_finite_and_negative_counts_are_shown_as_bytes_not_divided(n: float, shown: str) -> None:
    assert format_bytes(n) == shown


def test_fractional_bytes_are_rounded_to_whole_bytes() -> None:
    assert format_bytes(511.4) == "511 B"
