"""Per-sample seeds: the key that makes a sample independent of its batch, device and rank."""
from __future__ import annotations

import re

import torch

MAX_SEED = 2**63 - 1


def as_seeds(seeds, batch: int | None = None, device=None) -> torch.Tensor:
    """Seeds as an int64 tensor [B]; checks count and range."""
    if isinstance(seeds, int):
        seeds = [seeds]
    t = torch.as_tensor(seeds, dtype=torch.int64, device=device).reshape(-1)
    if batch is not None and t.numel() != batch:
        raise ValueError(f"len(seeds) must equal the batch size {batch}, got {t.numel()}")
    if t.numel() and bool((t < 0).any()):
        raise ValueError("seeds must be non-negative integers")
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
