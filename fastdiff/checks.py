"""Argument checks shared by the public entry points: each raises a ValueError naming the parameter."""
from __future__ import annotations

import math
import numbers

import torch


def is_number(value) -> bool:
    """A real Python or NumPy number: not a bool, a string or a tensor."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_number(name: str, value, lo: float, hi: float, *, lo_open: bool = True, hi_open: bool = False) -> None:
    """value must be a number in the interval lo..hi (open or closed at each end); NaN never is."""
    if is_number(value) and not math.isnan(value):
        if (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi):
            return
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    raise ValueError(f"{name} must be a number in {interval}, got {value!r}")


def check_finite_tensor(name: str, x) -> None:
    """A user's input tensor: floating point and finite (one host read: call it at an entry point,
    never inside the sampling loop)."""
    if not torch.is_tensor(x):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} holds non-finite values (NaN or inf)")


def as_float64(name: str, values) -> torch.Tensor:
    """A number, sequence or tensor of real numbers as a flat float64 copy; anything else names `name`."""
    bad = isinstance(values, (str, bytes)) or (
        torch.is_tensor(values) and (values.is_complex() or values.dtype == torch.bool))
    try:
        if not bad:
            return torch.as_tensor(values, dtype=torch.float64).flatten().clone()
    except (TypeError, ValueError, RuntimeError):
        pass
    raise ValueError(f"{name} must be a sequence or tensor of real numbers, got {values!r:.60}")
