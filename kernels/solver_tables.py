"""Solver coefficient tables on the device, float64: the StepTable columns of the
one-row-per-step solvers (fastdiff.solvers.table), elementwise over steps.

Row i reads its own levels a = abar[i] (the model's), a' = abar_to[i] (where it lands),
its timestep t[i] and, for DPM-Solver++(2M), the previous step's level abar[i-1].
Columns: state = [x, D, D_raw, H0, H1, H2, z] (H1 = H2 = 0 here), then

    conversion (base.conversion), alpha = sqrt(a), sigma = sqrt(1 - a), s = sigma / alpha:
      VP: c_in = 1      epsilon: (d_point, d_out) = (1/alpha, -sigma/alpha)  v: (alpha, -sigma)
      VE: c_in = alpha  epsilon: (1, -sigma/alpha)                           v: (alpha^2, -sigma)
      sample: (0, 1)
    ddpm:  beta = 1 - a/a',  x = sqrt(1 - beta)(1 - a')/(1 - a),  D = sqrt(a') beta/(1 - a)
           z = sqrt(var) where t > 0,  var = max((1 - a')/(1 - a) beta, 1e-20) | beta (fixed_large)
    ddim:  std = eta sqrt((1 - a')/(1 - a)) sqrt(1 - a/a'),  dir = sqrt(max(1 - a' - std^2, 0))
           x = dir/sigma,  D = sqrt(a'),  D_raw = -dir alpha/sigma,  z = std (eta > 0)
    euler: x = s'/s,  D = 1 - s'/s
    euler_ancestral: s_up = sqrt(s'^2 (s^2 - s'^2)/s^2),  s_down = sqrt(s'^2 - s_up^2)
           x = s_down/s,  D = 1 - s_down/s,  z = s_up
    dpmpp_2m (VP levels alpha, sigma, lambda = log alpha - log sigma; h = lambda' - lambda):
           ODE: x = sigma'/sigma,  d = -alpha' (e^{-h} - 1),  z = 0
           SDE: x = sigma'/sigma e^{-h},  d = alpha' (1 - e^{-2h}),  z = sigma' sqrt(1 - e^{-2h})
           order 1: D = d;  order 2 (r = (lambda - lambda_{i-1})/h): D = d (1 + 1/(2r)), H0 = -d/(2r)
           order 1 at i = 0, and at i = N-1 when a' >= 1 or (lower_order_final and N < 15)

Every operation is the host builder's, in the same order and without fma contraction, so
the IEEE ones (+ - * / sqrt) round identically; only log/exp (DPM-Solver++) may differ by
an ulp. fp64 values not exact in fp32 come from tl.full or the params tensor, never from a
Python literal or float argument (Triton would round them to fp32 first).
"""
import torch
import triton
import triton.language as tl

from fastdiff.devices import on_device
from fastdiff.grids import SPACINGS
from fastdiff.solvers.base import PREDICTIONS, check_prediction
from fastdiff.solvers.ddpm import VARIANCES
from fastdiff.solvers.table import NCOL

SOLVERS = ("ddpm", "ddim", "euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde")
COLUMNS = ("c_in", "d_point", "d_out", "sigma")  # the per-row scalars besides `state`
# domain errors the host builders raise, by precedence (the launcher reports the highest)
ERR_ZERO_SNR_EPSILON, ERR_ETA, ERR_SIGMA = 1, 2, 3
_ERR_EPS, _ERR_ETA, _ERR_SIGMA = (tl.constexpr(k) for k in (ERR_ZERO_SNR_EPSILON, ERR_ETA, ERR_SIGMA))
_NCOL = tl.constexpr(NCOL)
_INF = tl.constexpr(float("inf"))
_DDPM, _DDIM, _EULER, _EULER_A, _DPMPP = (tl.constexpr(k) for k in range(5))
_KIND = {"ddpm": 0, "ddim": 1, "euler": 2, "euler_ancestral": 3, "dpmpp_2m": 4, "dpmpp_2m_sde": 4}
_EPS, _SAMPLE, _V = (tl.constexpr(k) for k in range(3))
MAX_BLOCK = 1024  # steps per program: one program for any usual grid


@triton.jit
def _vp_levels(a):
    # (alpha, sigma, lambda), lambda = +inf at a = 1 and -inf at a = 0 (base.vp_levels)
    alpha = tl.sqrt(a)
    sigma = tl.sqrt(tl.maximum(1.0 - a, 0.0))
    lam = tl.log(tl.where(alpha == 0, 1.0, alpha)) - tl.log(tl.where(sigma == 0, 1.0, sigma))
    lam = tl.where(sigma == 0, _INF, tl.where(alpha == 0, -_INF, lam))
    return alpha, sigma, lam


