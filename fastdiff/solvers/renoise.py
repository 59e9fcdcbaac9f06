"""Denoise, then renoise: x' = alpha' D + sigma' z, the next level's marginal drawn afresh
around the denoised estimate (consistency-model multistep sampling, Song et al. 2023, Alg. 1;
diffusers' FlowMatchEuler `stochastic_sampling`, whose flow form is x' = (1 - s') D + s' z).

In VP units (alpha', sigma') = (sqrt(abar'), sqrt(1 - abar')); the state x is not read.
"""
from __future__ import annotations

import math

from ..grids import Grid
from .base import TableBuilder, vec


def build(grid: Grid, prediction: str) -> TableBuilder:
    tb = TableBuilder("renoise", "vp", prediction, process=grid.process)
    for i in range(grid.steps):
        a_to = float(grid.abar_to[i])
        tb.add(float(grid.t[i]), float(grid.abar[i]), vec(D=math.sqrt(a_to), z=math.sqrt(max(1 - a_to, 0.0))))
    return tb


def reference_step(D, z, abar_to):
    return math.sqrt(abar_to) * D + math.sqrt(1 - abar_to) * z
