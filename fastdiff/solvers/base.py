"""What every solver builder shares: the prediction conversion and a row accumulator.

A process puts the model's input at x_m = a x_0 + b eps: (a, b) = (alpha, sigma) for VP
(a^2 + b^2 = 1), (1 - s, s) for flow matching (a + b = 1). A table's point lives in one
space and the model input is x_m = c_in * point:

    "vp"   x_m / sqrt(a^2 + b^2) (VP x_t)   c_in = sqrt(a^2 + b^2)  (1 for VP)
    "ve"   x_m / a (VE, x_0 + (b/a) eps)    c_in = a
    "flow" x_m (flow units, time s)         c_in = 1                (flow process only)

The model output converts to D by the affine map D = d_point * point + d_out * out:
    epsilon: D = (x_m - b eps) / a     sample: D = out
    v_prediction (VP): D = a x_m - b v      flow (v = eps - x_0): D = x_m - b v
e.g. VP point: epsilon (1/alpha, -sigma/alpha), v (alpha, -sigma); VE point: epsilon
(1, -sigma/alpha), v (alpha^2, -sigma); flow point: flow (1, -s).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .table import MAX_HISTORY, NCOL, StepTable

PREDICTIONS = ("epsilon", "sample", "v_prediction", "flow")
# predictions each process defines (v_prediction's v = alpha eps - sigma x_0 needs alpha^2 + sigma^2 = 1)
PROCESS_PREDICTIONS = {"vp": ("epsilon", "sample", "v_prediction"), "flow": ("flow", "epsilon", "sample")}
F64 = torch.float64


def check_prediction(prediction: str, process: str = "vp") -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; allowed: {', '.join(PREDICTIONS)}")
    allowed = PROCESS_PREDICTIONS[process]
    if prediction not in allowed:
        raise ValueError(f"prediction={prediction!r} is not defined for a {process} schedule; allowed: "
                         f"{', '.join(allowed)}")
    return prediction


def process_coefficients(process: str, abar: float) -> tuple[float, float]:
    """(a, b): the model input at VP level abar is a x_0 + b eps (see the module docstring)."""
    if process == "flow":
        alpha, sigma = math.sqrt(abar), math.sqrt(max(1.0 - abar, 0.0))
        s = sigma / (alpha + sigma)  # schedules.flow_sigma
        return 1.0 - s, s
    return math.sqrt(abar), math.sqrt(1.0 - abar)


def input_scale(space: str, process: str, abar: float) -> float:
    """c_in: the model input is c_in * point for a point of `space` at level abar."""
    a, b = process_coefficients(process, abar)
    if space == "ve":
        return a
    if space == "flow":
        return 1.0
    return math.sqrt(a * a + b * b) if process == "flow" else 1.0


def conversion(prediction: str, space: str, abar: float, process: str = "vp") -> tuple[float, float, float]:
    """(c_in, d_point, d_out) for a point at level abar in `space`."""
    a, b = process_coefficients(process, abar)
    c_in = input_scale(space, process, abar)
    if prediction == "sample":
        return c_in, 0.0, 1.0
    if prediction == "epsilon":
        if a == 0.0:
            raise ValueError("epsilon prediction is undefined at zero SNR (abar = 0); use "
                             "prediction='v_prediction' or 'sample' with a zero-terminal-SNR schedule "
                             "('flow' on a flow schedule)")
        return c_in, c_in / a, -b / a
    if prediction == "v_prediction":
        return c_in, a * c_in, -b
    return c_in, c_in, -b  # flow


def vec(**cols: float) -> list[float]:
    """A row over the COLUMNS (x, P, D, D_raw, H0, H1, H2, z) from keyword coefficients."""
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
    process: str = "vp"
    history_len: int = 0
    separate_point: bool = False
    noise_ahead: bool = False  # see StepTable.noise_ahead
    init_churn: float = 0.0
    rows: list = field(default_factory=list)

    def add(self, t: float, abar: float, state: list[float], point: list[float] | None = None,
            push: bool | list[float] = False, ends_step: bool = True, d_out: float | None = None) -> None:
        """One row; `push`: True pushes D, a row over the COLUMNS pushes that combination; `d_out`: D per
        unit of model output when it is not the level's own (diffusers' churned Euler)."""
        c_in, d_point, d_level = conversion(self.prediction, self.space, abar, self.process)
        d_out = d_level if d_out is None else d_out
        sigma_ve = math.sqrt((1 - abar) / abar) if abar > 0 else math.inf
        if point is not None and not self.separate_point:
            raise AssertionError("point rows need separate_point=True")
        self.rows.append((t, sigma_ve, c_in, d_point, d_out, state, point if point is not None else state, push,
                          ends_step))

    def conversion(self, abar: float) -> tuple[float, float, float]:
        """(c_in, d_point, d_out) of a row at level abar (as add() computes them)."""
        return conversion(self.prediction, self.space, abar, self.process)

    def build(self) -> StepTable:
        if not self.rows:
            raise AssertionError("a table needs at least one row")
        assert 0 <= self.history_len <= MAX_HISTORY
        col = list(zip(*self.rows))
        f = lambda i: torch.tensor(col[i], dtype=F64)  # noqa: E731
        pushes = col[7]
        push_row = None
        if any(not isinstance(p, bool) for p in pushes):  # some row pushes a combination other than D
            push_row = torch.tensor([p if not isinstance(p, bool) else vec(D=1) for p in pushes], dtype=F64)
        return StepTable(
            solver=self.solver, space=self.space, t_model=f(0), sigma=f(1), c_in=f(2), d_point=f(3),
            d_out=f(4), state=torch.tensor(col[5], dtype=F64),
            point=torch.tensor(col[6], dtype=F64) if self.separate_point else None,
            push=torch.tensor([not isinstance(p, bool) or p for p in pushes], dtype=torch.bool),
            init_noise_sigma=float(self.init_noise_sigma), push_row=push_row,
            history_len=self.history_len, ends_step=torch.tensor(col[8], dtype=torch.bool),
            noise_ahead=self.noise_ahead, init_churn=float(self.init_churn),
        )


def vp_levels(abar: float) -> tuple[float, float, float]:
    """(alpha, sigma, lambda) of a level; lambda = +inf at abar = 1."""
    alpha, sigma = math.sqrt(abar), math.sqrt(max(1.0 - abar, 0.0))
    lam = math.inf if sigma == 0 else (-math.inf if alpha == 0 else math.log(alpha) - math.log(sigma))
    return alpha, sigma, lam
