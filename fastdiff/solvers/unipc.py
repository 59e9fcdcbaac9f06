"""UniPC (Zhao et al. 2023): unified predictor-corrector, B(h) = bh2 = e^{h} - 1, order 2.

Data prediction, in VP space, with hh = -h (h = lambda_t - lambda_s0), phi_1 = e^{hh} - 1:
    UniP-p:  x_t = (sigma_t / sigma_s0) x - alpha_t phi_1 m0 - alpha_t B(h) sum_k rho^p_k D1_k
    UniC-p:  x_t^c = (sigma_t / sigma_s0) x - alpha_t phi_1 m0
                     - alpha_t B(h) (sum_k rho^c_k D1_k + rho^c_p (m_t - m0))
D1_k = (m_k - m0) / r_k, r_k = (lambda_{s_k} - lambda_s0) / h; rho solves R rho = b (Alg. 1),
with rho^p = 0.5 for order 2 and rho^c = 0.5 for order 1.  The corrector reuses the new
model evaluation at x_t, so it costs no extra call; the state is the corrected x, and the
model sees the predicted x: the table has separate points.
"""
from __future__ import annotations

import math

import numpy as np

from ..grids import Grid
from .base import TableBuilder, combine, vec, vp_levels


def _phis(h: float, order: int):
    """(phi_1, B_h, b) of Algorithm 1 for bh2; b has `order` entries."""
    hh = -h
    phi_1 = math.expm1(hh)
    B_h = math.expm1(hh)
    b, h_phi_k, fact = [], phi_1 / hh - 1, 1
    for i in range(1, order + 1):
        b.append(h_phi_k * fact / B_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    return phi_1, B_h, b


def predictor(levels, order: int) -> dict:
    """Coefficients of UniP over (x, m0 = newest D, m1 = previous D).

    levels: (lambda_prev, (alpha_s0, sigma_s0, lambda_s0), (alpha_t, sigma_t, lambda_t)).
    """
    lam_prev, (_, sigma_s0, lam_s0), (alpha_t, sigma_t, lam_t) = levels
    if sigma_t == 0:  # landing on the data: x_t = alpha_t m0
        return {"x": 0.0, "m0": alpha_t, "m1": 0.0}
    h = lam_t - lam_s0
    if h == 0:  # a zero-length step: the identity
        return {"x": 1.0, "m0": 0.0, "m1": 0.0}
    if order == 2 and lam_prev == lam_s0:
        order = 1
    phi_1, B_h, _ = _phis(h, order)
    c = {"x": sigma_t / sigma_s0, "m0": -alpha_t * phi_1, "m1": 0.0}
    if order == 2:
        r1 = (lam_prev - lam_s0) / h
        rho = 0.5
        # - alpha_t B_h rho (m1 - m0) / r1
        c["m1"] += -alpha_t * B_h * rho / r1
        c["m0"] += alpha_t * B_h * rho / r1
    return c


def corrector(levels, order: int) -> dict:
    """Coefficients of UniC over (x = last state, m0 = D at s0, m1 = D before, mt = new D)."""
    lam_prev, (_, sigma_s0, lam_s0), (alpha_t, sigma_t, lam_t) = levels
    h = lam_t - lam_s0
    if h == 0:  # after a zero-length step there is nothing to correct
        return {"x": 1.0, "m0": 0.0, "m1": 0.0, "mt": 0.0}
    if order == 2 and lam_prev == lam_s0:
        order = 1
    phi_1, B_h, b = _phis(h, order)
    c = {"x": sigma_t / sigma_s0, "m0": -alpha_t * phi_1, "m1": 0.0, "mt": 0.0}
    if order == 1:
        rho = [0.5]
    else:
        r1 = (lam_prev - lam_s0) / h
        R = np.array([[1.0, 1.0], [r1, 1.0]])
        rho = list(np.linalg.solve(R, np.array(b)))
        c["m1"] += -alpha_t * B_h * rho[0] / r1
        c["m0"] += alpha_t * B_h * rho[0] / r1
    c["mt"] += -alpha_t * B_h * rho[-1]
    c["m0"] += alpha_t * B_h * rho[-1]
    return c


def build(grid: Grid, prediction: str, *, solver_order: int = 2, lower_order_final: bool = True):
    if solver_order not in (1, 2):
        raise ValueError(f"solver_order must be 1 or 2 for unipc, got {solver_order}")
    N = grid.steps
    tb = TableBuilder("unipc", "vp", prediction, history_len=2, separate_point=True,
                      process=grid.process)
    lv = [vp_levels(float(a)) for a in grid.abar] + [vp_levels(float(grid.abar_to[-1]))]
    lam = [level[2] for level in lv]
    prev_order = None
    for i in range(N):
        t, a_i = float(grid.t[i]), float(grid.abar[i])
        # corrector: x_c(i) from x_c(i-1) (state), D_{i-1} (H0), D_{i-2} (H1), D_i (new)
        if i == 0:
            state = vec(x=1)
        else:
            c = corrector((lam[i - 2] if i >= 2 else None, lv[i - 1], lv[i]), prev_order)
            state = vec(x=c["x"], H0=c["m0"], H1=c["m1"], D=c["mt"])
        # predictor from x_c(i), m0 = D_i, m1 = D_{i-1} (H0 before the push)
        order = min(solver_order, i + 1)
        if lower_order_final:
            order = min(order, N - i)
        if lv[i + 1][1] == 0:
            order = 1
        p = predictor((lam[i - 1] if i >= 1 else None, lv[i], lv[i + 1]), order)
        point = combine((p["x"], state), (p["m0"], vec(D=1)), (p["m1"], vec(H0=1)))
        if i == N - 1:
            state = point  # the final prediction is the output; nothing corrects it
        tb.add(t, a_i, state, point=point, push=True)
        prev_order = order
    return tb


def reference_step(x_last, m_list, m_t, lam_list, alpha_t, sigma_t, sigma_s0, order_c, order_p,
                   alpha_next, sigma_next, lam_next):
    """Textbook UniC then UniP (Alg. 1 and 2, bh2), written out directly.

    m_list: past data predictions, newest last (m_list[-1] = m0 at s0); lam_list: their
    lambdas; m_t the new prediction at lambda_t = lam of (alpha_t, sigma_t).
    Returns (x_corrected, x_next_predicted).
    """
    lam_t = math.log(alpha_t / sigma_t)
    lam_s0 = lam_list[-1]
    h = lam_t - lam_s0
    hh = -h
    B_h = math.expm1(hh)
    m0 = m_list[-1]
    # phi_1(hh) = (e^hh - 1)/hh, phi_{k+1} = (phi_k - 1/k!)/hh;  b_k = k! hh phi_{k+1}(hh) / B(h)
    phi_1 = math.expm1(hh) / hh
    phi_2 = (phi_1 - 1) / hh
    phi_3 = (phi_2 - 0.5) / hh
    if order_c == 1:
        rho_c = [0.5]
        D1 = []
    else:
        r1 = (lam_list[-2] - lam_s0) / h
        R = np.array([[1.0, 1.0], [r1, 1.0]])
        b = np.array([1 * hh * phi_2 / B_h, 2 * hh * phi_3 / B_h])
        rho_c = list(np.linalg.solve(R, b))
        D1 = [(m_list[-2] - m0) / r1]
    x_c = sigma_t / sigma_s0 * x_last - alpha_t * math.expm1(hh) * m0
    x_c = x_c - alpha_t * B_h * (sum(r * d for r, d in zip(rho_c[:-1], D1)) + rho_c[-1] * (m_t - m0))
    # predictor from x_c to the next level
    if sigma_next == 0:
        return x_c, alpha_next * m_t
    h2 = lam_next - lam_t
    x_p = sigma_next / sigma_t * x_c - alpha_next * math.expm1(-h2) * m_t
    if order_p == 2:
        r1 = (lam_s0 - lam_t) / h2
        x_p = x_p - alpha_next * math.expm1(-h2) * 0.5 * (m0 - m_t) / r1
    return x_c, x_p
