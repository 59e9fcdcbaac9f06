"""Solvers: each is a float64 coefficient-table builder plus a textbook reference step.

    ddpm             ddpm.py    Ho et al. 2020, ancestral (posterior mean and variance)
    ddim             ddim.py    Song et al. 2021, eta
    euler            euler.py   Karras et al. 2022, Euler on the probability-flow ODE
    euler_ancestral  euler.py   k-diffusion's ancestral Euler
    heun             euler.py   Karras et al. 2022, Algorithm 1
    dpmpp_2m         dpmpp.py   Lu et al. 2022, DPM-Solver++(2M)
    dpmpp_2m_sde     dpmpp.py   SDE-DPM-Solver++(2M)
    unipc            unipc.py   Zhao et al. 2023, UniPC bh2, order 2, with corrector
    + langevin.py: Song et al. 2021's Langevin corrector after any of them.
"""
from __future__ import annotations

import inspect

from ..grids import Grid
from . import ddim, ddpm, dpmpp, euler, unipc
from .base import check_prediction
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
}
SOLVERS = tuple(BUILDERS)
# diffusers' DDIM steps to t - T//N rather than to the next listed timestep (its DDPM does not)
STRIDE_PREV = ("ddim",)


def check_solver(solver: str) -> str:
    if solver not in BUILDERS:
        raise ValueError(f"unknown solver {solver!r}; allowed: {', '.join(SOLVERS)}")
    return solver


def solver_options(solver: str) -> tuple[str, ...]:
    """The options `solver` takes: its table builder's keyword-only parameters."""
    params = inspect.signature(BUILDERS[check_solver(solver)]).parameters.values()
    return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY)


def build_table(solver: str, grid: Grid, prediction: str, **options) -> StepTable:
    """Compile `solver` on `grid` into a StepTable (float64)."""
    takes = solver_options(solver)
    for name in options:
        if name not in takes:
            raise ValueError(f"solver {solver!r} does not use the option {name!r}; "
                             f"its options: {', '.join(takes) or 'none'}")
    check_prediction(prediction)
    return BUILDERS[solver](grid, prediction, **options).build()


__all__ = ["BUILDERS", "SOLVERS", "STRIDE_PREV", "StepTable", "build_table", "check_solver", "solver_options"]
