"""Solvers: each is a float64 coefficient-table builder plus a textbook reference step.

    ddpm             ddpm.py    Ho et al. 2020, ancestral (posterior mean and variance)
    ddim             ddim.py    Song et al. 2021, eta
    euler            euler.py   Karras et al. 2022, Euler on the probability-flow ODE
    euler_ancestral  euler.py   k-diffusion's ancestral Euler
    heun             euler.py   Karras et al. 2022, Algorithm 1
    dpmpp_2m         dpmpp.py   Lu et al. 2022, DPM-Solver++(2M)
    dpmpp_2m_sde     dpmpp.py   SDE-DPM-Solver++(2M)
    unipc            unipc.py   Zhao et al. 2023, UniPC bh2, order 2, with corrector
    renoise          renoise.py Song et al. 2023 (consistency models), Alg. 1: denoise, draw the next level
    plms             plms.py    Liu et al. 2022, PNDM's pseudo linear multistep (skip_prk_steps)
    lms              lms.py     linear multistep on the VE ODE, order <= 4 (k-diffusion's sample_lms)
    + langevin.py: Song et al. 2021's Langevin corrector after any of them.

Every table ends in one convention (build_table): when the last level lies above the data,
the returned state is in data units x_t / a_t (x_t = a_t x_0 + b_t eps in the model's units),
for every solver, unless final_units="model" asks for x_t itself (what diffusers' VP
schedulers return; the Euler family's diffusers schedulers return data units).
"""
from __future__ import annotations

import inspect

from ..grids import Grid
from . import ddim, ddpm, dpmpp, euler, lms, plms, renoise, unipc
from .base import check_prediction, input_scale, process_coefficients
from .table import StepTable

BUILDERS = {
    "ddpm": ddpm.build,
    "ddim": ddim.build,
    "euler": euler.build_euler,
    "euler_ancestral": euler.build_euler_ancestral,
    "heun": euler.build_heun,
    "dpmpp_2m": dpmpp.build_2m,
    "dpmpp_2m_sde": dpmpp.build_2m_sde,
    "unipc": unipc.build,
    "renoise": renoise.build,
    "plms": plms.build,
    "lms": lms.build,
}
SOLVERS = tuple(BUILDERS)
# diffusers' DDIM steps to t - T//N rather than to the next listed timestep (its DDPM does not)
STRIDE_PREV = ("ddim", "plms")  # PNDM's PLMS too
# on a flow-matching process: every solver whose math needs only the levels. ddpm is refused:
# its variances are the VP training betas between integer timesteps, which a flow process lacks.
FLOW_SOLVERS = ("ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "renoise", "lms")
FINAL_UNITS = ("data", "model")


def check_solver(solver: str) -> str:
    if solver not in BUILDERS:
        raise ValueError(f"unknown solver {solver!r}; allowed: {', '.join(SOLVERS)}")
    return solver


def check_flow_solver(solver: str) -> str:
    if solver not in FLOW_SOLVERS:
        raise ValueError(f"solver {solver!r} is not defined on a flow-matching schedule: its variances are the VP "
                         f"training betas between integer timesteps; allowed: {', '.join(FLOW_SOLVERS)} "
                         "(euler_ancestral, dpmpp_2m_sde and renoise are the stochastic ones)")
    return solver


def solver_options(solver: str) -> tuple[str, ...]:
    """The options `solver` takes: its table builder's keyword-only parameters."""
    params = inspect.signature(BUILDERS[check_solver(solver)]).parameters.values()
    return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY)


def build_table(solver: str, grid: Grid, prediction: str, *, final_units: str = "data", **options) -> StepTable:
    """Compile `solver` on `grid` into a StepTable (float64); see the module docstring for final_units."""
    takes = solver_options(solver)
    for name in options:
        if name not in takes:
            raise ValueError(f"solver {solver!r} does not use the option {name!r}; "
                             f"its options: {', '.join(takes) or 'none'}")
    check_prediction(prediction, grid.process)
    if grid.process == "flow":
        check_flow_solver(solver)
    if final_units not in FINAL_UNITS:
        raise ValueError(f"unknown final_units {final_units!r}; allowed: {', '.join(FINAL_UNITS)}")
    return _in_final_units(BUILDERS[solver](grid, prediction, **options).build(), grid, final_units)


def _in_final_units(table: StepTable, grid: Grid, final_units: str) -> StepTable:
    """Scale the last row so that it writes the state in `final_units`; a flow process starts
    from x_T = noise in the model's units (diffusers' init_noise_sigma = 1)."""
    abar = float(grid.abar_to[-1])
    a, _ = process_coefficients(grid.process, abar)
    if a == 0.0:
        raise ValueError("the grid's final level has zero signal (abar = 0); it must end above it")
    c_in = input_scale(table.space, grid.process, abar)  # state -> the model's units x_t
    scale = c_in / a if final_units == "data" else c_in
    changes = {}
    if scale != 1.0:
        state = table.state.clone()
        state[-1] *= scale
        changes["state"] = state
        if table.point is not None:
            point = table.point.clone()
            point[-1] *= scale
            changes["point"] = point
    if grid.process == "flow":
        changes["init_noise_sigma"] = 1.0 / float(table.c_in[0])
    return table.with_(**changes) if changes else table


__all__ = ["BUILDERS", "FINAL_UNITS", "FLOW_SOLVERS", "SOLVERS", "STRIDE_PREV", "StepTable", "build_table",
           "check_flow_solver", "check_solver", "solver_options"]
