"""Class-conditional model inputs for a guidance scale, one meaning everywhere (`fastdiff
sample` in grid and bulk mode, `fastdiff eval`, `fastdiff.bulk.generate`):

    w = 0   the unconditional model: the null class alone, one model call per step
    w = 1   the conditional model alone, one model call per step
    else    classifier-free guidance u + w (c - u) (Ho & Salimans 2022), two calls per step

w = 0 and w = 1 are the guidance formula's own end points, taken without the half of the
batch whose weight is zero.
"""
from __future__ import annotations

import math

import torch


def class_conditioning(labels: torch.Tensor, null_class: int | None, guidance_scale: float | None,
                       key: str = "class_labels") -> tuple[dict, dict | None, float | None]:
    """(cond, uncond, guidance_scale) for Sampler.sample from class labels [B] and a scale w
    (None: the conditional model alone, as w = 1)."""
    w = 1.0 if guidance_scale is None else guidance_scale
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    if w == 1.0:
        return {key: labels}, None, None
    if null_class is None:
        raise ValueError(f"guidance_scale={w:g} needs the model's null class (null_class); "
                         "only 1 (the conditional model alone) works without it")
    null = torch.full_like(labels, null_class)
    if w == 0.0:
        return {key: null}, None, None
    return {key: labels}, {key: null}, float(w)


def model_calls_per_step(guidance_scale: float | None) -> int:
    """Batch multiplier of class_conditioning: 2 under guidance, 1 at w = 0 or 1."""
    return 1 if guidance_scale is None or guidance_scale in (0.0, 1.0) else 2
