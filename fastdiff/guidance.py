"""Guidance and thresholding: what happens to the model output before the affine step.

    classifier-free (Ho & Salimans 2022):  out = u + w (c - u)    from one [uncond; cond] call
    guidance over time:                     w[r, b] = f(sigma_r) * s_b at rows whose model-call
                                            sigma lies in [lo, hi] (Kynkaenniemi et al. 2024's
                                            interval), else w = 1: out = c, a [B] call on the
                                            conditional half only (see `row_guidance`)
    rescaled CFG (Lin et al. 2023, eq. 16): out <- phi * out * std(c)/std(out) + (1 - phi) * out
    classifier (Dhariwal & Nichol 2021):   score += s * grad log p(y | x_t), i.e.
                                            D <- D + s * sigma^2 / alpha * grad
    clip_sample:                            D <- clamp(D, -r, r)
    dynamic thresholding (Saharia et al. 2022): q = quantile(|D|, ratio) per sample,
                                            s = clamp(q, 1, max_value), D <- clamp(D, -s, s) / s
The per-sample reductions (std, quantile) are device ops with no host sync; the fused
kernel takes their results as per-sample multipliers.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .checks import check_number


@dataclass(frozen=True)
class Thresholding:
    clip: float | None = None  # static clip range r, or None
    dynamic_ratio: float | None = None  # Imagen's percentile, or None
    max_value: float = 1.0

    def __post_init__(self):
        if self.clip is not None:
            check_number("clip_range", self.clip, 0, math.inf, hi_open=True)
        if self.dynamic_ratio is not None:
            check_number("dynamic_thresholding_ratio", self.dynamic_ratio, 0, 1)
        check_number("sample_max_value", self.max_value, 1, math.inf, lo_open=False, hi_open=True)

    @property
    def plain(self) -> bool:
        """No thresholding: D is D_raw."""
        return self.clip is None and self.dynamic_ratio is None


def check_guidance_interval(interval) -> tuple[float, float] | None:
    """None, or (sigma_lo, sigma_hi) in VE sigma units with 0 <= lo <= hi (hi may be inf)."""
    if interval is None:
        return None
    bad = ValueError(f"guidance_interval must be (sigma_lo, sigma_hi) with 0 <= sigma_lo <= sigma_hi "
                     f"(VE sigmas; sigma_hi may be inf), got {interval!r}")
    if isinstance(interval, (str, bytes)) or not hasattr(interval, "__len__") or len(interval) != 2:
        raise bad
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in interval):
        raise bad
    lo, hi = float(interval[0]), float(interval[1])
    if math.isnan(lo) or math.isnan(hi) or not 0 <= lo <= hi or lo == math.inf:
        raise bad
    return lo, hi


def row_guidance(sigmas: list[float], schedule, scale, interval) -> list[float | None]:
    """Per table row, what the host knows of its guidance weight w[r, b] = f_r * s_b.

    None: the row is unguided, w = 1 exactly, so the model is called on the conditional half
    only ([B] rows, not [2B]): rows whose model-call sigma lies outside `interval`, and rows
    whose weight is known on the host to be exactly 1 for every sample (a schedule's value
    times a number scale). Otherwise the float f_r = schedule(sigma_r) (1 without one), times
    `scale` when that is a number; a [B] tensor `scale` (s_b) is a device value the host
    cannot read without a sync, so its rows stay guided ([2B]) whatever f_r is.
    """
    lo, hi = interval if interval is not None else (0.0, math.inf)
    per_sample_scale = torch.is_tensor(scale)
    rows = []
    for s in sigmas:
        if not lo <= s <= hi:
            rows.append(None)
            continue
        f = 1.0
        if schedule is not None:
            f = schedule(s)
            if not isinstance(f, numbers.Real) or isinstance(f, bool) or not math.isfinite(f):
                raise ValueError(f"guidance_scale({s:g}) returned {f!r}; a guidance schedule must return a "
                                 "finite number for every sigma")
            f = float(f)
        if not per_sample_scale:
            f *= float(scale)
        rows.append(None if f == 1.0 and not per_sample_scale else f)
    return rows


def per_sample(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] for broadcasting over a sample."""
    return v.reshape(v.shape[0], *([1] * (ndim - 1)))


def cfg_combine(out: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[2B, ...] = [uncond; cond] -> u + w (c - u), in float32; w: [B]."""
    B = out.shape[0] // 2
    u, c = out[:B].float(), out[B:].float()
    return u + per_sample(w, u.ndim) * (c - u)


def rescale_factor(out: torch.Tensor, guided: torch.Tensor, phi: float) -> torch.Tensor:
    """[B] multiplier m with out' = m * guided (Lin et al.'s rescale, folded)."""
    B = out.shape[0] // 2
    dims = tuple(range(1, guided.ndim))
    std_c = out[B:].float().std(dim=dims)
    std_g = guided.std(dim=dims)
    return phi * std_c / std_g + (1 - phi)


def dynamic_threshold(D: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """[B] thresholds s (>= 1) for D <- clamp(D, -s, s) / s."""
    flat = D.abs().reshape(D.shape[0], -1).float()
    s = torch.quantile(flat, ratio, dim=1)
    return s.clamp(min=1.0, max=max_value)


def apply_threshold(D_raw: torch.Tensor, th: Thresholding) -> torch.Tensor:
    if th.dynamic_ratio is not None:
        s = per_sample(dynamic_threshold(D_raw, th.dynamic_ratio, th.max_value), D_raw.ndim)
        return torch.maximum(torch.minimum(D_raw, s), -s) / s
    if th.clip is not None:
        return D_raw.clamp(-th.clip, th.clip)
    return D_raw


def classifier_grad(classifier, x_in: torch.Tensor, t: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """grad_x sum_b log p(y_b | x_b, t) for a user callable returning log-probabilities [B]."""
    with torch.enable_grad():
        x = x_in.detach().float().requires_grad_(True)
        logp = classifier(x, t, **kwargs)
        if logp.shape != (x.shape[0],):
            raise ValueError(f"classifier must return log p(y|x_t) of shape [{x.shape[0]}], got {tuple(logp.shape)}")
        (grad,) = torch.autograd.grad(logp.sum(), x)
    return grad


def classifier_guided(out: torch.Tensor, grad: torch.Tensor, scale: float, abar: float,
                      d_out: float) -> torch.Tensor:
    """The model output shifted so that D += s sigma^2/alpha grad log p(y|x_t) (d_out: D per unit
    of output at this row). grad: classifier_grad of the conditional half [B]; out: [B] or [uncond; cond]."""
    alpha, sigma = math.sqrt(abar), math.sqrt(max(1.0 - abar, 0.0))
    shift = scale * sigma * sigma / alpha * grad / d_out
    if out.shape[0] == 2 * grad.shape[0]:
        shift = torch.cat([shift, shift])  # guidance weights sum to one: shifts the result
    return (out.float() + shift).to(out.dtype)
