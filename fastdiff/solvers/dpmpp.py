"""DPM-Solver++ (Lu et al. 2022), data prediction, in VP space.

h = lambda_t - lambda_s,  lambda = log(alpha / sigma).
    first order (= DDIM):  x_t = (sigma_t / sigma_s) x - alpha_t (e^{-h} - 1) D
    2M (Alg. 2):           r = h_prev / h,  D' = (1 + 1/(2r)) D - 1/(2r) D_prev,
                           x_t = (sigma_t / sigma_s) x - alpha_t (e^{-h} - 1) D'
    2M SDE (Lu et al. 2022b, sec. 4 / diffusers sde-dpmsolver++, midpoint):
                           x_t = (sigma_t / sigma_s) e^{-h} x + alpha_t (1 - e^{-2h}) D'
                                 + sigma_t sqrt(1 - e^{-2h}) z
The first step is first order; so is the last when lower_order_final (or when it lands
on sigma = 0, where the second-order correction is undefined).
"""
from __future__ import annotations

import math

from ..grids import Grid
from .base import TableBuilder, vec, vp_levels


def final_step_first_order(steps: int, lower_order_final: bool) -> bool:
    """diffusers' DPM-Solver++ rule: with lower_order_final, a grid of fewer than 15 steps
    takes its last step at first order (more stable at few steps)."""
    return lower_order_final and steps < 15


def _orders(grid: Grid, order: int, lower_order_final: bool) -> list[int]:
    N = grid.steps
    orders = []
    for i in range(N):
        o = min(order, i + 1)
        last = i == N - 1
        if last and (float(grid.abar_to[i]) >= 1.0 or final_step_first_order(N, lower_order_final)):
            o = 1
        orders.append(o)
    return orders


def _build(name: str, grid: Grid, prediction: str, sde: bool, solver_order: int, lower_order_final: bool):
    if solver_order not in (1, 2):
        raise ValueError(f"solver_order must be 1 or 2 for {name}, got {solver_order}")
    tb = TableBuilder(name, "vp", prediction, history_len=1, process=grid.process)
    orders = _orders(grid, solver_order, lower_order_final)
    lam_prev = None
    for i in range(grid.steps):
        t, a_s, a_t = float(grid.t[i]), float(grid.abar[i]), float(grid.abar_to[i])
        alpha_s, sigma_s, lam_s = vp_levels(a_s)
        alpha_t, sigma_t, lam_t = vp_levels(a_t)
        h = lam_t - lam_s
        e1 = math.exp(-h)  # 0 when landing on sigma = 0
        if sde:
            x_coef, d_coef, z = sigma_t / sigma_s * e1, alpha_t * (1 - e1 * e1), sigma_t * math.sqrt(1 - e1 * e1)
        else:
            x_coef, d_coef, z = sigma_t / sigma_s, -alpha_t * (e1 - 1), 0.0
        if h == 0:  # a zero-length step (karras grid ending at sigma_min): the identity
            row = vec(x=1)
        elif orders[i] == 1 or lam_s == lam_prev:
            row = vec(x=x_coef, D=d_coef, z=z)
        else:
            r = (lam_s - lam_prev) / h
            row = vec(x=x_coef, D=d_coef * (1 + 0.5 / r), H0=-d_coef * 0.5 / r, z=z)
        tb.add(t, a_s, row, push=True)
        lam_prev = lam_s
    return tb


def build_2m(grid: Grid, prediction: str, *, solver_order: int = 2, lower_order_final: bool = True):
    return _build("dpmpp_2m", grid, prediction, False, solver_order, lower_order_final)


def build_2m_sde(grid: Grid, prediction: str, *, solver_order: int = 2, lower_order_final: bool = True):
    return _build("dpmpp_2m_sde", grid, prediction, True, solver_order, lower_order_final)


def reference_2m(x, D, D_prev, alpha_s, sigma_s, alpha_t, sigma_t, lam_prev=None):
    """Lu et al. 2022, Algorithm 2, one step (D_prev None: the first, first-order step)."""
    lam_s, lam_t = math.log(alpha_s / sigma_s), math.log(alpha_t / sigma_t)
    h = lam_t - lam_s
    if D_prev is None:
        Dh = D
    else:
        r = (lam_s - lam_prev) / h
        Dh = (1 + 1 / (2 * r)) * D - 1 / (2 * r) * D_prev
    return sigma_t / sigma_s * x - alpha_t * math.expm1(-h) * Dh


def reference_2m_sde(x, D, D_prev, z, alpha_s, sigma_s, alpha_t, sigma_t, lam_prev=None):
    """SDE-DPM-Solver++(2M), midpoint form, one step."""
    lam_s, lam_t = math.log(alpha_s / sigma_s), math.log(alpha_t / sigma_t)
    h = lam_t - lam_s
    if D_prev is None:
        Dh = D
    else:
        r = (lam_s - lam_prev) / h
        Dh = D + (D - D_prev) / (2 * r)
    return (sigma_t / sigma_s * math.exp(-h) * x + alpha_t * -math.expm1(-2 * h) * Dh
            + sigma_t * (-math.expm1(-2 * h)) ** 0.5 * z)
