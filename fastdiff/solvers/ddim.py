"""DDIM (Song et al. 2021, eq. 12): a non-Markovian step with stochasticity eta.

    eps   = (x_t - sqrt(abar_t) x0_raw) / sqrt(1 - abar_t)
    std   = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)
    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - std^2) eps + std z
x0 may be clipped/thresholded while eps keeps the raw model output, as in diffusers
(use_clipped_model_output=False): the row then reads both D and D_raw. With
use_clipped_model_output=True eps is re-derived from the clipped x0, so the step stays on
the line through x_t and the clipped x0 (the consistent choice when clipping is strong).
"""
from __future__ import annotations

import math

from ..grids import Grid
from .base import TableBuilder, vec


def coefficients(abar_t: float, abar_prev: float, eta: float) -> tuple[float, float, float]:
    """(std, direction coefficient sqrt(1 - abar_prev - std^2), sqrt(abar_prev))."""
    std = eta * math.sqrt((1 - abar_prev) / (1 - abar_t)) * math.sqrt(1 - abar_t / abar_prev)
    rem = 1 - abar_prev - std * std
    if rem < -1e-12:
        raise ValueError(f"eta={eta} is too large for this grid: 1 - abar_prev - std^2 < 0; use 0 <= eta <= 1")
    return std, math.sqrt(max(rem, 0.0)), math.sqrt(abar_prev)


def build(grid: Grid, prediction: str, *, eta: float = 0.0,
          use_clipped_model_output: bool = False) -> TableBuilder:
    tb = TableBuilder("ddim", "vp", prediction, process=grid.process)
    for i in range(grid.steps):
        t, a_t, a_prev = float(grid.t[i]), float(grid.abar[i]), float(grid.abar_to[i])
        std, direction, root_prev = coefficients(a_t, a_prev, eta)
        alpha_t, sigma_t = math.sqrt(a_t), math.sqrt(1 - a_t)
        # eps = (x - alpha_t D_raw) / sigma_t, folded into the x and D_raw (or D) columns
        eps_x0 = -direction * alpha_t / sigma_t
        if use_clipped_model_output:
            row = vec(x=direction / sigma_t, D=root_prev + eps_x0, z=std if eta > 0 else 0.0)
        else:
            row = vec(x=direction / sigma_t, D=root_prev, D_raw=eps_x0, z=std if eta > 0 else 0.0)
        tb.add(t, a_t, row)
    return tb


def reference_step(x_t, x0, eps, z, abar_t, abar_prev, eta):
    """Textbook eq. 12: predicted x0, direction pointing to x_t, random noise."""
    sigma = eta * ((1 - abar_prev) / (1 - abar_t)) ** 0.5 * (1 - abar_t / abar_prev) ** 0.5
    return abar_prev**0.5 * x0 + (1 - abar_prev - sigma**2) ** 0.5 * eps + sigma * z
