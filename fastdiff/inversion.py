"""Inversion: the probability-flow ODE run from data to noise, x_T = invert(x0), so that
`sampler.sample(noise=invert(x0))` returns x0 (the encoder map of a deterministic solver).

A deterministic table is affine in everything but the model: once each row's unknown u_r
is fixed (its model output after guidance, or its denoised estimate D_r, see below), every
point the model sees and the result are affine functions of the start x_s and the u's.
`compose` composes the table's rows in float64 over that basis:

    point_r = a_r x_s + sum_j c_rj u_j          (c_rj = 0 for j >= r)
    y       = a x_s   + sum_j b_j u_j           (the sample the forward pass returns)

Given the data y, x_s = (y - sum_j b_j u_j) / a, so each point is an affine function of y
and the u's alone, and inversion is the fixed point u_r = model(point_r, t_r) for all r.
`exact` solves it by backward Gauss-Seidel sweeps: rows from the last to the first, each
row's model evaluated at its point computed from the newest unknowns. Where the point is
nearly data (VE sigma < 1) a row's unknown is its model output, where it is nearly noise its
denoised estimate D (the one that barely moves with the point there), so each row's own
fixed point contracts fast at both ends: `iterations` calls per row in the first sweep, until
the point moves by less than `tol` (relative, per sample). One-step solvers (ddim, euler)
are then exact; heun's inner points and multistep history (dpmpp_2m, unipc) read earlier
rows, which further sweeps of one call per row settle, up to `sweeps` or until x_s moves by
less than `tol`. On Gaussian data with its exact denoiser that is about 3-4 calls per row
for ddim/euler, 6-8 for heun, 7-13 for dpmpp_2m and unipc (20-100 steps), round trips to
~3e-7 relative. `naive` is the textbook inversion: one backward sweep in which each row's
model is evaluated at the point that row leads to (the known point: the data for the last
row), the row then solved for its input; it is DDIM inversion for ddim, first order in the
step (round trip errors of 5-50% at 50 steps). Each sample stops on its own tolerance.
"""
from __future__ import annotations

import torch

from .columns import COLUMNS, H0, Z
from .grids import make_grid
from .guidance import cfg_combine
from .loop import checked_output
from .solvers import build_table
from .solvers.table import StepTable

INVERTIBLE = ("ddim", "euler", "heun", "dpmpp_2m", "unipc")
MODES = ("exact", "naive")


