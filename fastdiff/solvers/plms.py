"""PLMS (Liu et al. 2022, PNDM, eq. 9 and 12): pseudo linear multistep on the noise estimate,
as diffusers' PNDMScheduler with skip_prk_steps=True (Stable Diffusion 1.x's scheduler).

    transfer(x, e; a -> a') = sqrt(a'/a) x - (a' - a) e / (a sqrt(1 - a') + sqrt(a (1 - a) a'))   (eq. 9)
    first step (two evaluations):  o0 at x0;  x1 = transfer(x0, o0);  o1 at x1;
                                   x0 -> transfer(x0, (o0 + o1) / 2)
    then, with o the newest raw output and o_1, o_2, o_3 earlier ones (o1 is not kept):
        (3 o - o_1) / 2,  (23 o - 16 o_1 + 5 o_2) / 12,  (55 o - 59 o_1 + 37 o_2 - 9 o_3) / 24
The combined raw output becomes epsilon at the row's level with the current sample (v:
e = sqrt(a) v + sqrt(1 - a) x; sample: e = (x - sqrt(a) x0) / sqrt(1 - a)), as diffusers does.
So the history holds raw model outputs: each row pushes out = (D_raw - d_point x) / d_out,
an affine combination of the row's vector.
"""
from __future__ import annotations

import math

from ..grids import Grid
from .base import TableBuilder, combine, vec

ADAMS_BASHFORTH = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
HISTORY = ("H0", "H1", "H2")


def transfer(a: float, a_to: float) -> tuple[float, float]:
    """(x, e) coefficients of PNDM's eq. 9 (algebraically DDIM's step with noise estimate e)."""
    return math.sqrt(a_to / a), -(a_to - a) / (a * math.sqrt(1 - a_to) + math.sqrt(a * (1 - a) * a_to))


def epsilon_of(prediction: str, a: float) -> tuple[float, float]:
    """(sample, output) coefficients of the noise estimate from a raw output at level a."""
    if prediction == "epsilon":
        return 0.0, 1.0
    if prediction == "v_prediction":
        return math.sqrt(1 - a), math.sqrt(a)
    return 1 / math.sqrt(1 - a), -math.sqrt(a) / math.sqrt(1 - a)  # sample: e = (x - sqrt(a) x0) / sqrt(1 - a)


def build(grid: Grid, prediction: str) -> TableBuilder:
    """Rows [t0, t1, t1, t2, ..., t_{N-1}]: the first step takes two evaluations."""
    tb = TableBuilder("plms", "vp", prediction, history_len=3, separate_point=True, process=grid.process)
    N = grid.steps
    a, a_to, t = grid.abar.tolist(), grid.abar_to.tolist(), grid.t.tolist()

    def raw_output(level: float, point: list[float]) -> list[float]:
        """The model output as a row: out = (D_raw - d_point * point) / d_out."""
        _, d_point, d_out = tb.conversion(level)
        return combine((1 / d_out, vec(D_raw=1)), (-d_point / d_out, point))

    def step(level: float, level_to: float, sample: list[float], output: list[float]) -> list[float]:
        e_x, e_o = epsilon_of(prediction, level)
        c_x, c_e = transfer(level, level_to)
        return combine((c_x + c_e * e_x, sample), (c_e * e_o, output))

    x = vec(x=1)
    o0 = raw_output(a[0], x)
    if N == 1:
        state = step(a[0], a_to[0], x, o0)
        tb.add(t[0], a[0], state, point=state)
        return tb
    # first step: predict x1 (the point), keep x0 (the state); o0 becomes H0
    tb.add(t[0], a[0], x, point=step(a[0], a_to[0], x, o0), push=o0, ends_step=False)
    x1 = step(a[0], a_to[0], x, vec(H0=1))  # the point as seen from row 1, o0 now in H0
    o1 = raw_output(a[1], x1)
    state = step(a[0], a_to[0], x, combine((0.5, o1), (0.5, vec(H0=1))))
    tb.add(t[1], a[1], state, point=state)
    for k in range(1, N):  # rows 2..N: o_k at x_k, Adams-Bashforth over o_k and the pushed outputs
        o = raw_output(a[k], x)
        n = min(k + 1, 4)  # outputs kept: o0, then o2, o3, ... (o1 is not)
        coef = ADAMS_BASHFORTH[n]
        combo = combine((coef[0], o), *((c, vec(**{HISTORY[j]: 1})) for j, c in enumerate(coef[1:])))
        state = step(a[k], a_to[k], x, combo)
        tb.add(t[k], a[k], state, point=state, push=o)
    return tb
