"""Per-sample seeds: the key that makes a sample independent of its batch, device and rank."""
from __future__ import annotations

import operator
import re

import numpy as np
import torch

MAX_SEED = 2**63 - 1


def as_seeds(seeds, batch: int | None = None, device=None, *, host_check: bool = True) -> torch.Tensor:
    """Seeds as an int64 tensor [B] of integers in [0, MAX_SEED]; checks type, count and range.

    `seeds`: an int, a sequence of ints (numpy and 0-d integer tensors included) or an integer
    tensor. Python values are checked as they are read. A tensor's values are checked where
    that is free (on the CPU) or asked for: host_check=True reads a GPU tensor back (a sync);
    the noise inside a captured loop passes False, its seeds having been checked on entry.
    A float or bool is an error: a seed is never rounded.
    """
    if isinstance(seeds, torch.Tensor) and seeds.ndim > 0:
        if seeds.dtype.is_floating_point or seeds.dtype.is_complex or seeds.dtype == torch.bool:
            raise ValueError(f"seeds must be integers in [0, 2**63), got a {seeds.dtype} tensor")
        t = seeds.reshape(-1).to(device=device, dtype=torch.int64)
        if (host_check or t.device.type == "cpu") and t.numel() and bool((t < 0).any()):
            raise ValueError(f"seeds must be integers in [0, 2**63), got {int(t[t < 0][0])}")
    else:
        one = isinstance(seeds, (torch.Tensor, np.ndarray)) and seeds.ndim == 0 or not hasattr(seeds, "__iter__")
        values = []
        for v in ([seeds] if one else seeds):
            try:
                if isinstance(v, (bool, np.bool_)) or (isinstance(v, torch.Tensor) and v.dtype == torch.bool):
                    raise TypeError
                value = operator.index(v)  # ints, numpy integers, integer 0-d tensors; never a float
            except TypeError:
                raise ValueError(f"seeds must be integers in [0, 2**63), got {v!r}") from None
            if not 0 <= value <= MAX_SEED:
                raise ValueError(f"seeds must be integers in [0, 2**63), got {value}")
            values.append(value)
        t = torch.tensor(values, dtype=torch.int64, device=device)
    if batch is not None and t.numel() != batch:
        raise ValueError(f"len(seeds) must equal the batch size {batch}, got {t.numel()}")
    return t


def parse_seed_range(text: str) -> list[int]:
    """'0-9,20,30-31' -> [0..9, 20, 30, 31] (inclusive ranges, as EDM's generate.py)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("seeds: empty seed range; expected e.g. '0-49999' or '1,5,9-12'")
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"seeds: malformed part {part!r} in {text!r}; expected N or A-B with A <= B")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"seeds: empty range {part!r} (A-B needs A <= B)")
        if hi > MAX_SEED:
            raise ValueError(f"seeds: {hi} exceeds the largest seed {MAX_SEED}")
        seeds.extend(range(lo, hi + 1))
    return seeds