@triton.jit
def _solver_table_kernel(
    abar_ptr, abar_to_ptr, t_ptr, params_ptr, state_ptr, cols_ptr, err_ptr, init_ptr, N, last_first_order,
    SOLVER: tl.constexpr, PRED: tl.constexpr, SDE: tl.constexpr, FIXED_LARGE: tl.constexpr,
    SECOND_ORDER: tl.constexpr, LEADING: tl.constexpr, BLOCK: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < N
    # padding lanes get harmless levels (no inf/nan warnings in the interpreter)
    a = tl.load(abar_ptr + i, mask=mask, other=0.5)
    a_to = tl.load(abar_to_ptr + i, mask=mask, other=0.75)
    t = tl.load(t_ptr + i, mask=mask, other=0.0)
    eta = tl.load(params_ptr)
    zero = tl.zeros_like(a)
    err = tl.zeros_like(i)
    H0 = zero
    D_raw = zero
    z = zero
    VE: tl.constexpr = SOLVER == _EULER or SOLVER == _EULER_A

    # prediction type -> (c_in, d_point, d_out) at this row's level
    alpha = tl.sqrt(a)
    sigma = tl.sqrt(1.0 - a)
    c_in = alpha if VE else zero + 1.0
    if PRED == _SAMPLE:
        d_point = zero
        d_out = zero + 1.0
    elif PRED == _EPS:
        d_point = zero + 1.0 if VE else 1.0 / alpha
        d_out = -sigma / alpha
        if not VE:
            err = tl.where(alpha == 0, _ERR_EPS, err)
    else:
        d_point = alpha * alpha if VE else alpha
        d_out = -sigma
    sigma_ve = tl.where(a > 0, tl.sqrt((1 - a) / tl.where(a > 0, a, 1.0)), _INF)

    if SOLVER == _DDPM:
        beta = 1.0 - a / a_to
        x = tl.sqrt(1.0 - beta) * (1.0 - a_to) / (1.0 - a)
        D = tl.sqrt(a_to) * beta / (1.0 - a)
        if FIXED_LARGE:
            var = beta
        else:
            var = tl.maximum((1.0 - a_to) / (1.0 - a) * beta, tl.full((), 1e-20, tl.float64))
        z = tl.where(t > 0, tl.sqrt(var), 0.0)
    elif SOLVER == _DDIM:
        std = eta * tl.sqrt((1 - a_to) / (1 - a)) * tl.sqrt(1 - a / a_to)
        rem = 1 - a_to - std * std
        err = tl.where(rem < -tl.full((), 1e-12, tl.float64), _ERR_ETA, err)
        direction = tl.sqrt(tl.maximum(rem, 0.0))
        # eps_raw = (x - alpha D_raw) / sigma, folded into the x and D_raw columns
        x = direction / sigma
        D = tl.sqrt(a_to)
        D_raw = -direction * alpha / sigma
        z = tl.where(eta > 0, std, 0.0)
    elif VE:
        s = sigma_ve
        s_to = tl.sqrt((1 - a_to) / a_to)
        err = tl.where((s > 0) & (s < _INF), err, _ERR_SIGMA)
        s = tl.where(err == _ERR_SIGMA, 1.0, s)  # keeps the bad rows quiet; the launcher raises
        if SOLVER == _EULER:
            x = s_to / s
        else:
            s_up = tl.sqrt(s_to * s_to * (s * s - s_to * s_to) / (s * s))
            x = tl.sqrt(s_to * s_to - s_up * s_up) / s
            z = s_up
        D = 1 - x
        # x_T = init_noise_sigma * noise: diffusers' Euler family uses sqrt(s^2 + 1) under leading
        init = tl.sqrt(s * s + 1) if LEADING else s
        tl.store(init_ptr + i * 0, init, mask=i == 0)
    else:
        alpha_s, sigma_s, lam_s = _vp_levels(a)
        alpha_t, sigma_t, lam_t = _vp_levels(a_to)
        h = lam_t - lam_s
        e1 = tl.exp(-h)  # 0 when landing on sigma = 0
        if SDE:
            x = sigma_t / sigma_s * e1
            d = alpha_t * (1 - e1 * e1)
            z = sigma_t * tl.sqrt(1 - e1 * e1)
        else:
            x = sigma_t / sigma_s
            d = -alpha_t * (e1 - 1)
        D = d
        if SECOND_ORDER:
            a_prev_step = tl.load(abar_ptr + i - 1, mask=mask & (i >= 1), other=0.25)  # abar[i-1]
            _, _, lam_prev = _vp_levels(a_prev_step)
            last = i == N - 1
            order2 = (i >= 1) & ~(last & ((a_to >= 1.0) | (last_first_order != 0)))
            r = tl.where(order2, (lam_s - lam_prev) / tl.where(order2, h, 1.0), 1.0)
            D = tl.where(order2, d * (1 + 0.5 / r), d)
            H0 = tl.where(order2, -d * 0.5 / r, 0.0)

    if not VE:
        tl.store(init_ptr + i * 0, zero + 1.0, mask=i == 0)
    row = state_ptr + i.to(tl.int64) * _NCOL
    tl.store(row + 0, x, mask=mask)
    tl.store(row + 1, D, mask=mask)
    tl.store(row + 2, D_raw, mask=mask)
    tl.store(row + 3, H0, mask=mask)
    tl.store(row + 4, zero, mask=mask)
    tl.store(row + 5, zero, mask=mask)
    tl.store(row + 6, z, mask=mask)
    tl.store(cols_ptr + 0 * N + i, c_in, mask=mask)
    tl.store(cols_ptr + 1 * N + i, d_point, mask=mask)
    tl.store(cols_ptr + 2 * N + i, d_out, mask=mask)
    tl.store(cols_ptr + 3 * N + i, sigma_ve, mask=mask)
    tl.store(err_ptr + i, err, mask=mask)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"solver_table: {msg}")


