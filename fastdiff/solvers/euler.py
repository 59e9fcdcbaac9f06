"""Karras et al. 2022 ODE/SDE samplers in VE sigma space (k-diffusion's convention).

The state is x = x_t / alpha_t; the probability-flow ODE is dx/ds = (x - D(x, s)) / s.
    euler:            x' = x + (s_to - s) d,  d = (x - D) / s
    euler_ancestral:  s_up = sqrt(s_to^2 (s^2 - s_to^2) / s^2), s_down = sqrt(s_to^2 - s_up^2)
                      x' = x + (s_down - s) d + s_up z
    heun (Alg. 1):    y = x + (s_to - s) d;  x' = x + (s_to - s) (d + d_y) / 2, d_y = (y - D(y)) / s_to
                      the last step, to s_to = 0, is a plain Euler step; a grid that ends above 0
                      ends with a normal Heun step (as k-diffusion's sample_heun).
    churn (Alg. 2):   gamma = min(s_churn / N, sqrt(2) - 1) if s_tmin <= s <= s_tmax else 0,
                      s_hat = s (1 + gamma), x_hat = x + sqrt(s_hat^2 - s^2) s_noise z, then the
                      step above from (x_hat, s_hat) with the model at s_hat: euler and heun.
                      The re-heating of step i is the z column of the row before it (the table's
                      noise_ahead keying; the first step's goes into the initial point).
                      churn_variant="diffusers" (euler only) is EulerDiscreteScheduler.step's
                      variant instead: the model sees x at s, then x_hat = x + c z and
                      D = x_hat - s_hat eps (epsilon), x_hat / (s^2 + 1) - s v / sqrt(s^2 + 1) (v),
                      or the output (sample); x' = x_hat + (s_to - s_hat) (x_hat - D) / s_hat.
A flow-matching process (x_s = (1 - s) x_0 + s eps) has the same ODE in its own units and
time, dx/ds = v = (x - D) / s, so euler and heun run on x_s with s as the sigma (as diffusers'
FlowMatchEuler/FlowMatchHeun); euler is the same step as on the VE form (both are exact for a
constant D), heun is not (the trapezoid rule depends on the time variable). euler_ancestral
is the posterior q(x_s' | x_s, x_0 = D) of the process, written for flow units (build_euler_ancestral).
"""
from __future__ import annotations

import math

from ..grids import Grid
from .base import TableBuilder, vec


def init_noise_sigma(sigma_max: float, spacing: str) -> float:
    # diffusers' Euler-family convention: sqrt(s^2 + 1) under `leading` spacing
    return math.sqrt(sigma_max**2 + 1) if spacing == "leading" else sigma_max


def ode_space(grid: Grid) -> str:
    return "flow" if grid.process == "flow" else "ve"


def sigma_rows(grid: Grid, solver: str) -> list[tuple[float, float, float, float]]:
    """(t, abar, s, s_to) per step: s the VE sigma, or the flow level on a flow process."""
    flow = grid.process == "flow"
    sig, sig_to = (grid.flow_sigma, grid.flow_sigma_to) if flow else (grid.sigma, grid.sigma_to)
    rows = []
    for i in range(grid.steps):
        s, s_to = float(sig[i]), float(sig_to[i])
        if not math.isfinite(s) or s <= 0:
            raise ValueError(f"solver {solver!r} needs a finite, positive sigma at every step (got {s} at step "
                             f"{i}); with a zero-terminal-SNR schedule use ddim, ddpm, dpmpp_2m or unipc")
        rows.append((float(grid.t[i]), float(grid.abar[i]), s, s_to))
    return rows


CHURN_VARIANTS = ("edm", "diffusers")


