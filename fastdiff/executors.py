"""Executors run one table row on the loop's static buffers: D, guidance, the affine update.

`TorchExecutor` is the affine executor in plain PyTorch (the `torch` backend, and the
spec the fused kernel is held to); `TritonExecutor` makes the same row one kernel launch.
Both read per-row constants from host copies of the table (baked into a captured graph)
and per-sample values (guidance scale, seeds) from device buffers, so nothing syncs.
"""
from __future__ import annotations

import numpy as np
import torch

from . import rng
from .guidance import Thresholding, apply_threshold, cfg_combine, dynamic_threshold, per_sample, rescale_factor
from .dtypes import MODEL_DTYPES
from .rng import STREAM_STEP
from .solvers.table import D, D_RAW, MAX_HISTORY, NCOL, P, X, Z, StepTable, history_slots

BACKENDS = ("auto", "torch", "triton")


class TorchExecutor:
    """x_next = state[r] . [x, P, D, D_raw, H0, H1, H2, z] in float32 torch ops.

    Folded rows: where D is read by the update alone (no clipping or thresholding, so D = D_raw;
    no push; no separate point, so P is x), D is never formed. Substituting D = D_raw =
    d_point*x + d_out*o (o the guided output) into the row gives the same affine map over
    [x, o, H..., z],

        x_next = (s_x + s_P + (s_D + s_Draw)*d_point) x + (s_D + s_Draw)*d_out o + sum_k s_Hk H_k + s_z z,

    whose coefficients are multiplied out once, in float64, on the host. The row is then one
    in-place pass (x += b*o where a is 1 in float32, as for Euler) instead of D's two products,
    its sum and the update's two passes. The result differs from the unfolded order by float32
    rounding only (one rounding fewer: D is not rounded on its own); the fused kernel, which
    evaluates the unfolded map in registers, is held to it at the same tolerances.
    """

    def __init__(self, table: StepTable, bufs, threshold: Thresholding, guidance_rescale: float = 0.0):
        self.table, self.bufs, self.threshold, self.phi = table, bufs, threshold, guidance_rescale
        own = _point_into_x if table.point is None else (lambda rows: rows)  # noqa: E731  (P is x there)
        self.state = own(table.state).tolist()
        self.point = table.point.tolist() if table.point is not None else None
        self.d_point, self.d_out, self.c_in = table.d_point.tolist(), table.d_out.tolist(), table.c_in.tolist()
        self.layout = history_slots(table)
        self.push_row = own(table.push_row).tolist() if table.push_row is not None else None
        self.noisy = table.uses_noise().tolist()
        # per row, on the host: whether it is folded (see above; its terms then read the guided
        # output in column D), the nonzero (column, coefficient) terms of each affine row (P is x
        # without separate points: its coefficient joins x's), whether a row reads the point it
        # also writes, and whether D goes straight into the slot it is pushed to (this row reads
        # no value held there)
        self.folded = [threshold.plain and self.point is None and dest is None for _, dest in self.layout]
        self.state_terms = [_folded(row, dp, do) if fold else _nonzero(row)
                            for row, dp, do, fold in zip(self.state, self.d_point, self.d_out, self.folded)]
        self.point_terms = [_nonzero(row) for row in self.point] if self.point is not None else None
        self.push_terms = [_nonzero(row) for row in self.push_row] if self.push_row is not None else None
        self.reads_point = ([row[P] != 0 or prow[P] != 0 for row, prow in zip(self.state, self.point)]
                            if self.point is not None else [False] * table.rows)
        self.direct = [dest is not None and self.push_row is None and dest not in slots and threshold.plain
                       for slots, dest in self.layout]

    def guided(self, r: int, out: torch.Tensor) -> torch.Tensor:
        """The model output after classifier-free guidance (and its rescale), float32 [B, ...]."""
        b = self.bufs
        if not b.guided[r]:  # no CFG, or an unguided row: out is the conditional half [B]
            return out.float()
        o = cfg_combine(out, b.cfg_w[r])
        if self.phi:
            o = o * per_sample(rescale_factor(out, o, self.phi), o.ndim)
        return o

    def raw_denoised(self, r: int, point: torch.Tensor, out: torch.Tensor,
                     into: torch.Tensor | None = None) -> torch.Tensor:
        """D_raw = d_point * point + d_out * guided output, written into `into` when given."""
        o = self.guided(r, out)
        dp, do = self.d_point[r], self.d_out[r]
        if into is None:
            return dp * point + do * o
        scaled_out = do * o  # the same two products and sum, rounded alike
        return torch.mul(point, dp, out=into).add_(scaled_out)

    def denoised(self, r: int, point: torch.Tensor, out: torch.Tensor,
                 into: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(D, D_raw): D_raw clipped or thresholded as the sampler asks."""
        D_raw = self.raw_denoised(r, point, out, into)
        return apply_threshold(D_raw, self.threshold), D_raw

    def step(self, r: int, out: torch.Tensor) -> None:
        """Row r in place: every value that reads x is written before x is; the history push last,
        since the slot it fills may be one this row reads."""
        b = self.bufs
        p = b.point if self.point is not None else b.x
        slots, dest = self.layout[r]
        direct = self.direct[r]
        if self.folded[r]:
            D, D_raw = self.guided(r, out), None  # column D: o, its coefficient holds d_out
        else:
            D, D_raw = self.denoised(r, p, out, into=b.history[dest] if direct else None)
        values = [b.x, p, D, D_raw] + [b.history[s] for s in slots] + [None] * (MAX_HISTORY - len(slots)) + [None]
        if self.noisy[r]:
            values[Z] = rng.randn(b.seeds, self.table.noise_counter(r), STREAM_STEP, b.x.shape[1:], device=b.x.device)
        push = None
        if dest is not None and not direct:
            push = D if self.push_terms is None else _affine(self.push_terms[r], values)
        new_point = None
        if self.point_terms is not None:
            if self.reads_point[r]:  # P is read here: the new point goes in once x is written
                new_point = _affine(self.point_terms[r], values)
            else:
                _affine_into(b.point, self.point_terms[r], values)  # no term reads the point
        _affine_into(b.x, self.state_terms[r], values)
        if new_point is not None:
            b.point.copy_(new_point)
        if push is not None:
            b.history[dest].copy_(push)
        if r + 1 < self.table.rows:
            b.write_model_input(p, self.c_in[r + 1], both=b.guided[r + 1])


def _point_into_x(rows: torch.Tensor) -> torch.Tensor:
    """Affine rows [R, NCOL] with their P coefficient added to x's (P is x when the table has no
    points), in float64 on the host: both backends execute these rows."""
    folded = rows.clone()
    folded[:, X] += folded[:, P]
    folded[:, P] = 0.0
    return folded


def _nonzero(coefs: list[float]) -> list[tuple[int, float]]:
    """An affine row's (column, coefficient) terms with a nonzero coefficient, in column order."""
    return [(i, c) for i, c in enumerate(coefs) if c != 0.0]


