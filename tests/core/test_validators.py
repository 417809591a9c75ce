"""The named checks of ``common.validators``: a bool is never an integer nor a number, the
field's name travels as data, and each caller raises its own error class."""

from __future__ import annotations

import math
from typing import Any

import pytest

from common.validators import FieldError, check_finite_number, check_int, is_int, is_number
from jobs.bundle import BundleError
from jobs.numbers import NumberRejected, check_int_range


@pytest.mark.parametrize(
    ("value", "integer", "number"),
    [(3, True, True), (-1, True, True), (2.5, False, True), (math.inf, False, True)]
    + [(True, False, False), (False, False, False), ("3", False, False), (None, False, False)],
)
def test_a_bool_is_neither_an_integer_nor_a_number(value: Any, integer: bool, number: bool) -> None:
    assert is_int(value) is integer
    assert is_number(value) is number


@pytest.mark.parametrize(
    ("value", "low", "high", "reason"),
    [
        (True, 0, 9, "must be an integer, got True"),
        (1.0, 0, 9, "must be an integer, got 1.0"),
        (10, 0, 9, "must be between 0 and 9, got 10"),
        (-1, 0, None, "must be at least 0, got -1"),
        (10, None, 9, "must be at most 9, got 10"),
    ],
)
def test_check_int_names_the_field_and_the_reason(
    value: Any, low: int | None, high: int | None, reason: str
) -> None:
    with pytest.raises(FieldError) as info:
        check_int("rounds", value, low=low, high=high)

    assert (info.value.field, info.value.reason) == ("rounds", reason)
    assert str(info.value) == f"rounds: {reason}"


def test_a_good_value_comes_back() -> None:
    assert check_int("rounds", 0, low=0, high=9) == 0
    assert check_int("rounds", 10**30) == 10**30
    assert check_finite_number("loss", 3) == 3.0


@pytest.mark.parametrize("value", [math.nan, -math.inf, 10**400, False, "1"])
def test_check_finite_number_refuses_what_is_no_finite_number(value: Any) -> None:
    with pytest.raises(FieldError, match="^loss: must be a"):
        check_finite_number("loss", value)


@pytest.mark.parametrize("error", [BundleError, NumberRejected])
def test_the_caller_chooses_the_error_class(error: type[FieldError]) -> None:
    with pytest.raises(error) as info:
        check_int("min_clients", True, low=1, error=error)

    assert info.value.field == "min_clients"
    assert isinstance(info.value, ValueError)  # every FieldError still is one


def test_a_site_number_past_its_range_is_a_number_rejected() -> None:
    with pytest.raises(NumberRejected) as info:
        check_int_range("points[0].round", 2**31, low=0, high=2**31 - 1)

    assert info.value.field == "points[0].round"
    assert info.value.reason == f"must be between 0 and {2**31 - 1}, got {2**31}"