def churn(s: float, steps: int, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> tuple[float, float]:
    """Karras et al. 2022, Algorithm 2's re-heating: (s_hat, the std of the noise added to x)."""
    gamma = min(s_churn / steps, math.sqrt(2) - 1) if s_tmin <= s <= s_tmax else 0.0
    s_hat = s * (1 + gamma)
    return s_hat, math.sqrt(s_hat**2 - s**2) * s_noise


def _level(t: float, abar: float, s: float, s_hat: float, t_at) -> tuple[float, float]:
    """The model's (timestep, abar) at s_hat: the grid's own where the row is not re-heated."""
    return (t, abar) if s_hat == s else (float(t_at(s_hat)), 1 / (1 + s_hat**2))


def _check_churn(s_churn, s_tmin, s_tmax, s_noise, t_at, grid: Grid) -> bool:
    """Whether the options ask for churn; bad values are refused by name."""
    def real(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)

    if not (real(s_churn) and 0 <= s_churn < math.inf):
        raise ValueError(f"s_churn must be a finite number >= 0, got {s_churn!r}")
    if not (real(s_tmin) and real(s_tmax) and 0 <= s_tmin <= s_tmax):
        raise ValueError(f"s_tmin and s_tmax must satisfy 0 <= s_tmin <= s_tmax (s_tmax may be inf), "
                         f"got {s_tmin!r} and {s_tmax!r}")
    if not (real(s_noise) and 0 <= s_noise < math.inf):
        raise ValueError(f"s_noise must be a finite number >= 0, got {s_noise!r}")
    if s_churn > 0 and grid.process == "flow":
        raise ValueError("s_churn re-heats in VE sigma units (EDM's Algorithm 2): it needs a diffusion schedule, "
                         "not a flow-matching one")
    if s_churn > 0 and t_at is None:
        raise ValueError("churn evaluates the model at sigma_hat: the builder needs t_at (the schedule's "
                         "sigma -> timestep map, which the Sampler passes)")
    return s_churn > 0


def build_euler(grid: Grid, prediction: str, *, spacing: str = "trailing", s_churn: float = 0.0,
                s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0, churn_variant: str = "edm",
                t_at=None) -> TableBuilder:
    rows = sigma_rows(grid, "euler")
    if churn_variant not in CHURN_VARIANTS:
        raise ValueError(f"unknown churn_variant {churn_variant!r}; allowed: {', '.join(CHURN_VARIANTS)}")
    churned = _check_churn(s_churn, s_tmin, s_tmax, s_noise, t_at, grid)
    diffusers = churned and churn_variant == "diffusers"
    heat = [churn(s, len(rows), s_churn, s_tmin, s_tmax, s_noise) for _, _, s, _ in rows]  # (s, 0) without
    tb = TableBuilder("euler", ode_space(grid), prediction, init_noise_sigma=init_noise_sigma(rows[0][2], spacing),
                      process=grid.process, noise_ahead=churned and not diffusers,
                      init_churn=0.0 if diffusers else heat[0][1])
    for i, (t, abar, s, s_to) in enumerate(rows):
        s_hat, c = heat[i]
        if diffusers:  # the model at (x, s), then x_hat = x + c z (this row's own z), see above
            k = (s_to - s_hat) / s_hat
            z = {"epsilon": 1.0, "sample": 1 + k, "v_prediction": 1 + k - k / (s * s + 1)}[prediction]
            tb.add(t, abar, vec(x=1 + k, D=-k, z=c * z), d_out=-s_hat if prediction == "epsilon" else None)
        else:  # the model at (x_hat, s_hat); this row adds the next step's re-heating
            c_next = heat[i + 1][1] if i + 1 < len(rows) else 0.0
            t, abar = _level(t, abar, s, s_hat, t_at)
            tb.add(t, abar, vec(x=s_to / s_hat, D=1 - s_to / s_hat, z=c_next))
    return tb


def ancestral_sigmas(s: float, s_to: float) -> tuple[float, float]:
    s_up = math.sqrt(s_to**2 * (s**2 - s_to**2) / s**2)
    return math.sqrt(s_to**2 - s_up**2), s_up


def build_euler_ancestral(grid: Grid, prediction: str, *, spacing: str = "trailing") -> TableBuilder:
    rows = sigma_rows(grid, "euler_ancestral")
    tb = TableBuilder("euler_ancestral", ode_space(grid), prediction,
                      init_noise_sigma=init_noise_sigma(rows[0][2], spacing), process=grid.process)
    for t, abar, s, s_to in rows:
        if grid.process == "flow":
            tb.add(t, abar, vec(**flow_ancestral(s, s_to)))
            continue
        s_down, s_up = ancestral_sigmas(s, s_to)
        tb.add(t, abar, vec(x=s_down / s, D=1 - s_down / s, z=s_up))
    return tb


def flow_ancestral(s: float, s_to: float) -> dict:
    """The ancestral step in flow units: the VE one (rho = s_down / s = (sigma'/sigma)^2 with
    sigma = s / (1 - s)) times 1 - s_to, the state x_s / (1 - s); finite at s = 1 (rho = 0)."""
    rho = (s_to * (1 - s) / ((1 - s_to) * s)) ** 2
    return dict(x=s_to**2 * (1 - s) / ((1 - s_to) * s * s), D=(1 - s_to) * (1 - rho), z=s_to * math.sqrt(1 - rho))


def build_heun(grid: Grid, prediction: str, *, spacing: str = "trailing", s_churn: float = 0.0,
               s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0, t_at=None) -> TableBuilder:
    rows = sigma_rows(grid, "heun")
    churned = _check_churn(s_churn, s_tmin, s_tmax, s_noise, t_at, grid)
    tb = TableBuilder("heun", ode_space(grid), prediction, init_noise_sigma=init_noise_sigma(rows[0][2], spacing),
                      history_len=1, separate_point=True, process=grid.process, noise_ahead=churned)
    heat = [churn(s, len(rows), s_churn, s_tmin, s_tmax, s_noise) for _, _, s, _ in rows]  # (s, 0) without
    tb.init_churn = heat[0][1]
    for i, (t, abar, s, s_to) in enumerate(rows):
        t, abar = _level(t, abar, s, heat[i][0], t_at)
        s, c_next = heat[i][0], (heat[i + 1][1] if i + 1 < len(rows) else 0.0)  # s: s_hat (s without churn)
        if s_to == 0:  # the last step: Euler to the data
            tb.add(t, abar, vec(x=0, D=1), point=vec(x=0, D=1))
            continue
        ds = s_to - s
        # first evaluation at x: the state stays, the point moves to the Euler predictor y
        tb.add(t, abar, vec(x=1), point=vec(x=s_to / s, D=1 - s_to / s), push=True, ends_step=False)
        # second evaluation at y (level s_to); H0 is D(x); x' = x + ds/2 (d + d_y), y folded in;
        # + the next step's re-heating (churn)
        t_next = float(grid.t[i + 1]) if i + 1 < grid.steps else grid.t_final  # a grid ending above 0
        abar_next = float(grid.abar_to[i])
        state = vec(x=1 + ds / s, H0=ds / 2 * (1 / s_to - 2 / s), D=-ds / (2 * s_to), z=c_next)
        tb.add(t_next, abar_next, state, point=state)
    return tb


def reference_euler(x, D, s, s_to):
    d = (x - D) / s
    return x + (s_to - s) * d


def reference_euler_ancestral(x, D, z, s, s_to):
    s_up = min(s_to, (s_to**2 * (s**2 - s_to**2) / s**2) ** 0.5)
    s_down = (s_to**2 - s_up**2) ** 0.5
    return x + (s_down - s) * (x - D) / s + s_up * z


def reference_heun(x, denoise, s, s_to):
    """Karras et al. Algorithm 1 (no churn): one Heun step; `denoise(x, s)` is D."""
    d = (x - denoise(x, s)) / s
    y = x + (s_to - s) * d
    if s_to == 0:
        return y
    d_y = (y - denoise(y, s_to)) / s_to
    return x + (s_to - s) * (d + d_y) / 2
