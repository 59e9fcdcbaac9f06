"""PNDM (Liu et al. 2022, eq. 9, 12 and 13): pseudo linear multistep on the noise estimate after
a warm-up, as diffusers' PNDMScheduler (skip_prk_steps=True: Stable Diffusion 1.x's scheduler;
False, its default: the Runge-Kutta warm-up of F-PNDM).

    transfer(x, e; a -> a') = sqrt(a'/a) x - (a' - a) e / (a sqrt(1 - a') + sqrt(a (1 - a) a'))   (eq. 9)
Linear multistep, with o the newest raw output and o_1, o_2, o_3 earlier ones:
        (3 o - o_1) / 2,  (23 o - 16 o_1 + 5 o_2) / 12,  (55 o - 59 o_1 + 37 o_2 - 9 o_3) / 24
The combined raw output becomes epsilon at the step's start level with the step's start sample
(v: e = sqrt(a) v + sqrt(1 - a) x; sample: e = (x - sqrt(a) x0) / sqrt(1 - a)), as diffusers does.
So the history holds raw model outputs: a row pushes out = (D_raw - d_point P) / d_out, an
affine combination of the row's vector (P: the point the model saw).

warmup="pseudo_improved_euler" (skip_prk_steps=True): the first step takes two evaluations,
    o0 at x0;  x1 = transfer(x0, o0);  o1 at x1;  x0 -> transfer(x0, (o0 + o1) / 2)
and o1 is not kept: the multistep order grows from 2 on the next step.

warmup="pseudo_runge_kutta" (skip_prk_steps=False): each of the first 3 steps t -> t' is a
Runge-Kutta step of 4 evaluations (eq. 13) over diffusers' integer timesteps, h = (T//N) // 2:
    o1 at x (told t);          p2 = transfer(x, o1; t -> t - h)
    o2 at p2 (told t' + h);    p3 = transfer(x, o2; t -> t' + h)
    o3 at p3 (told t' + h);    p4 = transfer(x, o3; t -> t')
    o4 at p4 (told t');        x' = transfer(x, o1/6 + o2/3 + o3/3 + o4/6; t -> t')
(the second point lies at t - h while the model is told t' + h: the same only where t - t' = 2h,
not for an odd T//N nor on most linspace/trailing steps; diffusers' quirk, kept). The o1's are pushed, so the first linear multistep step (at the 4th
timestep) is already fourth order. The rows keep only x and the point: row 2 (the o3 row)
reads o2 back from its point, o2 = (P - C x) / E with p3 = C x + E o2, and writes the partial
result transfer(x, o1/6 + o2/3 + o3/3) (o1 = H0), which row 3 completes with E' o4 / 6; so
3 history slots still suffice. Rows 0-2 of a Runge-Kutta step are inner rows (ends_step=False).
"""
from __future__ import annotations

import math

from ..grids import Grid
from .base import TableBuilder, combine, vec

ADAMS_BASHFORTH = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
HISTORY = ("H0", "H1", "H2")
WARMUPS = ("pseudo_improved_euler", "pseudo_runge_kutta")
RUNGE_KUTTA_STEPS = 3  # then the 3 pushed outputs make the first multistep step fourth order
RUNGE_KUTTA_MIN_STEPS = RUNGE_KUTTA_STEPS + 1  # the warm-up walks the 4 largest timesteps


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


def step_coefficients(prediction: str, a: float, a_to: float) -> tuple[float, float]:
    """(C, E): transfer(sample, epsilon_of(output, sample); a -> a_to) = C sample + E output."""
    e_x, e_o = epsilon_of(prediction, a)
    c_x, c_e = transfer(a, a_to)
    return c_x + c_e * e_x, c_e * e_o


