"""Step grids: which noise levels a sampler visits, in float64.

A Grid lists, per step i, the model timestep t[i] (fractional for sigma grids), the
noise level abar[i] the model sees there, and the level abar_to[i] the step lands on.
Usually abar_to[i] == abar[i+1]; diffusers' DDIM instead steps to t - T//N (a fixed
stride), which differs under `trailing`/`linspace` spacing; we reproduce that for it.
A flow-matching schedule's grid carries the same VP levels (schedules.flow_level) and
process="flow"; its explicit `sigmas` are flow levels s in [0, 1], as diffusers lists them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .checks import as_float64, check_number
from .schedules import FlowSchedule, Schedule, flow_level, flow_sigma

F64 = torch.float64
SPACINGS = ("leading", "trailing", "linspace")
SIGMA_GRIDS = ("karras", "exponential")


@dataclass(frozen=True)
class Grid:
    t: torch.Tensor  # [N] model timesteps, decreasing
    abar: torch.Tensor  # [N] alphas_cumprod at t
    abar_to: torch.Tensor  # [N] level each step lands on (the last: final_abar)
    t_final: float = 0.0  # the model timestep of the final level (Heun evaluates there when it is above 0)
    process: str = "vp"  # the schedule's process ("vp", or "flow": see schedules.FlowSchedule)
    stride: int = 0  # diffusers' fixed T//N of a spaced stride_prev grid (t - stride is DDIM's/PNDM's next); else 0

    @property
    def steps(self) -> int:
        return self.t.numel()

    @property
    def flow_sigma(self) -> torch.Tensor:
        """[N] flow levels s of the steps (process "flow")."""
        return flow_sigma(self.abar)

    @property
    def flow_sigma_to(self) -> torch.Tensor:
        return flow_sigma(self.abar_to)

    @property
    def sigma(self) -> torch.Tensor:
        return ((1 - self.abar) / self.abar).sqrt()

    @property
    def sigma_to(self) -> torch.Tensor:
        return ((1 - self.abar_to) / self.abar_to).sqrt()

    def __getitem__(self, sl: slice) -> "Grid":
        return Grid(self.t[sl], self.abar[sl], self.abar_to[sl], self.t_final, self.process, self.stride)


def spaced_timesteps(num_train_timesteps: int, steps: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
    """Integer timesteps, decreasing, as diffusers' DDPM/DDIM/Euler schedulers space them."""
    T, N = num_train_timesteps, steps
    if spacing == "leading":
        ts = (np.arange(0, N) * (T // N)).round()[::-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / N)).astype(np.int64) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, N).round()[::-1].astype(np.int64)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; allowed: {', '.join(SPACINGS)}")
    if spacing == "trailing" and ts.size != N:
        # np.arange(T, 0, -T/N) overshoots by one entry for some N (T=1000: 61, 103, 121), ending at t = -1
        ok = min((n for n in range(1, T + 1) if _trailing_count(T, n) == n), key=lambda n: (abs(n - N), n))
        raise ValueError(f"spacing='trailing' with steps={N} and num_train_timesteps={T} gives {ts.size} "
                         f"timesteps ending at t = {ts.min()} (diffusers' float arange overshoots); "
                         f"use steps={ok} or another spacing")
    if ts.min() < 0 or ts.max() > T - 1:
        raise ValueError(f"steps_offset={steps_offset} puts timesteps outside [0, {T - 1}]")
    return ts.copy()


def _trailing_count(T: int, N: int) -> int:
    return np.arange(T, 0, -T / N).size


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: sigma_i^(1/rho) evenly spaced from sigma_max to sigma_min."""
    check_number("rho", rho, 0, float("inf"), hi_open=True)
    ramp = torch.linspace(0, 1, steps, dtype=F64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, steps: int) -> torch.Tensor:
    """log sigma evenly spaced from sigma_max to sigma_min."""
    return torch.linspace(np.log(sigma_max), np.log(sigma_min), steps, dtype=F64).exp()


def explicit_grid(schedule, sigmas, timesteps=None) -> Grid:
    """A grid from explicit sigmas [N+1], as diffusers' `scheduler.sigmas` (VE sigmas; flow levels
    s in [0, 1] for a FlowSchedule): step i goes from sigmas[i] to sigmas[i+1] (0: the data). The
    model sees `timesteps` [N] (non-increasing), or t_at(sigmas) when None: diffusers may round the
    model's timestep while keeping the exact level."""
    T = schedule.num_train_timesteps
    s = as_float64("sigmas", sigmas)
    if s.numel() < 2 or bool(torch.isnan(s).any()) or bool((s[:-1] <= 0).any()) or bool((s[-1] < 0).any()):
        raise ValueError("explicit sigmas need N+1 >= 2 values: positive, then a final one >= 0")
    if bool((s[1:] > s[:-1]).any()):
        raise ValueError("explicit sigmas must be non-increasing")
    flow = schedule.process == "flow"
    if flow and bool((s > 1).any()):
        raise ValueError("a flow schedule's explicit sigmas are flow levels s in [0, 1]")
    ve = s / (1 - s) if flow else s  # s = 1: inf (pure noise)
    if timesteps is None:
        t = schedule.t_at(ve[:-1])
    else:
        t = as_float64("timesteps", timesteps)
        if t.numel() != s.numel() - 1:
            raise ValueError(f"timesteps must have len(sigmas) - 1 = {s.numel() - 1} entries, got {t.numel()}")
        top = T if flow else T - 1  # a flow model sees t = s * T, up to T at pure noise
        if bool((t[1:] > t[:-1]).any()) or not bool(((t >= 0) & (t <= top)).all()):  # NaN fails too
            raise ValueError(f"timesteps must be non-increasing and lie in [0, {top}]")
    abar_all = flow_level(s) if flow else 1.0 / (1.0 + s**2)  # sigma = inf (zero SNR) gives abar = 0
    return Grid(t, abar_all[:-1], abar_all[1:], _t_final(schedule, float(abar_all[-1])), schedule.process)


def _t_final(schedule, final_abar: float) -> float:
    """The model timestep of the final level (0 at the data)."""
    if final_abar >= 1.0:
        return 0.0
    return float(schedule.t_at(torch.tensor(((1 - final_abar) / final_abar) ** 0.5, dtype=F64)))


def _flow_grid(schedule: FlowSchedule, steps: int, sigmas, rho: float, final_abar: float, timesteps) -> Grid:
    """A flow schedule's grid: diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps(N) by default."""
    T = schedule.num_train_timesteps
    if timesteps is not None:
        t = as_float64("timesteps", timesteps)
        if t.numel() < 1 or bool((t[1:] >= t[:-1]).any()) or not bool(((t > 0) & (t <= T)).all()):  # NaN fails
            raise ValueError(f"a flow schedule's timesteps must be strictly decreasing in (0, {T}]")
        s = t / T
    else:
        s = schedule.default_sigmas(steps)
        if sigmas is not None:  # as diffusers: the named grid between the shifted grid's ends
            if sigmas not in SIGMA_GRIDS:
                raise ValueError(f"unknown sigma grid {sigmas!r}; allowed: {', '.join(SIGMA_GRIDS)}")
            lo, hi = float(s[-1]), float(s[0])
            s = karras_sigmas(lo, hi, steps, rho) if sigmas == "karras" else exponential_sigmas(lo, hi, steps)
        t = s * T
    abar = flow_level(s)
    abar_to = torch.cat([abar[1:], torch.tensor([final_abar], dtype=F64)])
    return Grid(t, abar, abar_to, _t_final(schedule, final_abar), "flow")


def _check_final_level(grid: Grid, final_abar: float) -> Grid:
    if final_abar < float(grid.abar[-1]):
        raise ValueError(f"final_alpha_cumprod={final_abar:g} is noisier than the grid's last level (alphas_cumprod "
                         f"{float(grid.abar[-1]):.6g}): the last step would add noise; use a value >= that, or 1.0")
    return grid


def make_grid(schedule: Schedule, steps: int, *, spacing: str = "trailing", steps_offset: int = 0,
              sigmas=None, rho: float = 7.0, final_abar: float = 1.0, stride_prev: bool = False,
              timesteps=None) -> Grid:
    """The grid a solver walks. `timesteps` (explicit, decreasing) overrides spacing;
    `sigmas` is a named grid (SIGMA_GRIDS) or explicit VE sigmas [N+1] (see explicit_grid).
    A FlowSchedule ignores nothing silently: it has no spacing (see _flow_grid)."""
    if sigmas is not None and not isinstance(sigmas, str):
        return explicit_grid(schedule, sigmas, timesteps)
    if schedule.process == "flow":
        return _check_final_level(_flow_grid(schedule, steps, sigmas, rho, final_abar, timesteps), final_abar)
    T = schedule.num_train_timesteps
    t_final = _t_final(schedule, final_abar)
    abar_train = schedule.alphas_cumprod
    if timesteps is not None:
        t = as_float64("timesteps", timesteps)
        if t.numel() < 1 or bool((t[1:] >= t[:-1]).any()):
            raise ValueError("timesteps must be a non-empty, strictly decreasing sequence")
        if not bool(((t >= 0) & (t <= T - 1)).all()):  # NaN fails too
            raise ValueError(f"timesteps must be finite and lie in [0, {T - 1}]")
        abar = schedule.alphas_cumprod_at(t)
        abar_to = torch.cat([abar[1:], torch.tensor([final_abar], dtype=F64)])
        return _check_final_level(Grid(t, abar, abar_to, t_final), final_abar)
    if sigmas is not None:
        if sigmas not in SIGMA_GRIDS:
            raise ValueError(f"unknown sigma grid {sigmas!r}; allowed: {', '.join(SIGMA_GRIDS)}")
        lo, hi = schedule.sigma_min, schedule.sigma_max
        s = karras_sigmas(lo, hi, steps, rho) if sigmas == "karras" else exponential_sigmas(lo, hi, steps)
        t = schedule.t_at(s)
        abar = 1.0 / (1.0 + s**2)
        abar_to = torch.cat([abar[1:], torch.tensor([final_abar], dtype=F64)])
        return _check_final_level(Grid(t, abar, abar_to, t_final), final_abar)
    ts = spaced_timesteps(T, steps, spacing, steps_offset)
    t = torch.from_numpy(ts).to(F64)
    abar = abar_train[ts]
    stride = T // steps if stride_prev else 0
    if stride_prev:
        prev = ts - stride
        abar_to = torch.where(torch.from_numpy(prev >= 0), abar_train[np.clip(prev, 0, None)],
                              torch.tensor(final_abar, dtype=F64))
    else:
        abar_to = torch.cat([abar[1:], torch.tensor([final_abar], dtype=F64)])
    return _check_final_level(Grid(t, abar, abar_to, t_final, stride=stride), final_abar)
