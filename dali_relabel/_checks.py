"""Argument checks: one ValueError per bad argument, naming it, what was expected and what
came; every public entry point checks its arguments with these before any work starts."""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

__all__ = ["check_bool", "check_box", "check_choice", "check_float", "check_int",
           "check_int_pair", "check_path_arg", "check_probability", "check_range", "check_rgb"]


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_))


def check_bool(name: str, value: Any) -> bool:
    """`value` if it is a bool (True/False), else a ValueError naming `name`."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_int(name: str, value: Any, low: Optional[int] = None,
              high: Optional[int] = None) -> int:
    """`value` as an int in [low, high] (either bound optional), else a ValueError naming
    `name` and the bounds."""
    if not _is_int(value) or (low is not None and value < low) or (
            high is not None and value > high):
        if low is not None and high is not None:
            expected = f"an int in [{low}, {high}]"
        elif low is not None:
            expected = f"an int >= {low}"
        elif high is not None:
            expected = f"an int <= {high}"
        else:
            expected = "an int"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(value)


def check_float(name: str, value: Any, low: float = -math.inf, high: float = math.inf, *,
                low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a finite float in the range (closed unless `low_open`/`high_open`), else a
    ValueError naming `name`. NaN and infinities are refused."""
    ok = _is_real(value) and math.isfinite(float(value))
    if ok:
        value = float(value)
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high)
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        if math.isinf(low) and math.isinf(high):
            expected = "a finite float"
        elif math.isinf(high):
            expected = f"a finite float {'>' if low_open else '>='} {low:g}"
        elif math.isinf(low):
            expected = f"a finite float {'<' if high_open else '<='} {high:g}"
        else:
            expected = f"a float in {left}{low:g}, {high:g}{right}"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def check_probability(name: str, value: Any) -> float:
    """`value` as a float in [0, 1], else a ValueError naming `name`."""
    return check_float(name, value, 0.0, 1.0)


def check_range(name: str, value: Any, low: float,
                high: float = math.inf) -> tuple[float, float]:
    """A (min, max) pair of finite floats with low < min <= max <= high, else a ValueError
    naming `name`."""
    if (isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray))
            or len(value) != 2 or not all(_is_real(v) and math.isfinite(float(v))
                                         for v in value)
            or not low < float(value[0]) <= float(value[1]) <= high):
        bound = "" if math.isinf(high) else f" <= {high:g}"
        raise ValueError(f"{name} must be (min, max) with {low:g} < min <= max{bound}, "
                         f"finite, got {value!r}")
    return float(value[0]), float(value[1])


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """`value` if it is one of `choices`, else a ValueError naming `name` and them."""
    if isinstance(value, (list, dict, set)) or value not in tuple(choices):
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_rgb(name: str, value: Any) -> tuple[float, float, float]:
    """Three finite floats (R, G, B), else a ValueError naming `name`."""
    if (isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray))
            or len(value) != 3 or not all(_is_real(v) and math.isfinite(float(v))
                                         for v in value)):
        raise ValueError(f"{name} must be 3 finite floats (R, G, B), got {value!r}")
    return tuple(float(v) for v in value)


def check_path_arg(name: str, value: Any, *, kind: str = "file") -> str:
    """`value` as a path string (str or os.PathLike, not empty), else a ValueError naming
    `name`; whether the path exists is for the caller to check."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a {kind} path (str or os.PathLike), got {value!r}")
    return value


def check_box(name: str, value: Any) -> tuple[float, float, float, float]:
    """A crop box (x1, y1, x2, y2), normalized: four finite floats with 0 <= x1 < x2 <= 1
    and 0 <= y1 < y2 <= 1, else a ValueError naming `name`."""
    if (isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray))
            or len(value) != 4 or not all(_is_real(v) and math.isfinite(float(v))
                                         for v in value)
            or not (0.0 <= float(value[0]) < float(value[2]) <= 1.0
                    and 0.0 <= float(value[1]) < float(value[3]) <= 1.0)):
        shown = list(value) if isinstance(value, (Sequence, np.ndarray)) and not isinstance(
            value, (str, bytes)) else value
        raise ValueError(f"{name} must be (x1, y1, x2, y2) with 0 <= x1 < x2 <= 1 and "
                         f"0 <= y1 < y2 <= 1, got {shown!r}")
    return tuple(float(v) for v in value)


def check_int_pair(name: str, value: Any, low: int, high: Optional[int] = None) -> tuple[int, int]:
    """A (min, max) pair of ints with low <= min <= max (<= high when given), else a
    ValueError naming `name`."""
    if (isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray))
            or len(value) != 2 or not all(_is_int(v) for v in value)
            or not low <= value[0] <= value[1] or (high is not None and value[1] > high)):
        bound = "" if high is None else f" <= {high}"
        raise ValueError(f"{name} must be (min, max) ints with {low} <= min <= max{bound}, "
                         f"got {value!r}")
    return int(value[0]), int(value[1])