def _raise_domain_error(err: torch.Tensor, solver: str, abar: torch.Tensor, eta: float) -> None:
    code = int(err.max())  # the one host sync
    if code == 0:
        return
    row = int(torch.argmax((err == code).to(torch.int32)))
    if code == ERR_SIGMA:  # the messages are the host builders'
        s = float(((1 - abar[row]) / abar[row]).sqrt())  # as Grid.sigma computes it
        raise ValueError(f"solver {solver!r} needs a finite, positive sigma at every step (got {s} at step "
                         f"{row}); with a zero-terminal-SNR schedule use ddim, ddpm, dpmpp_2m or unipc")
    if code == ERR_ETA:
        raise ValueError(f"eta={eta} is too large for this grid: 1 - abar_prev - std^2 < 0; use 0 <= eta <= 1")
    raise ValueError("epsilon prediction is undefined at zero SNR (abar = 0); use "
                     "prediction='v_prediction' or 'sample' with a zero-terminal-SNR schedule")


def solver_table(
    solver: str,
    abar: torch.Tensor,
    abar_to: torch.Tensor,
    t: torch.Tensor,
    prediction: str,
    *,
    eta: float = 0.0,
    variance: str = "fixed_small",
    solver_order: int = 2,
    lower_order_final: bool = True,
    spacing: str = "trailing",
    check: bool = True,
) -> dict[str, torch.Tensor]:
    """The StepTable columns of `solver` on a grid (abar, abar_to, t: float64 [N], one device).

    Returns float64 tensors on that device: state [N, NCOL], c_in, d_point, d_out, sigma [N],
    and init_noise_sigma [] (module docstring); they equal build_table(solver, grid, prediction,
    ...)'s. check=True raises the host builders' ValueErrors for an invalid grid (one host
    sync); check=False never syncs with the host; such rows then hold meaningless, possibly
    non-finite values.
    """
    _check(solver in SOLVERS, f"{solver!r} is not a one-row-per-step solver; supported: {', '.join(SOLVERS)} "
                              "(build heun and unipc tables on the host: fastdiff.solvers.build_table)")
    check_prediction(prediction)
    _check(variance in VARIANCES, f"unknown variance {variance!r}; allowed: {', '.join(VARIANCES)}")
    _check(spacing in SPACINGS, f"unknown spacing {spacing!r}; allowed: {', '.join(SPACINGS)}")
    _check(solver_order in (1, 2), f"solver_order must be 1 or 2, got {solver_order!r}")
    grid = {"abar": abar, "abar_to": abar_to, "t": t}
    for name, v in grid.items():
        _check(isinstance(v, torch.Tensor) and v.dtype == torch.float64 and v.dim() == 1,
               f"{name} must be a float64 [N] tensor, got {getattr(v, 'dtype', type(v))} "
               f"{tuple(getattr(v, 'shape', ()))}")
    N, device = abar.shape[0], abar.device
    _check(N >= 1, "the grid needs at least one step")
    for name, v in grid.items():
        _check(v.shape == (N,), f"{name} has shape {tuple(v.shape)}, abar has ({N},)")
        _check(v.device == device, f"{name} is on {v.device}, abar on {device}")
    abar, abar_to, t = abar.contiguous(), abar_to.contiguous(), t.contiguous()

    state = torch.empty(N, NCOL, dtype=torch.float64, device=device)
    cols = torch.empty(len(COLUMNS), N, dtype=torch.float64, device=device)
    err = torch.empty(N, dtype=torch.int32, device=device)
    init = torch.empty((), dtype=torch.float64, device=device)
    # eta in fp64 (a float kernel argument would be fp32); a fill, not a host-to-device copy
    params = torch.full((1,), float(eta), dtype=torch.float64, device=device)
    BLOCK = min(MAX_BLOCK, max(16, triton.next_power_of_2(N)))
    with on_device(abar):
        _solver_table_kernel[(triton.cdiv(N, BLOCK),)](
            abar, abar_to, t, params, state, cols, err, init, N, int(bool(lower_order_final) and N < 15),
            SOLVER=_KIND[solver], PRED=PREDICTIONS.index(prediction), SDE=solver == "dpmpp_2m_sde",
            FIXED_LARGE=variance == "fixed_large", SECOND_ORDER=solver_order == 2, LEADING=spacing == "leading",
            BLOCK=BLOCK, num_warps=max(1, min(8, BLOCK // 128)),
            enable_fp_fusion=False,  # no fma contraction: every product rounds as on the host
        )
    out = dict(zip(COLUMNS, cols.unbind(0)), state=state, init_noise_sigma=init)
    if check:
        _raise_domain_error(err, solver, abar, eta)
    return out