def _folded(coefs: list[float], d_point: float, d_out: float) -> list[tuple[int, float]]:
    """A row's terms with D = D_raw = d_point*x + d_out*o substituted: o's coefficient in column D."""
    row = list(coefs)
    d = row[D] + row[D_RAW]
    row[X] += d * d_point
    row[D], row[D_RAW] = d * d_out, 0.0
    return _nonzero(row)


def _is_one(c: float) -> bool:
    """c is 1 in float32, the precision torch multiplies a float32 tensor by a Python float in."""
    return float(np.float32(c)) == 1.0


def _value(values: list, i: int) -> torch.Tensor:
    v = values[i]
    if v is None:
        raise AssertionError("a row reads a history slot that is not filled yet")
    return v


def _affine(terms: list[tuple[int, float]], values: list) -> torch.Tensor:
    """sum_i c_i * values[i] over the terms, in a new tensor."""
    acc = None
    for i, c in terms:
        v = _value(values, i)
        acc = c * v if acc is None else acc.add_(v, alpha=c)
    return acc if acc is not None else torch.zeros_like(values[0])


def _affine_into(dest: torch.Tensor, terms: list[tuple[int, float]], values: list) -> None:
    """The same sum, in the same order, written into dest; dest may be values[0] (read first),
    never another value."""
    if not terms:
        dest.zero_()
        return
    (i, c), rest = terms[0], terms[1:]
    v = _value(values, i)
    if v is not dest:
        torch.mul(v, c, out=dest)
    elif not _is_one(c):
        dest.mul_(c)
    for i, c in rest:
        dest.add_(_value(values, i), alpha=c)


