"""DDPM ancestral sampling (Ho et al. 2020): sample the posterior q(x_{t-1} | x_t, x_0).

    q(x_prev | x_t, x0) = N(mean, var),  beta = 1 - abar_t / abar_prev
    mean = sqrt(abar_prev) beta / (1 - abar_t) * x0 + sqrt(1 - beta) (1 - abar_prev) / (1 - abar_t) * x_t
    var  = fixed_small: (1 - abar_prev) / (1 - abar_t) * beta     fixed_large: beta
As diffusers does, no noise is added at t = 0.
"""
from __future__ import annotations

import math

from ..grids import Grid
from .base import TableBuilder, vec

VARIANCES = ("fixed_small", "fixed_large")


def posterior(abar_t: float, abar_prev: float, variance: str) -> tuple[float, float, float]:
    """(x0 coefficient, x_t coefficient, std) of q(x_prev | x_t, x0)."""
    beta = 1.0 - abar_t / abar_prev
    coef_x0 = math.sqrt(abar_prev) * beta / (1.0 - abar_t)
    coef_xt = math.sqrt(1.0 - beta) * (1.0 - abar_prev) / (1.0 - abar_t)
    if variance == "fixed_small":
        var = max((1.0 - abar_prev) / (1.0 - abar_t) * beta, 1e-20)
    elif variance == "fixed_large":
        var = beta
    else:
        raise ValueError(f"unknown variance {variance!r}; allowed: {', '.join(VARIANCES)}")
    return coef_x0, coef_xt, math.sqrt(var)


def build(grid: Grid, prediction: str, *, variance: str = "fixed_small") -> TableBuilder:
    tb = TableBuilder("ddpm", "vp", prediction, process=grid.process)
    for i in range(grid.steps):
        t, a_t, a_prev = float(grid.t[i]), float(grid.abar[i]), float(grid.abar_to[i])
        cx0, cxt, std = posterior(a_t, a_prev, variance)
        tb.add(t, a_t, vec(x=cxt, D=cx0, z=std if t > 0 else 0.0))
    return tb


def reference_step(x_t, x0, z, abar_t, abar_prev, variance="fixed_small", add_noise=True):
    """Textbook: the posterior mean (eq. 7 of Ho et al.) plus its standard deviation times z."""
    beta_t = 1 - abar_t / abar_prev
    alpha_t = 1 - beta_t
    mean = (abar_prev**0.5 * beta_t / (1 - abar_t)) * x0 + (alpha_t**0.5 * (1 - abar_prev) / (1 - abar_t)) * x_t
    tilde_beta = (1 - abar_prev) / (1 - abar_t) * beta_t
    var = max(tilde_beta, 1e-20) if variance == "fixed_small" else beta_t
    return mean + (var**0.5) * z if add_noise else mean

