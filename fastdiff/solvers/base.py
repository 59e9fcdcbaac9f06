"""What every solver builder shares: the prediction conversion and a row accumulator.

The model output converts to the denoised estimate D by an affine map of the point
(variance preserving x_t, or VE x_t / alpha_t) and the output:

    VP point x_t:            epsilon: D = (x - sigma eps) / alpha   v: D = alpha x - sigma v
    VE point x = x_t/alpha:  epsilon: D = x - s eps                 v: D = alpha^2 x - sigma v
    sample: D = out in both.  The model input is x_t: c_in = 1 (VP) or alpha (VE).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .table import MAX_HISTORY, NCOL, StepTable

PREDICTIONS = ("epsilon", "sample", "v_prediction")
F64 = torch.float64


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; allowed: {', '.join(PREDICTIONS)}")
    return prediction


def conversion(prediction: str, space: str, abar: float) -> tuple[float, float, float]:
    """(c_in, d_point, d_out) for a point at level abar in `space`."""
    alpha, sigma = math.sqrt(abar), math.sqrt(1.0 - abar)
    c_in = 1.0 if space == "vp" else alpha
    if prediction == "sample":
        return c_in, 0.0, 1.0
    if space == "vp":
        if prediction == "epsilon":
            if alpha == 0.0:
                raise ValueError("epsilon prediction is undefined at zero SNR (abar = 0); use "
                                 "prediction='v_prediction' or 'sample' with a zero-terminal-SNR schedule")
            return c_in, 1.0 / alpha, -sigma / alpha
        return c_in, alpha, -sigma
    if prediction == "epsilon":
        return c_in, 1.0, -sigma / alpha
    return c_in, alpha * alpha, -sigma


def vec(**cols: float) -> list[float]:
    """A row over the COLUMNS (x, D, D_raw, H0, H1, H2, z) from keyword coefficients."""
    from .table import COLUMNS

    row = [0.0] * NCOL
    for name, value in cols.items():
        row[COLUMNS.index(name)] = float(value)
    return row


def combine(*terms: tuple[float, list[float]]) -> list[float]:
    """sum_i w_i * row_i: composes affine rows (e.g. a predictor applied to a corrector)."""
    out = [0.0] * NCOL
    for w, row in terms:
        for k in range(NCOL):
            out[k] += w * row[k]
    return out


@dataclass
class TableBuilder:
    """Accumulates rows; `build()` returns the float64 StepTable."""

    solver: str
    space: str
    prediction: str
    init_noise_sigma: float = 1.0
    history_len: int = 0
    separate_point: bool = False
    noise_ahead: bool = False  # see StepTable.noise_ahead
    init_churn: float = 0.0
    rows: list = field(default_factory=list)

    def add(self, t: float, abar: float, state: list[float], point: list[float] | None = None,
            push: bool = False, ends_step: bool = True, d_out: float | None = None) -> None:
        """d_out: D per unit of model output when it is not the level's own (diffusers' churned Euler)."""
        c_in, d_point, d_level = conversion(self.prediction, self.space, abar)
        d_out = d_level if d_out is None else d_out
        sigma_ve = math.sqrt((1 - abar) / abar) if abar > 0 else math.inf
        if point is not None and not self.separate_point:
            raise AssertionError("point rows need separate_point=True")
        self.rows.append((t, sigma_ve, c_in, d_point, d_out, state, point if point is not None else state, push,
                          ends_step))

    def build(self) -> StepTable:
        if not self.rows:
            raise AssertionError("a table needs at least one row")
        assert 0 <= self.history_len <= MAX_HISTORY
        col = list(zip(*self.rows))
        f = lambda i: torch.tensor(col[i], dtype=F64)  # noqa: E731
        return StepTable(
            solver=self.solver, space=self.space, t_model=f(0), sigma=f(1), c_in=f(2), d_point=f(3),
            d_out=f(4), state=torch.tensor(col[5], dtype=F64),
            point=torch.tensor(col[6], dtype=F64) if self.separate_point else None,
            push=torch.tensor(col[7], dtype=torch.bool), init_noise_sigma=float(self.init_noise_sigma),
            history_len=self.history_len, ends_step=torch.tensor(col[8], dtype=torch.bool),
            noise_ahead=self.noise_ahead, init_churn=float(self.init_churn),
        )


def vp_levels(abar: float) -> tuple[float, float, float]:
    """(alpha, sigma, lambda) of a level; lambda = +inf at abar = 1."""
    alpha, sigma = math.sqrt(abar), math.sqrt(max(1.0 - abar, 0.0))
    lam = math.inf if sigma == 0 else (-math.inf if alpha == 0 else math.log(alpha) - math.log(sigma))
    return alpha, sigma, lam
