"""A model's likelihood: the variational bound (Ho et al. 2020) in bits per dimension.

With zero-based timesteps t = 0..T-1 (the paper's t + 1) and D dimensions per sample,

    -ELBO = L_prior + sum_{t>=1} L_t + L_dec                                      (nats)
    L_prior = KL(q(x_T | x0) || N(0, I))                              closed form, no model call
    L_t     = KL(q(x_{t-1} | x_t, x0) || p_theta(x_{t-1} | x_t)),     x_t ~ q(x_t | x0)
    L_dec   = -log p_theta(x0 | x_1),                                 x_1 ~ q(x_1 | x0) (t = 0)

q(x_{t-1} | x_t, x0) = N(coef_x0 x0 + coef_xt x_t, var_q) is the posterior; p_theta has the
same mean with x0 replaced by the model's estimate D and the variance var_p = var_q
(fixed_small) or beta_t (fixed_large). The decoder is Ho et al.'s discretized Gaussian
N(D, decoder_variance) integrated over the bin of each 8-bit value in [-1, 1] (the end bins
reach to -inf and +inf), or a continuous Gaussian density (`decoder="gaussian"`).
Everything is reported in bits/dim (nats / (D ln 2)). Each L_t is a fused per-sample
reduction (kernels/gaussian_kl.py) over the model output; the per-timestep coefficients come
from the schedule tables kernel (kernels/schedule_tables.py) on the triton backend.

Every draw is keyed by the sample's seed: x_t at timestep t is
sqrt(abar_t) x0 + sqrt(1 - abar_t) z with z = rng.randn(seed, t, STREAM_ELBO) (all
timesteps), or z = rng.randn(seed, k, STREAM_ELBO) for the k-th of K Monte-Carlo timesteps
t_k = rng.randint(seed, 0, STREAM_ELBO_TIMESTEPS, K, T); with `draws` > 1, draw d keys
step t + d T (or k + d K). The same figures for a sample alone or in any batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import conditioning, rng
from .dtypes import MODEL_DTYPES
from .executors import resolve_backend
from .grids import karras_sigmas
from .loop import checked_output
from .rng import STREAM_DEQUANT, STREAM_ELBO, STREAM_ELBO_TIMESTEPS, STREAM_PROBE
from .schedules import Schedule
from .seeds import as_seeds
from .solvers.base import check_prediction, conversion

LN2 = math.log(2.0)
VARIANCES = ("fixed_small", "fixed_large")
DECODERS = ("discretized", "gaussian")


@dataclass(frozen=True)
class ELBO:
    """Per-sample figures in bits/dim (float64 [B]): bpd = prior + diffusion + decoder >= -log2 p(x0) / D.

    terms [B, T]: terms[:, 0] is the decoder term, terms[:, t] the KL L_t (all timesteps only);
    timesteps [B, K]: the Monte-Carlo timesteps drawn per sample (None when all were evaluated).
    """

    bpd: torch.Tensor
    prior: torch.Tensor
    diffusion: torch.Tensor
    decoder: torch.Tensor
    terms: torch.Tensor | None
    timesteps: torch.Tensor | None
    dims: int

    @property
    def nats(self) -> torch.Tensor:
        """-ELBO per sample in nats (the bound on -log p(x0))."""
        return self.bpd * self.dims * LN2


def posterior_tables(schedule: Schedule, device, backend: str) -> dict[str, torch.Tensor]:
    """Per-timestep float64 tables on `device`: the schedule tables kernel on the triton
    backend, the same formulas in torch otherwise (kernels/schedule_tables.py names them)."""
    betas = schedule.betas.to(device)
    if backend == "triton":
        from fastdiff.kernels import schedule_tables

        return schedule_tables(betas)
    abar = torch.cumprod(1.0 - betas, 0)
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    var = betas * (1.0 - abar_prev) / (1.0 - abar)
    return {
        "alphas_cumprod": abar,
        "posterior_variance": var,
        "posterior_log_variance_clipped": torch.cat([var[1:2], var[1:]]).log(),
        "posterior_mean_coef1": betas * abar_prev.sqrt() / (1.0 - abar),
        "posterior_mean_coef2": (1.0 - abar_prev) * (1.0 - betas).sqrt() / (1.0 - abar),
    }


def gaussian_kl_torch(x_t, x0, out, coef, rows_per_sample: int) -> torch.Tensor:
    """The torch reference of kernels/gaussian_kl.py: float32 math, float64 sums; [R] float64."""
    R = x_t.shape[0]
    c = coef.float()
    x0_rows = x0.reshape(x0.shape[0], -1).float().repeat_interleave(rows_per_sample, 0)
    D = c[:, 0:1] * x_t.reshape(R, -1).float() + c[:, 1:2] * out.reshape(R, -1).float()
    diff = c[:, 2:3] * (x0_rows - D)
    return c[:, 3].double() * diff.square().sum(1, dtype=torch.float64) + c[:, 4].double()


def normal_kl_to_standard(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, var) || N(0, 1)) per element (float64)."""
    return 0.5 * (var + mean.square() - 1.0 - var.log())


