"""Linear multistep on the probability-flow ODE in VE sigma space (k-diffusion's sample_lms,
diffusers' LMSDiscreteScheduler), order up to 4.

    d_i = (x_i - D_i) / s_i                                   the ODE's derivative dx/ds
    x_{i+1} = x_i + sum_j c_{i,j} d_{i-j},  j < min(i + 1, order)
    c_{i,j} = integral from s_i to s_{i+1} of prod_{k != j} (s - s_{i-k}) / (s_{i-j} - s_{i-k}) ds
(the Lagrange basis through the last sigmas, integrated exactly: it is a polynomial). The
history holds past derivatives: each row pushes (x - D) / s, an affine combination of its vector.
"""
from __future__ import annotations

import numpy as np
from numpy.polynomial import polynomial as P

from ..grids import Grid
from .base import TableBuilder, vec
from .euler import init_noise_sigma, ode_space, sigma_rows

HISTORY = ("H0", "H1", "H2")


def coefficient(sigmas: list[float], i: int, order: int, j: int) -> float:
    """c_{i,j}: the j-th Lagrange basis polynomial through sigmas[i], ..., sigmas[i-order+1],
    integrated from sigmas[i] to sigmas[i+1]."""
    poly = np.array([1.0])
    for k in range(order):
        if k != j:
            poly = P.polymul(poly, np.array([-sigmas[i - k], 1.0]) / (sigmas[i - j] - sigmas[i - k]))
    antiderivative = P.polyint(poly)
    return float(P.polyval(sigmas[i + 1], antiderivative) - P.polyval(sigmas[i], antiderivative))


def build(grid: Grid, prediction: str, *, solver_order: int = 4, spacing: str = "trailing") -> TableBuilder:
    if solver_order not in (1, 2, 3, 4):
        raise ValueError(f"solver_order must be 1, 2, 3 or 4 for lms, got {solver_order}")
    rows = sigma_rows(grid, "lms")
    tb = TableBuilder("lms", ode_space(grid), prediction, init_noise_sigma=init_noise_sigma(rows[0][2], spacing),
                      history_len=solver_order - 1 if solver_order > 1 else 0, process=grid.process)
    sigmas = [r[2] for r in rows] + [rows[-1][3]]
    for i, (t, abar, s, _) in enumerate(rows):
        order = min(i + 1, solver_order)
        c = [coefficient(sigmas, i, order, j) for j in range(order)]
        # x + c_0 (x - D) / s + sum_j c_j H_{j-1}
        state = vec(x=1 + c[0] / s, D=-c[0] / s, **{HISTORY[j - 1]: c[j] for j in range(1, order)})
        tb.add(t, abar, state, push=vec(x=1 / s, D=-1 / s) if solver_order > 1 else False)
    return tb