def build(grid: Grid, prediction: str, *, warmup: str = "pseudo_improved_euler", abar_at=None) -> TableBuilder:
    """Warm-up rows (see the module docstring), then one linear multistep row per step.
    abar_at: the schedule's alphas_cumprod at a timestep (the Runge-Kutta rows' off-grid levels)."""
    if warmup not in WARMUPS:
        raise ValueError(f"unknown warmup {warmup!r} for plms; allowed: {', '.join(WARMUPS)}")
    tb = TableBuilder("plms", "vp", prediction, history_len=3, separate_point=True, process=grid.process)
    N = grid.steps
    a, a_to, t = grid.abar.tolist(), grid.abar_to.tolist(), grid.t.tolist()
    x, H0 = vec(x=1), vec(H0=1)
    if warmup == "pseudo_runge_kutta":
        _runge_kutta_warmup(tb, grid, abar_at)
        first = RUNGE_KUTTA_STEPS
    else:
        o0 = _raw_output(tb, a[0], x)
        if N == 1:
            state = _step(tb, a[0], a_to[0], x, o0)
            tb.add(t[0], a[0], state, point=state)
            return tb
        # first step: predict x1 (the point), keep x0 (the state); o0 becomes H0
        tb.add(t[0], a[0], x, point=_step(tb, a[0], a_to[0], x, o0), push=o0, ends_step=False)
        x1 = _step(tb, a[0], a_to[0], x, H0)  # the point as seen from row 1, o0 now in H0
        o1 = _raw_output(tb, a[1], x1)
        state = _step(tb, a[0], a_to[0], x, combine((0.5, o1), (0.5, H0)))
        tb.add(t[1], a[1], state, point=state)
        first = 1
    for k in range(first, N):  # o_k at x_k, Adams-Bashforth over o_k and the pushed outputs
        o = _raw_output(tb, a[k], x)
        n = min(k + 1, 4)  # outputs kept: o0, then o2, o3, ... (o1 is not); after Runge-Kutta: 3 o1's
        coef = ADAMS_BASHFORTH[n]
        combo = combine((coef[0], o), *((c, vec(**{HISTORY[j]: 1})) for j, c in enumerate(coef[1:])))
        state = _step(tb, a[k], a_to[k], x, combo)
        tb.add(t[k], a[k], state, point=state, push=o)
    return tb


def _raw_output(tb: TableBuilder, level: float, point: list[float]) -> list[float]:
    """The model output of a row at `level` whose model saw `point`: out = (D_raw - d_point * point) / d_out."""
    _, d_point, d_out = tb.conversion(level)
    return combine((1 / d_out, vec(D_raw=1)), (-d_point / d_out, point))


def _step(tb: TableBuilder, level: float, level_to: float, sample: list[float], output: list[float]) -> list[float]:
    """transfer(sample, epsilon_of(output, sample); level -> level_to) as a row."""
    C, E = step_coefficients(tb.prediction, level, level_to)
    return combine((C, sample), (E, output))


def _runge_kutta_warmup(tb: TableBuilder, grid: Grid, abar_at) -> None:
    """The first RUNGE_KUTTA_STEPS steps, 4 rows each (see the module docstring)."""
    N = grid.steps
    if N < RUNGE_KUTTA_MIN_STEPS:
        raise ValueError(f"warmup='pseudo_runge_kutta' takes the {RUNGE_KUTTA_MIN_STEPS} largest timesteps "
                         f"({RUNGE_KUTTA_STEPS} Runge-Kutta steps), so it needs steps >= {RUNGE_KUTTA_MIN_STEPS} "
                         f"(img2img: int(steps * strength) >= {RUNGE_KUTTA_MIN_STEPS}); got {N}")
    if grid.stride <= 0 or abar_at is None:
        raise ValueError("warmup='pseudo_runge_kutta' evaluates the model at t - (T//N)//2 between diffusers' "
                         "integer timesteps: it needs a spaced grid (spacing, steps_offset), not explicit "
                         "timesteps or sigmas")
    h = grid.stride // 2
    x, P, H0 = vec(x=1), vec(P=1), vec(H0=1)
    for s in range(RUNGE_KUTTA_STEPS):
        t, t_to = float(grid.t[s]), float(grid.t[s + 1])
        a, a_mid, a_to = float(grid.abar[s]), float(abar_at(t_to + h)), float(grid.abar[s + 1])
        o1 = _raw_output(tb, a, x)  # the point is the state here
        tb.add(t, a, x, point=_step(tb, a, float(abar_at(t - h)), x, o1), push=o1, ends_step=False)
        o2 = _raw_output(tb, a_mid, P)
        C, E = step_coefficients(tb.prediction, a, a_mid)  # p3 = C x + E o2
        if E == 0.0:
            raise AssertionError(f"the Runge-Kutta midpoint level equals the start level at t = {t:g}")
        tb.add(t_to + h, a_mid, x, point=combine((C, x), (E, o2)), ends_step=False)
        o2 = combine((1 / E, P), (-C / E, x))  # o2 read back from the point the o3 row sees
        o3 = _raw_output(tb, a_mid, P)
        partial = _step(tb, a, a_to, x, combine((1 / 6, H0), (1 / 3, o2), (1 / 3, o3)))  # o1 is H0
        tb.add(t_to + h, a_mid, partial, point=_step(tb, a, a_to, x, o3), ends_step=False)
        _, E_to = step_coefficients(tb.prediction, a, a_to)
        state = combine((1.0, x), (E_to / 6, _raw_output(tb, a_to, P)))
        tb.add(t_to, a_to, state, point=state)
