"""The coefficient table: what every solver compiles to, and what every backend executes.

One row per model evaluation. Row r evaluates the model at the current *point* and then
takes an affine step. With V the column vector

    V = [x, P, D, D_raw, H0, H1, H2, z]      (COLUMNS, in this order)

where x is the solver state (float32 trajectory), P the point the model saw this row (x
itself when the table has no separate points), D the denoised estimate from this row's
model output after clipping/thresholding, D_raw the same before clipping, H_k the k-th most
recent value pushed to the history before this row, and z standard normal noise keyed by
(sample seed, row, STREAM_STEP, element):

    D_raw  = d_point[r] * point + d_out[r] * out          (prediction type + state space)
    x_next = state[r] . V
    point' = point_row[r] . V      if the table has separate points (Heun, UniPC),
             x_next                otherwise
    model input for row r+1 = c_in[r+1] * point'   (the backend writes it, both CFG halves)
    if push[r]: history <- push_row[r] . V   (the most recent becomes H0)

The pushed value is an affine combination of the same vector: D for most solvers (push_row
= e_D, the default when the table has no push_row), a past epsilon (x - alpha D) / sigma or
raw model output (D_raw - d_point P) / d_out for PLMS, a derivative (x - D) / sigma for LMS. One
pass computes it. The P column lets a row read its model output back exactly when the point
is not the state (PNDM's Runge-Kutta warm-up, fastdiff/solvers/plms.py); it costs the kernel
one multiply-add per output, since it loads the point for D_raw anyway.

`out` is the model output after guidance: out = u + w * (c - u) for the batched
[uncond; cond] call. Everything is float64 on the host; backends cast to float32.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..columns import COLUMNS, D, D_RAW, H0, H1, H2, MAX_HISTORY, NCOL, P, X, Z  # noqa: F401  (the layout)


@dataclass(frozen=True)
class StepTable:
    """A solver compiled for one grid: per-row scalars in float64 (see module docstring)."""

    solver: str
    space: str  # "vp": x is x_t;  "ve": x is x_t / alpha_t (k-diffusion's sigma space); "flow": x_s itself
    t_model: torch.Tensor  # [R] model timestep (float, may be fractional)
    sigma: torch.Tensor  # [R] VE sigma of the point the model sees
    c_in: torch.Tensor  # [R] model input = c_in * point
    d_point: torch.Tensor  # [R]
    d_out: torch.Tensor  # [R]
    state: torch.Tensor  # [R, NCOL]
    point: torch.Tensor | None  # [R, NCOL] or None (point is the state)
    push: torch.Tensor  # [R] bool
    init_noise_sigma: float  # x_0 = init_noise_sigma * noise
    push_row: torch.Tensor | None = None  # [R, NCOL]: the pushed value push_row . V; None: D
    history_len: int = 0  # how many past D's any row reads (0..MAX_HISTORY)
    ends_step: torch.Tensor | None = None  # [R] bool: False for a step's inner rows (Heun's first)
    # Langevin corrector (Song et al. 2021) after row r: number of sub-steps and the
    # target signal-to-noise ratio; 0 where none.
    corrector_steps: torch.Tensor | None = None  # [R] int
    corrector_snr: float = 0.0
    # per-row "alpha_i = 1 - beta_i" of Song et al.'s VP corrector, and the point's
    # VP (alpha, sigma) for the corrector's score; None without a corrector.
    corrector_alpha: torch.Tensor | None = None  # [R]
    # Noise BEFORE a model call (EDM's churn, Karras et al. 2022 Alg. 2): with noise_ahead, row
    # r's z is keyed by the NEXT row's counter, (seed, r + 1, STREAM_STEP): it is the re-heating
    # noise of row r + 1, added by row r's update before row r + 1's model call. The first row's
    # is added to the initial point: x_0 = init_noise_sigma * noise + init_churn * z(seed, 0).
    noise_ahead: bool = False
    init_churn: float = 0.0

    @property
    def rows(self) -> int:
        return self.t_model.shape[0]

    @property
    def separate_point(self) -> bool:
        return self.point is not None

    def noise_counter(self, r: int) -> int:
        """The Philox counter of row r's z (see noise_ahead)."""
        return r + 1 if self.noise_ahead else r

    def uses_noise(self) -> torch.Tensor:
        """[R] bool: rows whose update draws z."""
        used = self.state[:, Z] != 0
        if self.point is not None:
            used |= self.point[:, Z] != 0
        return used

    def push_rows(self) -> torch.Tensor:
        """[R, NCOL]: the pushed combination of every row (e_D where the table has no push_row)."""
        if self.push_row is not None:
            return self.push_row
        rows = torch.zeros(self.rows, NCOL, dtype=torch.float64)
        rows[:, D] = 1.0
        return rows

    def with_(self, **changes) -> "StepTable":
        return replace(self, **changes)


def history_slots(table: StepTable) -> list[tuple[list[int], int | None]]:
    """Physical ring-buffer layout per row: (slots holding H0..H{K-1}, slot D is pushed to).

    The history lives in `history_len` fixed buffers used as a ring; which buffer holds
    H_k at row r is known on the host, so a captured graph bakes the pointers.
    """
    K = table.history_len
    layout = []
    newest = -1  # physical slot of H0
    count = 0
    for r in range(table.rows):
        logical = [(newest - k) % K for k in range(min(count, K))] if K else []
        dest = None
        if K and bool(table.push[r]):
            dest = (newest + 1) % K
            newest = dest
            count += 1
        layout.append((logical, dest))
    return layout