def packed_coefficients(table: StepTable, device) -> torch.Tensor:
    """[R, 3 + 3*NCOL] float32: d_point, d_out, c_in of the next row, state row, point row, push row."""
    R = table.rows
    c_in_next = torch.cat([table.c_in[1:], table.c_in.new_zeros(1)])
    state, push = table.state, table.push_rows()
    if table.point is None:  # the point is the state, and P is x: rounded once, as TorchExecutor does
        state, push = _point_into_x(state), _point_into_x(push)
    packed = torch.cat([table.d_point[:, None], table.d_out[:, None], c_in_next[:, None], state,
                        table.point if table.point is not None else state, push], dim=1)
    assert packed.shape == (R, 3 + 3 * NCOL)
    return packed.to(device=device, dtype=torch.float32)


class TritonExecutor(TorchExecutor):
    """The same row as one fused kernel (kernels/affine_step.py); non-affine extras
    (rescaled CFG, dynamic thresholding) first compute per-sample scalars on the device."""

    def __init__(self, table: StepTable, bufs, threshold: Thresholding, guidance_rescale: float = 0.0):
        super().__init__(table, bufs, threshold, guidance_rescale)
        from fastdiff.kernels import affine_step

        self.kernel = affine_step
        self.coef = packed_coefficients(table, bufs.x.device)

    def step(self, r: int, out: torch.Tensor) -> None:
        b = self.bufs
        out_scale = thresh = None
        if b.guided[r] and self.phi:
            out_scale = rescale_factor(out, cfg_combine(out, b.cfg_w[r]), self.phi).contiguous()
        if self.threshold.dynamic_ratio is not None:
            D_raw = self.raw_denoised(r, b.point if self.point is not None else b.x, out)
            thresh = dynamic_threshold(D_raw, self.threshold.dynamic_ratio, self.threshold.max_value).contiguous()
        slots, dest = self.layout[r]
        if out.dtype not in MODEL_DTYPES:  # e.g. a float64 output of a float32 model
            out = out.float()
        self.kernel(
            r, self.coef, b.x, out.contiguous(),
            point=b.point, history=[b.history[s] for s in slots],
            push_dest=b.history[dest] if dest is not None else None,
            model_in=self._next_model_in(r), cfg_w=b.cfg_w[r] if b.guided[r] else None, seeds=b.seeds,
            clip=self.threshold.clip if self.threshold.dynamic_ratio is None else None,
            thresh=thresh, out_scale=out_scale, noise=bool(self.noisy[r]), noise_counter=self.table.noise_counter(r),
        )

    def _next_model_in(self, r: int):
        """Where the kernel writes row r + 1's input: both halves before a guided row, else the [B] half."""
        b = self.bufs
        if r + 1 >= self.table.rows:
            return None
        return b.model_in if b.guided[r + 1] else b.model_in_cond


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """'auto': the fused kernels on CUDA for the dtypes they take, else plain torch (the
    Sampler's executors and add_noise alike)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "triton" and dtype not in MODEL_DTYPES:
        raise ValueError(f"backend='triton' takes {', '.join(str(d)[6:] for d in MODEL_DTYPES)} tensors; "
                         f"got dtype {str(dtype)[6:]}: use backend='torch' (or 'auto')")
    if backend == "auto":
        return "triton" if device.type == "cuda" and dtype in MODEL_DTYPES else "torch"
    if backend == "triton" and device.type != "cuda":
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' on a CPU needs Triton's interpreter: set TRITON_INTERPRET=1 "
                             "before importing triton, or use backend='torch'")
    return backend


EXECUTORS = {"torch": TorchExecutor, "triton": TritonExecutor}