def compose(table: StepTable, by_denoised: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """(points [R, R+1], result [R+1]) float64: coefficients over (x_s, u_0, ..., u_{R-1}), where
    u_r is row r's denoised estimate D_r where by_denoised[r], else its model output out_r."""
    R = table.rows
    if bool((table.state[:, Z] != 0).any()) or (table.point is not None and bool((table.point[:, Z] != 0).any())):
        raise ValueError(f"solver {table.solver!r} draws noise: only deterministic tables invert")
    push_row = getattr(table, "push_row", None)  # an affine history push (a past epsilon); None: D
    basis = torch.eye(R + 1, dtype=torch.float64)
    x = p = basis[0]
    history: list[torch.Tensor] = []  # newest first, as H0, H1, ...
    points = torch.empty(R, R + 1, dtype=torch.float64)
    for r in range(R):
        points[r] = p
        # D (no clipping): the basis vector itself, or the conversion of the point and out_r
        d = basis[1 + r] if by_denoised[r] else float(table.d_point[r]) * p + float(table.d_out[r]) * basis[1 + r]
        values = [x, p, d, d] + history[: len(COLUMNS) - H0 - 1]  # V = [x, P, D, D_raw, H0, ...]

        def apply(row):
            acc = torch.zeros(R + 1, dtype=torch.float64)
            for k, coef in enumerate(row.tolist()[:Z]):
                if coef != 0.0:
                    if k >= len(values):
                        raise AssertionError("a row reads a history slot that is not filled yet")
                    acc = acc + coef * values[k]
            return acc

        x_next = apply(table.state[r])
        p = apply(table.point[r]) if table.point is not None else x_next
        x = x_next
        if bool(table.push[r]):
            pushed = d if push_row is None else apply(push_row[r])
            history = ([pushed] + history)[: table.history_len]
    return points, x


def invert_table(model, table: StepTable, y: torch.Tensor, *, kwargs: dict, cfg_w: torch.Tensor | None,
                 mode: str = "exact", iterations: int = 10, sweeps: int = 10, tol: float = 1e-7,
                 dtype=torch.float32) -> torch.Tensor:
    """The start state x_s [B, *S] (float32, the solver's units) that `table` maps to y (module docstring):
    `iterations` calls per row for its own fixed point in the first sweep, up to `sweeps` sweeps."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
    for name, v in (("iterations", iterations), ("sweeps", sweeps)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    # unknowns: D where the point is nearly noise, the model output elsewhere (module docstring);
    # naive keeps the model output everywhere (DDIM inversion reuses epsilon)
    by_denoised = [mode == "exact" and float(s) > 1.0 for s in table.sigma]
    points, result = compose(table, by_denoised)
    R = table.rows
    a = float(result[0])
    if abs(a) < 1e-12:
        raise ValueError(f"the {table.solver!r} table's result does not depend on its start (prediction "
                         f"'sample' ends on the model's output alone): use epsilon or v_prediction to invert")
    # eliminate x_s: point_r = (a_r / a) y + sum_j (c_rj - a_r b_j / a) out_j
    coef_y = points[:, 0] / a  # [R]
    coef_out = points[:, 1:] - points[:, :1] * result[None, 1:] / a  # [R, R]
    dev = y.device
    coef_y, coef_out, b = coef_y.to(dev), coef_out.to(dev), result[1:].to(dev)
    y64 = y.double()
    B, S = y.shape[0], y.shape[1:]
    c_in, t_model = table.c_in.tolist(), table.t_model.tolist()
    d_point, d_out = table.d_point.tolist(), table.d_out.tolist()
    G = 2 if cfg_w is not None else 1

    def evaluate(r: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(model output after guidance, denoised estimate) at point q for row r, float64."""
        x_in = (c_in[r] * q).to(dtype)
        if G == 2:
            x_in = torch.cat([x_in, x_in])
        t = torch.full((G * B,), t_model[r], dtype=torch.float32, device=dev)
        out = checked_output(model(x_in, t, **kwargs), x_in)
        out = cfg_combine(out, cfg_w) if G == 2 else out.float()
        if not bool(torch.isfinite(out).all()):
            raise FloatingPointError(f"non-finite model output at step {r} (timestep {t_model[r]:g}) while inverting")
        return out.double(), d_point[r] * q + d_out[r] * out.double()

    by_D = torch.tensor(by_denoised, device=dev).reshape(R, *([1] * (len(S) + 1)))

    def unknowns(rows: slice, out: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return torch.where(by_D[rows], den, out)

    def point(r: int, us: torch.Tensor) -> torch.Tensor:
        return coef_y[r] * y64 + torch.tensordot(coef_out[r], us, dims=1)

    def start(us: torch.Tensor) -> torch.Tensor:
        return (y64 - torch.tensordot(b, us, dims=1)) / a

    # first guess for every row: the model at the data; rows not yet reached in the first sweep
    # then take the newest row's values (the model's output and estimate change slowly along t)
    at_data = evaluate(R - 1, y64)  # the last row's known point (naive) or first guess (exact)
    if mode == "naive":
        us = at_data[0].expand(R, *at_data[0].shape).clone()
        for r in range(R - 2, -1, -1):
            us[: r + 1] = evaluate(r, point(r + 1, us))[0]
        return start(us).float()
    us = unknowns(slice(None), *at_data).contiguous()
    # rows whose point reads an earlier row's unknown (heun's inner points, multistep history)
    # need more than one sweep; one-step solvers are exact after the first
    coupled = bool((coef_out.tril(-1).abs() > 1e-12 * coef_out.abs().max()).any())
    def moved(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:  # [B] relative change per sample
        return (new - old).flatten(1).norm(dim=1) / new.flatten(1).norm(dim=1).clamp_min(1e-30)

    # each sample stops on its own tolerance (its values then stay put): its result does not
    # depend on the samples around it
    def keep(active: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return torch.where(active.reshape(-1, *([1] * len(S))), new, old)

    x_s = start(us)
    sweeping = torch.ones(B, dtype=torch.bool, device=dev)
    for sweep in range(sweeps if coupled else 1):
        for r in range(R - 1, -1, -1):
            q = point(r, us)
            active = sweeping.clone()
            # the row's own fixed point, iterated in the first sweep; later sweeps, which settle the
            # coupling to earlier rows, make one call per row
            for _ in range(iterations if sweep == 0 else 1):  # u_r = model(point_r(u_r))
                values = evaluate(r, q)
                us[r] = keep(active, unknowns(slice(r, r + 1), *values)[0], us[r])
                if sweep == 0:
                    us[:r] = keep(active, unknowns(slice(0, r), *values), us[:r])
                q_new = point(r, us)
                active &= moved(q_new, q) > tol
                q = q_new
                if not bool(active.any()):
                    break
        x_new = start(us)
        sweeping &= moved(x_new, x_s) > tol
        x_s = x_new
        if not bool(sweeping.any()):
            break
    return x_s.float()


def check_invertible(sampler) -> None:
    """Refuse what the fixed point cannot express: noise, clipping, non-affine guidance."""
    if sampler.solver not in INVERTIBLE or (sampler.solver == "ddim" and sampler.eta != 0):
        what = f"ddim with eta={sampler.eta}" if sampler.solver == "ddim" else repr(sampler.solver)
        raise ValueError(f"invert needs a deterministic solver, got {what} (stochastic); "
                         f"allowed: {', '.join(INVERTIBLE)} (ddim with eta=0)")
    th = sampler.threshold
    for name, used in (("clip_sample", th.clip is not None), ("thresholding", th.dynamic_ratio is not None),
                       ("guidance_rescale", sampler.guidance_rescale != 0),
                       ("classifier", sampler.classifier is not None),
                       ("corrector", sampler.corrector is not None)):
        if used:
            raise ValueError(f"invert does not support {name}: the step is then not affine in the model output")


def table_for_steps(sampler, steps: int) -> StepTable:
    """The sampler's table for another step count (its grid and solver options)."""
    opts = sampler._grid_options
    if opts["timesteps"] is not None or (opts["sigmas"] is not None and not isinstance(opts["sigmas"], str)):
        raise ValueError("steps cannot change a sampler built from explicit timesteps or sigmas")
    T = sampler.schedule.num_train_timesteps
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in [1, num_train_timesteps={T}], got {steps!r}")
    return build_table(sampler.solver, make_grid(sampler.schedule, steps, **opts), sampler.prediction,
                       **sampler._options)
