"""Langevin corrector (Song et al. 2021, Algorithm 5, VP): predictor-corrector sampling.

After a predictor step lands on level i, M corrector steps at that level:
    g   = score(x, t_i) = (alpha D - x) / sigma^2           (x in VP units, x_t)
    eps = 2 alpha_i (r ||z|| / ||g||)^2                       r: target signal-to-noise ratio
    x  <- x + eps g + sqrt(2 eps) z                            alpha_i = 1 - beta_i
The step size needs per-sample norms, so it is not affine: backends run it as a small
extra torch pass (device reductions, no host sync), between fused steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..checks import check_number
from ..schedules import Schedule
from .table import StepTable


@dataclass(frozen=True)
class Corrector:
    """The corrector's settings: sub-steps after each step, and the target signal-to-noise ratio."""

    steps: int
    snr: float

    def __post_init__(self):
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"corrector_steps must be a positive integer, got {self.steps!r}")
        check_number("snr", self.snr, 0, math.inf, hi_open=True)


def attach(table: StepTable, schedule: Schedule, corrector: Corrector) -> StepTable:
    """The table with `corrector.steps` sub-steps after every step that lands on a noisy level."""
    steps = corrector.steps
    R = table.rows
    ends = table.ends_step if table.ends_step is not None else torch.ones(R, dtype=torch.bool)
    count = torch.zeros(R, dtype=torch.int64)
    alpha_i = torch.ones(R, dtype=torch.float64)
    for r in range(R - 1):
        if bool(ends[r]):
            count[r] = steps
            t = float(table.t_model[r + 1])
            abar_t = schedule.alphas_cumprod_at(torch.tensor(t))
            abar_before = schedule.alphas_cumprod_at(torch.tensor(max(t - 1.0, 0.0))) if t >= 1 else torch.tensor(1.0)
            alpha_i[r] = float(abar_t / abar_before)
    return table.with_(corrector_steps=count, corrector_snr=float(corrector.snr), corrector_alpha=alpha_i)


def step_size(z: torch.Tensor, score: torch.Tensor, snr: float, alpha_i: float) -> torch.Tensor:
    """Per-sample eps [B, 1, ...] = 2 alpha_i (snr ||z|| / ||g||)^2."""
    dims = tuple(range(1, z.ndim))
    z_norm = torch.linalg.vector_norm(z, dim=dims, keepdim=True)
    g_norm = torch.linalg.vector_norm(score, dim=dims, keepdim=True)
    return 2 * alpha_i * (snr * z_norm / g_norm) ** 2


def update(point: torch.Tensor, D: torch.Tensor, z: torch.Tensor, alpha: float, sigma: float, snr: float,
           alpha_i: float, to_vp: float = 1.0) -> torch.Tensor:
    """One corrector step of Algorithm 5 on a batch; `point` is in the table's units, its VP
    value to_vp * point (to_vp = alpha in VE space, 1 in VP). Returns the new point."""
    x_vp = to_vp * point
    score = (alpha * D - x_vp) / (sigma * sigma)
    eps = step_size(z, score, snr, alpha_i)
    return (x_vp + eps * score + (2 * eps).sqrt() * z) / to_vp


def reference_step(x_t, D, z, alpha, sigma, snr, alpha_i):
    """Textbook Algorithm 5, one corrector step on one sample (VP units)."""
    g = (alpha * D - x_t) / sigma**2
    eps = 2 * alpha_i * (snr * z.norm() / g.norm()) ** 2
    return x_t + eps * g + (2 * eps) ** 0.5 * z
