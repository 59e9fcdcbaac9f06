"""Schedule precomputation on the device, float64, one program (T <= a few thousand).

    alpha_t = 1 - beta_t,  abar_t = prod_{s<=t} alpha_s  (a scan),  abar_prev = abar_{t-1} (abar_prev_0 = 1)
    sqrt_alphas_cumprod = sqrt(abar),  sqrt_one_minus_alphas_cumprod = sqrt(1 - abar)
    log_snr = log(abar / (1 - abar)),  sigma_ve = sqrt((1 - abar) / abar)
    posterior (Ho et al. 2020, q(x_{t-1} | x_t, x_0) for consecutive timesteps):
      posterior_variance = beta_t (1 - abar_prev) / (1 - abar_t)
      posterior_log_variance_clipped = log(var) with var_0 (= 0) replaced by var_1 (DDPM's code)
      posterior_mean_coef1 = beta_t sqrt(abar_prev) / (1 - abar_t)        (x0 coefficient)
      posterior_mean_coef2 = (1 - abar_prev) sqrt(alpha_t) / (1 - abar_t)  (x_t coefficient)
"""
import torch
import triton
import triton.language as tl

from fastdiff.devices import on_device

NAMES = (
    "alphas_cumprod",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_snr",
    "sigma_ve",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
MAX_T = 8192  # one program holds the whole schedule in registers


@triton.jit
def _mul(a, b):
    return a * b


@triton.jit
def _schedule_tables_kernel(betas_ptr, out_ptr, T, BLOCK: tl.constexpr):
    t = tl.arange(0, BLOCK)
    mask = t < T
    beta = tl.load(betas_ptr + t, mask=mask, other=0.0)
    # beta_{t-1}, with beta_{-1} = 0 so that the exclusive product starts at 1
    beta_prev = tl.load(betas_ptr + t - 1, mask=mask & (t >= 1), other=0.0)
    alpha = 1.0 - beta
    abar = tl.associative_scan(alpha, 0, _mul)
    abar_prev = tl.associative_scan(1.0 - beta_prev, 0, _mul)

    one_minus = 1.0 - abar
    var = beta * (1.0 - abar_prev) / one_minus
    var1 = tl.sum(tl.where(t == 1, var, 0.0), axis=0)
    log_var = tl.log(tl.where(t == 0, var1, tl.where(mask, var, 1.0)))  # padding: log(1)

    tl.store(out_ptr + 0 * T + t, abar, mask=mask)
    tl.store(out_ptr + 1 * T + t, tl.sqrt(abar), mask=mask)
    tl.store(out_ptr + 2 * T + t, tl.sqrt(one_minus), mask=mask)
    tl.store(out_ptr + 3 * T + t, tl.log(abar / one_minus), mask=mask)
    tl.store(out_ptr + 4 * T + t, tl.sqrt(one_minus / abar), mask=mask)
    tl.store(out_ptr + 5 * T + t, var, mask=mask)
    tl.store(out_ptr + 6 * T + t, log_var, mask=mask)
    tl.store(out_ptr + 7 * T + t, beta * tl.sqrt(abar_prev) / one_minus, mask=mask)
    tl.store(out_ptr + 8 * T + t, (1.0 - abar_prev) * tl.sqrt(alpha) / one_minus, mask=mask)


def schedule_tables(betas: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-timestep tables (module docstring) from betas [T] float64: dict of [T] float64."""
    if not isinstance(betas, torch.Tensor) or betas.dtype != torch.float64 or betas.dim() != 1:
        raise ValueError(f"schedule_tables: betas must be a float64 [T] tensor, got {getattr(betas, 'dtype', type(betas))}")
    T = betas.shape[0]
    if not 2 <= T <= MAX_T:
        raise ValueError(f"schedule_tables: need 2 <= T <= {MAX_T}, got {T}")
    betas = betas.contiguous()
    out = torch.empty(len(NAMES), T, dtype=torch.float64, device=betas.device)
    BLOCK = triton.next_power_of_2(T)
    with on_device(betas):
        _schedule_tables_kernel[(1,)](betas, out, T, BLOCK=BLOCK, num_warps=4 if BLOCK <= 1024 else 8)
    return dict(zip(NAMES, out.unbind(0)))