def log_gaussian_bin(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """log(Phi(hi) - Phi(lo)) for lo < hi (infinite ends allowed), accurate in both tails."""
    flip = lo > 0  # upper tail: Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi)
    a, b = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
    la, lb = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
    return lb + torch.log(-torch.expm1(la - lb))


def decoder_log_likelihood(x0: torch.Tensor, mean: torch.Tensor, var: float, decoder: str, bins: int) -> torch.Tensor:
    """log p(x0 | x_1) per sample [B] (float64): discretized (bins of width 2/(bins-1) over
    [-1, 1], the end bins open) or a continuous Gaussian density."""
    x, m = x0.double().flatten(1), mean.double().flatten(1)
    if decoder == "gaussian":
        return (-0.5 * (math.log(2 * math.pi * var) + (x - m).square() / var)).sum(1)
    half = 1.0 / (bins - 1)
    std = math.sqrt(var)
    lo = torch.where(x <= -1 + half / 2, torch.full_like(x, -math.inf), (x - half - m) / std)
    hi = torch.where(x >= 1 - half / 2, torch.full_like(x, math.inf), (x + half - m) / std)
    return log_gaussian_bin(lo, hi).sum(1)


def _check_discretized(x0: torch.Tensor, bins: int, what: str, alternative: str) -> None:
    if not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins must be an integer >= 2, got {bins!r}")
    k = (x0.double() + 1) * (bins - 1) / 2
    if bool((x0 < -1).any() or (x0 > 1).any()) or bool(((k - k.round()).abs() > 1e-3).any()):
        raise ValueError(f"{what} needs x0 in [-1, 1] on the {bins}-level grid -1 + 2k/{bins - 1} "
                         f"(quantize the data first), or use {alternative} for continuous data")


@torch.no_grad()
def elbo(model, schedule: Schedule, x0: torch.Tensor, *, prediction: str = "epsilon", cond: dict | None = None,
         seeds=None, timesteps: int | None = None, variance: str = "fixed_small", decoder: str = "discretized",
         bins: int = 256, decoder_variance: float | None = None, draws: int = 1, batch_timesteps: int = 25,
         backend: str = "auto", dtype: torch.dtype | None = None) -> ELBO:
    """The variational bound per sample in bits/dim (module docstring).

    timesteps: None evaluates every timestep (T model calls per sample, `batch_timesteps`
    timesteps of every sample per model call); an int K draws K timesteps per sample and
    returns the unbiased estimate T/K sum_k L_{t_k} of the sum over timesteps.
    draws: x_t draws per evaluated timestep, their terms averaged (the Monte-Carlo variance
    falls as 1/draws; draw d of slot j is keyed by step j + d * slots, so draws=1 is d = 0).
    seeds: one per sample (default 0..B-1). decoder_variance: default beta at t = 0 (the
    posterior variance there is 0). backend: 'triton' fuses the KL reduction and builds the
    tables on the device (the CUDA default), 'torch' runs the reference. dtype: the model
    input dtype (default the model's parameters' dtype, else float32).
    """
    dims, mdtype, seeds, cond = _inputs(model, schedule, x0, prediction, seeds, cond, dtype)
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; allowed: {', '.join(VARIANCES)}")
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; allowed: {', '.join(DECODERS)}")
    T = schedule.num_train_timesteps
    if T < 2:
        raise ValueError("elbo needs a schedule of at least 2 timesteps")
    if timesteps is not None and (not isinstance(timesteps, int) or isinstance(timesteps, bool) or timesteps < 1):
        raise ValueError(f"timesteps must be None (all) or a positive integer, got {timesteps!r}")
    for name, v in (("batch_timesteps", batch_timesteps), ("draws", draws)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if decoder == "discretized":
        _check_discretized(x0, bins, "decoder='discretized'", "decoder='gaussian'")
    dec_var = float(schedule.betas[0]) if decoder_variance is None else decoder_variance
    if not (isinstance(dec_var, (int, float)) and math.isfinite(dec_var) and dec_var > 0):
        raise ValueError(f"decoder_variance must be a positive number, got {decoder_variance!r}")

    B, device = x0.shape[0], x0.device
    backend = resolve_backend(backend, device, mdtype)
    x0 = x0.to(torch.float32).contiguous()

    tab = posterior_tables(schedule, device, backend)
    abar = tab["alphas_cumprod"]
    var_q = tab["posterior_variance"]
    log_var_q = tab["posterior_log_variance_clipped"]
    betas = schedule.betas.to(device)
    var_p, log_var_p = (var_q, log_var_q) if variance == "fixed_small" else (betas, betas.log())
    conv = torch.tensor([conversion(prediction, "vp", float(a))[1:] for a in schedule.alphas_cumprod],
                        dtype=torch.float64, device=device)  # [T, 2]: d_point, d_out
    # per timestep: [d_point, d_out, coef_x0, 1 / (2 var_p), N/2 (log var_p - log var_q + var_q / var_p - 1)]
    coef_t = torch.stack([conv[:, 0], conv[:, 1], tab["posterior_mean_coef1"], 0.5 / var_p,
                          0.5 * dims * (log_var_p - log_var_q + var_q / var_p - 1.0)], dim=1)
    coef_t[0, 3:] = 0.0  # t = 0 is the decoder's (var_q = 0 there): its KL row is unused

    prior = normal_kl_to_standard(abar[-1].sqrt() * x0.double().flatten(1), (1.0 - abar[-1]).expand(1)).sum(1)

    if timesteps is None:
        t_all = torch.arange(T, device=device)[None].expand(B, T)
        steps = t_all  # the noise of timestep t is keyed by step t
    else:
        t_all = rng.randint(seeds, 0, STREAM_ELBO_TIMESTEPS, timesteps, T, device=device)  # [B, K]
        steps = torch.arange(timesteps, device=device)[None].expand(B, timesteps)  # draw k keyed by step k
    K = t_all.shape[1]
    values = torch.zeros(B, K, dtype=torch.float64, device=device)
    for d in range(draws):
        for lo in range(0, K, batch_timesteps):
            hi = min(K, lo + batch_timesteps)
            values[:, lo:hi] += _terms(model, x0, seeds, cond, t_all[:, lo:hi], (steps[0, lo:hi] + d * K).tolist(),
                                       abar, coef_t, mdtype, backend, decoder, bins, dec_var)
    values = values / (draws * dims * LN2)
    prior = prior / (dims * LN2)
    is_dec = t_all == 0
    if timesteps is None:
        dec, diff, terms = values[:, 0], values[:, 1:].sum(1), values
    else:
        scale = T / K
        dec = scale * torch.where(is_dec, values, 0.0).sum(1)
        diff = scale * torch.where(is_dec, 0.0, values).sum(1)
        terms = None
    return ELBO(bpd=prior + diff + dec, prior=prior, diffusion=diff, decoder=dec, terms=terms,
                timesteps=None if timesteps is None else t_all, dims=dims)


def _inputs(model, schedule, x0, prediction, seeds, cond, dtype):
    """Checks shared by elbo and log_likelihood; (dims, model dtype, seeds [B], cond on x0's device)."""
    check_prediction(prediction)
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be a fastdiff.Schedule, got {type(schedule).__name__}")
    if not torch.is_tensor(x0) or x0.ndim < 2 or x0.shape[0] < 1:
        raise ValueError("x0 must be a tensor [B, ...] with B >= 1")
    B = x0.shape[0]
    mdtype = dtype or next((p.dtype for p in getattr(model, "parameters", lambda: [])() if p.is_floating_point()),
                           torch.float32)
    return (math.prod(x0.shape[1:]), mdtype, as_seeds(range(B) if seeds is None else seeds, B, x0.device),
            _check_cond(cond, B, x0.device))


def _check_cond(cond, B, device) -> dict:
    """cond as sample() takes it (nested, tensor leaves batched; fastdiff/conditioning.py), on `device`."""
    conditioning.check(cond, None, B)
    return conditioning.batched(cond, None, False, device)


def _terms(model, x0, seeds, cond, t, steps, abar, coef_t, mdtype, backend, decoder, bins, dec_var):
    """L_t (nats) for the timesteps t [B, k] of each sample: one model call on B*k rows."""
    B, k = t.shape
    S = x0.shape[1:]
    z = torch.stack([rng.randn(seeds, s, STREAM_ELBO, S, device=x0.device) for s in steps], 1)  # [B, k, *S]
    a = abar[t].reshape(B, k, *([1] * len(S)))
    x_t = (a.sqrt() * x0[:, None].double() + (1.0 - a).sqrt() * z.double()).to(mdtype).flatten(0, 1)  # [B*k, *S]
    rows = t.reshape(-1)
    kwargs = conditioning.map_tensors(lambda v: v.repeat_interleave(k, 0), cond)
    out = checked_output(model(x_t, rows.to(torch.float32), **kwargs), x_t)
    if not bool(torch.isfinite(out).all()):
        bad = rows[~torch.isfinite(out.flatten(1)).all(1)]
        raise FloatingPointError(f"non-finite model output at timestep {int(bad[0])}")
    coef = coef_t[rows]
    if backend == "triton":
        from fastdiff.kernels import gaussian_kl

        out_k = out if out.dtype in MODEL_DTYPES else out.float()  # e.g. a float64 output
        kl = gaussian_kl(x_t.contiguous(), x0, out_k.contiguous(), coef.float().contiguous(), k).double()
    else:
        kl = gaussian_kl_torch(x_t, x0, out, coef, k)
    kl = kl.reshape(B, k)
    dec_rows = t == 0
    if bool(dec_rows.any()):
        b_idx, j_idx = dec_rows.nonzero(as_tuple=True)
        r = b_idx * k + j_idx
        D = coef[r, 0].reshape(-1, *([1] * len(S))) * x_t[r].double() + \
            coef[r, 1].reshape(-1, *([1] * len(S))) * out[r].double()  # the mean: coef_x0 = 1, coef_xt = 0 at t = 0
        kl[b_idx, j_idx] = -decoder_log_likelihood(x0[b_idx], D, dec_var, decoder, bins)
    return kl


# ---- the probability-flow ODE log-likelihood --------------------------------------------

ODE_SOLVERS = ("heun", "euler")
PROBES = ("rademacher", "gaussian")


@dataclass(frozen=True)
class ODELikelihood:
    """Per sample (float64 [B]): nats = -log p(x0) (with dequantization: the bound
    -E_u log p(x0 + u), u uniform over the bin), bpd = bits/dim (with `bins`: of the
    discrete data, the bin width accounted for; else of the density), log_prior =
    log N(y_T; 0, (1 + s_max^2) I), delta = the integral of the divergence (log p(x0) =
    log_prior + delta)."""

    nats: torch.Tensor
    bpd: torch.Tensor
    log_prior: torch.Tensor
    delta: torch.Tensor
    dims: int


@torch.no_grad()
def log_likelihood(model, schedule: Schedule, x0: torch.Tensor, *, steps: int = 50, solver: str = "heun",
                   probes: int = 1, probe: str = "rademacher", exact_trace: bool = False, seeds=None,
                   prediction: str = "epsilon", cond: dict | None = None, dequantize: bool = False,
                   bins: int | None = None, rho: float = 7.0, dtype: torch.dtype | None = None) -> ODELikelihood:
    """log p(x0) by the instantaneous change of variables along the probability-flow ODE
    (Song et al. 2021, sec. 4.3), in VE coordinates y = x_t / alpha_t, s = sigma_t / alpha_t:

        dy/ds = f(y, s) = (y - D(y, s)) / s,   div f = (N - tr dD/dy) / s,   f(y, 0) = 0
        log p(x0) = log N(y(s_max); 0, (1 + s_max^2) I) + int_0^{s_max} div f(y(s), s) ds

    integrated upward over [0] + Karras' sigmas (`steps` intervals, rho) with Heun's method
    (2 model calls per interval but the first, which starts at s = 0 where f = 0) or Euler's.
    tr dD/dy: exact (exact_trace, N vector-Jacobian products batched: small N only) or the
    Skilling-Hutchinson estimate mean_k e_k^T (dD/dy) e_k over `probes` Rademacher or Gaussian
    probes, fresh per evaluation, keyed by (seed, evaluation, STREAM_PROBE): unbiased for the
    same discretized solve. dequantize: x0 on the `bins`-level grid over [-1, 1] (default 256)
    plus uniform noise over its bin, keyed by (seed, STREAM_DEQUANT).
    """
    N, mdtype, seeds, cond = _inputs(model, schedule, x0, prediction, seeds, cond, dtype)
    if solver not in ODE_SOLVERS:
        raise ValueError(f"unknown solver {solver!r} for log_likelihood; allowed: {', '.join(ODE_SOLVERS)}")
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; allowed: {', '.join(PROBES)}")
    for name, v in (("steps", steps), ("probes", probes)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if dequantize and bins is None:
        bins = 256
    if bins is not None:
        _check_discretized(x0, bins, "dequantize or bins", "bins=None")
    B, S, device = x0.shape[0], tuple(x0.shape[1:]), x0.device
    work = torch.float64 if mdtype == torch.float64 else torch.float32
    y = x0.to(work)
    if dequantize:  # u = Phi(z) - 1/2 is uniform on (-1/2, 1/2) for z ~ N(0, 1)
        z = rng.randn(seeds, 0, STREAM_DEQUANT, S, device=device).double()
        y = (x0.double() + (torch.special.ndtr(z) - 0.5) * (2.0 / (bins - 1))).to(work)
    K = N if exact_trace else probes  # rows per sample in each model call
    kwargs = conditioning.map_tensors(lambda v: v.repeat_interleave(K, 0), cond)
    s_max = schedule.sigma_max
    grid = [0.0] + karras_sigmas(schedule.sigma_min, s_max, steps, rho).flip(0).tolist()  # increasing
    calls = 0

    def drift(y: torch.Tensor, s: float) -> tuple[torch.Tensor, torch.Tensor]:
        """f(y, s) [B, *S] and div f [B] (float64)."""
        nonlocal calls
        if s == 0.0:
            return torch.zeros_like(y), torch.zeros(B, dtype=torch.float64, device=device)
        abar = 1.0 / (1.0 + s * s)
        c_in, d_point, d_out = conversion(prediction, "ve", abar)
        if exact_trace:  # the N basis vectors, for every sample
            e = torch.eye(N, dtype=work, device=device).reshape(N, *S).repeat(B, *([1] * len(S)))
        else:
            e = rng.randn(seeds, calls, STREAM_PROBE, (K, *S), device=device).to(work).flatten(0, 1)
            if probe == "rademacher":
                e = torch.where(e >= 0, 1.0, -1.0).to(work)
        calls += 1
        t = torch.full((B * K,), float(schedule.t_at(s)), dtype=torch.float32, device=device)
        with torch.enable_grad():
            y_rows = y.repeat_interleave(K, 0).detach().requires_grad_(True)
            model_in = (c_in * y_rows).to(mdtype)
            out = checked_output(model(model_in, t, **kwargs), model_in)
            D = d_point * y_rows + d_out * out.to(work)
            (vjp,) = torch.autograd.grad((D * e).sum(), y_rows)
        if not bool(torch.isfinite(out).all()):
            raise FloatingPointError(f"non-finite model output at sigma {s:g} (timestep {float(t[0]):g})")
        quad = (vjp * e).flatten(1).sum(1, dtype=torch.float64).reshape(B, K)  # e_k^T (dD/dy) e_k
        trace = quad.sum(1) if exact_trace else quad.mean(1)
        D0 = D.detach()[::K]
        return (y - D0) / s, (N - trace) / s

    delta = torch.zeros(B, dtype=torch.float64, device=device)
    for s_a, s_b in zip(grid[:-1], grid[1:]):
        h = s_b - s_a
        f_a, div_a = drift(y, s_a)
        if solver == "euler":
            y, delta = y + h * f_a, delta + h * div_a
            continue
        f_b, div_b = drift(y + h * f_a, s_b)
        y, delta = y + h * (f_a + f_b) / 2, delta + h * (div_a + div_b) / 2
    var_T = 1.0 + s_max * s_max
    log_prior = -0.5 * (y.double().flatten(1).square().sum(1) / var_T + N * math.log(2 * math.pi * var_T))
    nats = -(log_prior + delta)
    bpd = (nats if bins is None else nats - N * math.log(2.0 / (bins - 1))) / (N * LN2)
    return ODELikelihood(nats=nats, bpd=bpd, log_prior=log_prior, delta=delta, dims=N)

