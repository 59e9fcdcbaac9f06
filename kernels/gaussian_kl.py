"""The variational bound's denoising terms (Ho et al. 2020, eq. 5), fused: one pass over the
model output, one program per row, a per-row float32 sum.

Row r holds x_t for sample s(r) = r // rows_per_sample at one timestep; per-row scalars
coef[r] = [d_point, d_out, coef_x0, weight, const]:

    D        = d_point * x_t + d_out * out                  (the model's x0 estimate)
    mu_q     = coef_x0 * x0[s(r)] + coef_xt * x_t           (posterior mean of q(x_{t-1} | x_t, x0))
    mu_theta = coef_x0 * D        + coef_xt * x_t           (the model's mean, same coefficients)
    kl[r]    = weight * sum_e (mu_q - mu_theta)^2 + const
             = weight * sum_e (coef_x0 * (x0 - D))^2 + const

with weight = 1 / (2 var_p) and const = N/2 (log var_p - log var_q + var_q / var_p - 1) the
KL(N(mu_q, var_q) || N(mu_theta, var_p)) of N elements. The coef_xt * x_t terms cancel
exactly, so the difference is formed as coef_x0 (x0 - D): the same value without float32
cancellation. fp32 math; each row is summed by one program in a fixed order (BLOCK-wide
partial sums, then one tl.sum), so a row's value does not depend on the other rows.
"""
import torch
import triton
import triton.language as tl

from fastdiff.devices import on_device
from fastdiff.dtypes import MODEL_DTYPES

NCOEF = 5  # d_point, d_out, coef_x0, weight, const


@triton.jit
def _gaussian_kl_kernel(x_t_ptr, x0_ptr, out_ptr, coef_ptr, kl_ptr, N, rows_per_sample, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    s = r // rows_per_sample
    c = coef_ptr + r * 5
    d_point = tl.load(c + 0)
    d_out = tl.load(c + 1)
    coef_x0 = tl.load(c + 2)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, N, BLOCK):
        e = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = e < N
        x_t = tl.load(x_t_ptr + r * N + e, mask=mask, other=0.0).to(tl.float32)
        o = tl.load(out_ptr + r * N + e, mask=mask, other=0.0).to(tl.float32)
        x0 = tl.load(x0_ptr + s * N + e, mask=mask, other=0.0).to(tl.float32)
        diff = coef_x0 * (x0 - (d_point * x_t + d_out * o))
        acc += tl.where(mask, diff * diff, 0.0)
    tl.store(kl_ptr + r, tl.load(c + 3) * tl.sum(acc, axis=0) + tl.load(c + 4))


def gaussian_kl(x_t: torch.Tensor, x0: torch.Tensor, out: torch.Tensor, coef: torch.Tensor,
                rows_per_sample: int) -> torch.Tensor:
    """kl [R] float32 (module docstring); x_t, out [R, *S] (model dtypes), x0 [R / rows_per_sample, *S]
    float32, coef [R, 5] float32, rows of one sample adjacent (row r belongs to r // rows_per_sample)."""

    def check(cond, msg):
        if not cond:
            raise ValueError(f"gaussian_kl: {msg}")

    check(isinstance(rows_per_sample, int) and rows_per_sample >= 1, "rows_per_sample must be a positive int")
    for name, t in (("x_t", x_t), ("out", out)):
        check(isinstance(t, torch.Tensor) and t.dtype in MODEL_DTYPES and t.dim() >= 1 and t.is_contiguous(),
              f"{name} must be a contiguous [R, *S] tensor of dtype {', '.join(map(str, MODEL_DTYPES))}")
    R = x_t.shape[0]
    check(out.shape == x_t.shape, f"out shape {tuple(out.shape)} != x_t shape {tuple(x_t.shape)}")
    check(R % rows_per_sample == 0, f"R={R} rows is not a multiple of rows_per_sample={rows_per_sample}")
    check(isinstance(x0, torch.Tensor) and x0.dtype == torch.float32 and x0.is_contiguous()
          and x0.shape == (R // rows_per_sample, *x_t.shape[1:]),
          f"x0 must be a contiguous float32 [{R // rows_per_sample}, *S] tensor, got {tuple(x0.shape)} {x0.dtype}")
    check(isinstance(coef, torch.Tensor) and coef.dtype == torch.float32 and coef.shape == (R, NCOEF)
          and coef.is_contiguous(), f"coef must be a contiguous float32 [{R}, {NCOEF}] tensor")
    check(all(t.device == x_t.device for t in (x0, out, coef)), "all tensors must be on one device")
    kl = torch.empty(R, dtype=torch.float32, device=x_t.device)
    N = x_t[0].numel() if R else 0
    if R == 0:
        return kl
    BLOCK = min(1024, max(16, triton.next_power_of_2(N)))
    with on_device(x_t):
        _gaussian_kl_kernel[(R,)](x_t, x0, out, coef, kl, N, rows_per_sample, BLOCK=BLOCK, num_warps=4)
    return kl
