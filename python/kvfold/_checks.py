"""Argument checks shared by the library: one place for the wording of a bad-argument error."""

from __future__ import annotations

import numbers
from typing import Any, Optional


def integer(name: str, value: Any, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """``value`` as an int. TypeError unless it is an integer (a bool is not one); ValueError if it is
    below ``minimum`` or above ``maximum``. Both messages name the argument, what it expects and what it got."""
    if maximum is not None:
        expected = f"an integer in [{minimum}, {maximum}]"
    else:
        expected = "an integer" if minimum is None else f"an integer >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected {expected}, got {type(value).__name__} {value!r}")
    number = int(value)
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise ValueError(f"{name}: expected {expected}, got {value}")
    return number
