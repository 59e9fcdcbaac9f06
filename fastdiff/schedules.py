"""Noise schedules, in float64.

Variance preserving: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, with
alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t)
and the VE sigma s_t = sigma_t / alpha_t.  A Schedule is its betas; everything else
derives from them.  Transforms return a new Schedule.
"""
from __future__ import annotations

import math

import torch

from .checks import as_float64

F64 = torch.float64


def _check_positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _betas_from_alphas_cumprod(abar: torch.Tensor) -> torch.Tensor:
    prev = torch.cat([abar.new_ones(1), abar[:-1]])
    return 1.0 - abar / prev


class Schedule:
    """A discrete variance-preserving schedule of `num_train_timesteps` betas (float64)."""

    process = "vp"  # x_t = alpha_t x_0 + sigma_t eps with alpha^2 + sigma^2 = 1 (FlowSchedule: "flow")

    def __init__(self, betas, *, name: str = "custom"):
        betas = as_float64("betas", betas)
        if betas.numel() < 1:
            raise ValueError("betas must hold at least one value")
        if not torch.isfinite(betas).all() or (betas <= 0).any() or (betas > 1).any():
            raise ValueError("betas must be finite and in (0, 1]")
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.name = name

    # ---- constructors -------------------------------------------------------------
    @classmethod
    def from_betas(cls, betas, *, name: str = "custom") -> "Schedule":
        return cls(betas, name=name)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod, *, name: str = "custom") -> "Schedule":
        abar = as_float64("alphas_cumprod", alphas_cumprod)
        return cls(_betas_from_alphas_cumprod(abar), name=name)

    @classmethod
    def linear(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        """Ho et al. 2020: betas evenly spaced from beta_start to beta_end."""
        T = _check_positive_int("num_train_timesteps", num_train_timesteps)
        return cls(torch.linspace(beta_start, beta_end, T, dtype=F64), name="linear")

    @classmethod
    def scaled_linear(cls, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
        """Stable Diffusion's schedule: sqrt(beta) evenly spaced."""
        T = _check_positive_int("num_train_timesteps", num_train_timesteps)
        root = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=F64)
        return cls(root**2, name="scaled_linear")

    @classmethod
    def cosine(cls, num_train_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999):
        """Nichol & Dhariwal 2021: abar(t) = cos((t/T + s)/(1 + s) * pi/2)^2, betas capped."""
        T = _check_positive_int("num_train_timesteps", num_train_timesteps)
        t = torch.arange(T + 1, dtype=F64) / T
        f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        betas = torch.clamp(1.0 - f[1:] / f[:-1], max=max_beta)
        return cls(betas, name="cosine")

    @classmethod
    def sigmoid(cls, num_train_timesteps: int = 1000, start: float = -3.0, end: float = 3.0, tau: float = 1.0,
                clip_min: float = 1e-9):
        """Chen 2023, 'On the importance of noise scheduling': abar(t) from a sigmoid in t."""
        T = _check_positive_int("num_train_timesteps", num_train_timesteps)
        if not end > start:
            raise ValueError(f"sigmoid schedule needs end > start, got start={start}, end={end}")
        if not tau > 0:
            raise ValueError(f"sigmoid schedule needs tau > 0, got {tau}")
        t = torch.arange(1, T + 1, dtype=F64) / T
        v_start = torch.sigmoid(torch.tensor(start / tau, dtype=F64))
        v_end = torch.sigmoid(torch.tensor(end / tau, dtype=F64))
        abar = (v_end - torch.sigmoid((t * (end - start) + start) / tau)) / (v_end - v_start)
        return cls.from_alphas_cumprod(torch.clamp(abar, clip_min, 1.0), name="sigmoid")

    @staticmethod
    def flow_matching(num_train_timesteps: int = 1000, shift: float = 1.0, *, mu: float | None = None,
                      time_shift_type: str = "exponential", shift_terminal: float | None = None) -> "FlowSchedule":
        """Rectified flow / flow matching (x_s = (1 - s) x_0 + s eps): see FlowSchedule."""
        return FlowSchedule(num_train_timesteps, shift, mu=mu, time_shift_type=time_shift_type,
                            shift_terminal=shift_terminal)

    @classmethod
    def named(cls, name: str, num_train_timesteps: int = 1000, **kw) -> "Schedule":
        makers = {"linear": cls.linear, "scaled_linear": cls.scaled_linear, "cosine": cls.cosine,
                  "sigmoid": cls.sigmoid}
        if name not in makers:
            raise ValueError(f"unknown schedule {name!r}; allowed: {', '.join(sorted(makers))}")
        return makers[name](num_train_timesteps, **kw)

    # ---- transforms ---------------------------------------------------------------
    def rescale_zero_terminal_snr(self) -> "Schedule":
        """Lin et al. 2023, Alg. 1: shift and scale sqrt(abar) so the last step has SNR 0."""
        root = self.alphas_cumprod.sqrt()
        first, last = root[0].clone(), root[-1].clone()
        root = (root - last) * first / (first - last)
        abar = root**2
        betas = _betas_from_alphas_cumprod(abar)  # the last beta becomes exactly 1
        return Schedule(betas, name=f"{self.name}+zero_snr")

    def input_scaled(self, b: float) -> "Schedule":
        """Chen 2023: scaling the input by b shifts the log-SNR by 2 log b."""
        if not b > 0:
            raise ValueError(f"input scale b must be > 0, got {b}")
        abar = torch.sigmoid(self.log_snr + 2.0 * math.log(b))
        return Schedule.from_alphas_cumprod(abar, name=f"{self.name}*{b:g}")

    # ---- derived quantities ---------------------------------------------------------
    @property
    def num_train_timesteps(self) -> int:
        return self.betas.numel()

    @property
    def log_snr(self) -> torch.Tensor:
        abar = self.alphas_cumprod
        return torch.log(abar) - torch.log1p(-abar)

    @property
    def sigmas(self) -> torch.Tensor:
        """VE sigma per integer timestep: sqrt((1 - abar) / abar)."""
        abar = self.alphas_cumprod
        return ((1.0 - abar) / abar).sqrt()

    def sigma_at(self, t) -> torch.Tensor:
        """VE sigma at (fractional) timesteps: log-sigma interpolated linearly between integers."""
        t = torch.as_tensor(t, dtype=F64)
        T = self.num_train_timesteps
        if not bool(((t >= 0) & (t <= T - 1)).all()):  # NaN fails too
            raise ValueError(f"timesteps must be finite and lie in [0, {T - 1}]")
        log_sigma = self.sigmas.log()
        lo = t.floor().long().clamp(max=T - 2) if T > 1 else t.floor().long()
        if T == 1:
            return log_sigma[lo].exp()
        w = t - lo
        return ((1 - w) * log_sigma[lo] + w * log_sigma[lo + 1]).exp()

    def alphas_cumprod_at(self, t) -> torch.Tensor:
        return 1.0 / (1.0 + self.sigma_at(t) ** 2)

    def t_at(self, sigma) -> torch.Tensor:
        """Inverse of sigma_at: the fractional timestep whose VE sigma is `sigma`."""
        sigma = torch.as_tensor(sigma, dtype=F64)
        log_sigmas = self.sigmas.log()  # increasing in t
        log_s = sigma.clamp_min(1e-300).log()
        T = self.num_train_timesteps
        # index of the interval [lo, lo+1] holding log_s, clamped to the table
        lo = torch.searchsorted(log_sigmas, log_s.reshape(-1), right=True).reshape(log_s.shape) - 1
        lo = lo.clamp(0, T - 2)
        left, right = log_sigmas[lo], log_sigmas[lo + 1]
        w = ((log_s - left) / (right - left)).clamp(0, 1)
        return lo.to(F64) + w

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def __repr__(self) -> str:
        return f"Schedule({self.name}, num_train_timesteps={self.num_train_timesteps})"


# ---- flow matching ---------------------------------------------------------------------------
TIME_SHIFTS = ("exponential", "linear")


def flow_level(s) -> torch.Tensor:
    """The VP level abar of flow noise level s: x_s = (1 - s) x_0 + s eps is the VP point
    x_s / k, k = sqrt((1 - s)^2 + s^2), so abar = (1 - s)^2 / k^2 (the same VE sigma s / (1 - s))."""
    s = torch.as_tensor(s, dtype=F64)
    return (1 - s) ** 2 / ((1 - s) ** 2 + s**2)


def flow_sigma(abar) -> torch.Tensor:
    """Inverse of flow_level: s = sigma / (alpha + sigma) in VP (alpha, sigma); 1 at abar = 0."""
    abar = torch.as_tensor(abar, dtype=F64)
    alpha, sigma = abar.sqrt(), (1 - abar).clamp_min(0).sqrt()
    return sigma / (alpha + sigma)


class FlowSchedule:
    """A rectified-flow / flow-matching process: x_s = (1 - s) x_0 + s eps, s in [0, 1].

    The model sees x_s itself ("flow units") and the timestep t = s * T (a float), and predicts
    the velocity v = eps - x_0 (prediction="flow"), so D = x_s - s v. As an affine process it
    has alpha = 1 - s and sigma = s: its VE sigma is s / (1 - s) and its VP level abar =
    (1 - s)^2 / ((1 - s)^2 + s^2) (flow_level), which is what grids and tables carry; solvers
    in VP units see x_s / sqrt((1 - s)^2 + s^2), the Euler family works on x_s in time s.

    The grid a Sampler walks by default is diffusers' FlowMatchEulerDiscreteScheduler's for the
    same options: training levels s_i = shift(i / T), i = T..1 (shift(s) = shift s / (1 +
    (shift - 1) s)); for N steps, s linear from shift(1) to shift(1/T) and then shifted again
    (diffusers shifts sigma_min twice); with `mu` (resolution-dependent shifting) the training
    levels are unshifted and the grid is time_shift(mu, s) instead ("exponential":
    e^mu / (e^mu + 1/s - 1), "linear": mu / (mu + 1/s - 1)); `shift_terminal` then stretches
    the grid so that it ends at that s (LTX-Video).
    """

    process = "flow"

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, *, mu: float | None = None,
                 time_shift_type: str = "exponential", shift_terminal: float | None = None):
        T = _check_positive_int("num_train_timesteps", num_train_timesteps)
        if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
            raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
        if mu is not None and shift != 1.0:
            raise ValueError(f"give either shift (static) or mu (dynamic shifting), not both: shift={shift}, mu={mu}")
        if mu is not None and not (isinstance(mu, (int, float)) and math.isfinite(mu)):
            raise ValueError(f"mu must be a finite number or None, got {mu!r}")
        if time_shift_type not in TIME_SHIFTS:
            raise ValueError(f"unknown time_shift_type {time_shift_type!r}; allowed: {', '.join(TIME_SHIFTS)}")
        if time_shift_type == "linear" and mu is not None and mu <= 0:
            raise ValueError(f"a linear time shift needs mu > 0, got {mu}")
        if shift_terminal is not None and not 0 < shift_terminal < 1:
            raise ValueError(f"shift_terminal must be in (0, 1) or None, got {shift_terminal!r}")
        self.shift, self.mu, self.time_shift_type = float(shift), mu, time_shift_type
        self.shift_terminal = shift_terminal
        self.name = "flow_matching"
        s = torch.arange(T, 0, -1, dtype=F64) / T  # [T] decreasing: s_i = i / T
        self.train_sigmas = s if mu is not None else self._static_shift(s)  # as diffusers' __init__

    @property
    def num_train_timesteps(self) -> int:
        return self.train_sigmas.numel()

    def _static_shift(self, s: torch.Tensor) -> torch.Tensor:
        return self.shift * s / (1 + (self.shift - 1) * s)

    def shifted(self, s) -> torch.Tensor:
        """The shift set_timesteps applies to a grid of levels s (then shift_terminal)."""
        s = torch.as_tensor(s, dtype=F64)
        if self.mu is None:
            s = self._static_shift(s)
        elif self.time_shift_type == "exponential":
            s = math.exp(self.mu) / (math.exp(self.mu) + (1 / s - 1))
        else:
            s = self.mu / (self.mu + (1 / s - 1))
        if self.shift_terminal is not None:
            if s.numel() < 2:
                raise ValueError("shift_terminal needs steps >= 2: a one-step grid is s = 1 alone, which cannot be "
                                 "stretched to end at shift_terminal (diffusers lists NaN there)")
            one_minus = 1 - s
            s = 1 - one_minus / (one_minus[-1] / (1 - self.shift_terminal))
        return s

    def default_sigmas(self, steps: int) -> torch.Tensor:
        """[N] flow levels of diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps(N)."""
        hi, lo = float(self.train_sigmas[0]), float(self.train_sigmas[-1])
        return self.shifted(torch.linspace(hi, lo, steps, dtype=F64))

    # the same interface as Schedule's (VE sigma <-> model timestep t = s * T)
    def sigma_at(self, t) -> torch.Tensor:
        s = torch.as_tensor(t, dtype=F64) / self.num_train_timesteps
        return s / (1 - s)

    def alphas_cumprod_at(self, t) -> torch.Tensor:
        return flow_level(torch.as_tensor(t, dtype=F64) / self.num_train_timesteps)

    def t_at(self, sigma) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=F64)
        s = torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))
        return s * self.num_train_timesteps

    def __repr__(self) -> str:
        opts = f"shift={self.shift:g}" if self.mu is None else f"mu={self.mu:g}, time_shift_type={self.time_shift_type}"
        if self.shift_terminal is not None:
            opts += f", shift_terminal={self.shift_terminal:g}"
        return f"FlowSchedule(num_train_timesteps={self.num_train_timesteps}, {opts})"
