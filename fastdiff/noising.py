"""Forward noising q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), for img2img and training;
on a flow-matching schedule x_s = (1 - s) x_0 + s z at t = s * T (the same draw, rescaled)."""
from __future__ import annotations

import torch

from . import rng
from .checks import check_finite_tensor
from .executors import resolve_backend
from .seeds import as_seeds
from .schedules import FlowSchedule, Schedule, flow_sigma
from .rng import STREAM_FORWARD


def _abar_per_sample(t, schedule: Schedule, batch: int) -> torch.Tensor:
    T = schedule.num_train_timesteps
    if isinstance(t, (str, bytes, bool)) or (torch.is_tensor(t) and (t.is_complex() or t.dtype == torch.bool)):
        raise ValueError(f"t must be a number or a tensor of timesteps, got {t!r:.60}")
    try:
        t = torch.as_tensor(t, dtype=torch.float64, device="cpu" if not torch.is_tensor(t) else t.device)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"t must be a number or a tensor of timesteps, got {t!r:.60}") from None
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must be a scalar or have shape [{batch}], got {tuple(t.shape)}")
    if schedule.process == "flow":
        if not bool(((t >= 0) & (t < T)).all()):  # NaN fails too
            raise ValueError(f"t must be finite and lie in [0, {T}) on a flow schedule "
                             "(t = s * T; s = 1 is pure noise)")
        return schedule.alphas_cumprod_at(t.cpu()).to(t.device)
    if not bool(((t >= 0) & (t <= T - 1)).all()):  # NaN fails too
        raise ValueError(f"t must be finite and lie in [0, {T - 1}]")
    abar_table = schedule.alphas_cumprod.to(t.device)
    if bool((t == t.round()).all()):
        return abar_table[t.long()]
    return schedule.alphas_cumprod_at(t.cpu()).to(t.device)


def add_noise(x0: torch.Tensor, t, schedule: Schedule, *, noise: torch.Tensor | None = None,
              seeds=None, step: int = 0, backend: str = "auto") -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) z, with t a scalar or per-sample [B].

    z is `noise` when given, else counter-based noise keyed by (seeds[b], step,
    STREAM_FORWARD, element): the same on every device and batch composition.
    backend "triton" (the default on CUDA) draws z inside one fused kernel.
    x0 (and noise) must be finite floating-point tensors: checked here, one host read.
    """
    if not isinstance(schedule, (Schedule, FlowSchedule)):
        raise ValueError(f"schedule must be a fastdiff.Schedule or FlowSchedule, got {type(schedule).__name__}")
    check_finite_tensor("x0", x0)
    if noise is not None:
        check_finite_tensor("noise", noise)
    abar = _abar_per_sample(t, schedule, x0.shape[0])
    x_t = noise_to_level(x0, abar, noise=noise, seeds=seeds, step=step, backend=backend)
    if schedule.process == "flow":  # VP x_t -> flow units: times 1 / (alpha + sigma) = sqrt((1 - s)^2 + s^2)
        s = flow_sigma(abar)
        x_t = (x_t.double() * ((1 - s) ** 2 + s**2).sqrt().reshape(-1, *([1] * (x0.ndim - 1)))).to(x0.dtype)
    return x_t


def noise_to_level(x0: torch.Tensor, abar, *, noise: torch.Tensor | None = None, seeds=None, step: int = 0,
                   backend: str = "auto") -> torch.Tensor:
    """add_noise at explicit per-sample levels abar [B] (or a scalar) instead of timesteps."""
    B = x0.shape[0]
    abar = torch.as_tensor(abar, dtype=torch.float64).to(x0.device)
    abar = abar.expand(B) if abar.ndim == 0 else abar
    if abar.shape != (B,):
        raise ValueError(f"abar must be a scalar or have shape [{B}], got {tuple(abar.shape)}")
    if noise is None and seeds is None:
        raise ValueError("add_noise needs either noise or seeds")
    if noise is not None and noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
    backend = resolve_backend(backend, x0.device, x0.dtype)
    if seeds is not None:
        seeds = as_seeds(seeds, B, x0.device)
    if backend == "triton":
        from fastdiff.kernels import forward_noise

        if seeds is None:
            seeds = torch.zeros(B, dtype=torch.int64, device=x0.device)
        # the kernel reads flat rows: a permuted image (NHWC data viewed as NCHW) is copied first
        return forward_noise(x0.contiguous(), abar, seeds, step=step,
                             noise=None if noise is None else noise.contiguous())
    if noise is None:
        noise = rng.randn(seeds, step, STREAM_FORWARD, x0.shape[1:], device=x0.device)
    shape = (B,) + (1,) * (x0.ndim - 1)
    out = abar.sqrt().reshape(shape) * x0.double() + (1.0 - abar).sqrt().reshape(shape) * noise.double()
    return out.to(x0.dtype)
