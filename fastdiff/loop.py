"""The sampling loop over static buffers: the exact code a CUDA graph captures.

Everything the loop touches is allocated once (`LoopBuffers`); inputs are copied in
before a run (`load`), per-row constants are Python floats baked into the code path, and
per-sample values live in device tensors.  Nothing reads a tensor value on the host:
the non-finite check adds probes (`add_nonfinite_probe`) into a row's slots of a device
buffer, read once at the end: one reduction per model call, one of the classifier's
gradient when there is a classifier, and one of the sample after each row (two with a
separate evaluation point), where isfinite().all() and a where() took several kernels.
The sample's probe catches finite outputs too large for the float32 update.
"""
from __future__ import annotations

import torch

from . import conditioning, rng
from .guidance import classifier_grad, classifier_guided
from .models.adapters import plain_output
from .rng import STREAM_CORRECTOR
from .solvers import langevin
from .solvers.base import vp_levels
from .solvers.table import StepTable

# what each of a row's probe slots watches, in the order the row produces them
PROBES = ("model output", "classifier gradient", "sample")
MODEL_OUTPUT, CLASSIFIER_GRADIENT, SAMPLE = range(len(PROBES))
SMALL_PROBE = 16384  # elements: below, a float64 sum probes faster than aminmax (2-core EPYC, torch 2.13)


class LoopBuffers:
    """x [B, *S] f32 state; point (separate-point solvers); history ring; model_in [G*B, *S].

    With CFG, model_in is [uncond; cond] = [2B] and its conditional half model_in[B:] is a
    contiguous view: a guided row calls the model on [2B], an unguided one (`guided[r]`
    False: outside a guidance interval, see guidance.row_guidance) on the [B] half with the
    conditioning's [B:] rows, so one captured graph holds both batch shapes.
    """

    def __init__(self, table: StepTable, batch: int, sample_shape, model_dtype, device, cfg: bool,
                 guided=None):
        f32 = dict(dtype=torch.float32, device=device)
        shape = (batch, *sample_shape)
        self.batch, self.cfg = batch, cfg
        # per row, host-known: does the model see both halves? (all rows, by default, with CFG)
        self.guided = [cfg and bool(g) for g in (guided if guided is not None else [True] * table.rows)]
        if len(self.guided) != table.rows:
            raise AssertionError(f"guided has {len(self.guided)} rows, the table {table.rows}")
        self.x = torch.empty(shape, **f32)
        self.point = torch.empty(shape, **f32) if table.separate_point else None
        self.history = [torch.empty(shape, **f32) for _ in range(table.history_len)]
        G = 2 if cfg else 1
        self.model_in = torch.empty((G * batch, *sample_shape), dtype=model_dtype, device=device)
        self.model_in_cond = self.model_in[-batch:]  # the conditional half (all of it without CFG)
        self.seeds = torch.zeros(batch, dtype=torch.int64, device=device)
        self.cfg_w = torch.ones((table.rows, batch), **f32) if cfg else None
        self.t = table.t_model.to(**f32)[:, None].expand(table.rows, G * batch).contiguous()  # [R, G*B]
        self.probes = torch.zeros((table.rows, len(PROBES)), dtype=torch.float64, device=device)  # per row, PROBES
        self.probe = [list(row.unbind()) for row in self.probes.unbind()]  # views [r][slot]: no indexing per call
        self.cond: dict | None = None  # the model's keyword arguments, static copies (load)
        self.cond_cond: dict | None = None  # their conditional half: views of self.cond (load)

    def model_args(self, r: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(x, t, conditioning) of row r's model call: [2B] at a guided row, else the [B] conditional half."""
        if self.guided[r] or not self.cfg:
            return self.model_in, self.t[r], self.cond
        B = self.batch
        return self.model_in_cond, self.t[r][B:], self.cond_cond

    def write_model_input(self, point: torch.Tensor, c_in: float, both: bool = True) -> None:
        """The next model input c_in * point; `both`=False writes the conditional half only (an
        unguided row next). The product is formed once, in the conditional half, and copied."""
        cond = self.model_in_cond
        if c_in == 1.0:  # flow and VP units: a copy (faster than a multiply by 1, the same values)
            cond.copy_(point)
        elif cond.dtype == point.dtype:
            torch.mul(point, c_in, out=cond)
        else:
            cond.copy_(point * c_in)
        if self.cfg and both:
            self.model_in[:self.batch].copy_(cond)

    def load(self, x0, seeds, cfg_w, cond: dict, c_in0: float) -> None:
        """Copy a run's inputs into the static buffers (also between graph replays)."""
        self.x.copy_(x0)
        if self.point is not None:
            self.point.copy_(x0)
        self.seeds.copy_(seeds)
        if self.cfg:
            self.cfg_w.copy_(cfg_w)
        self.cond = conditioning.copy_into(self.cond, cond)  # nested; see fastdiff/conditioning.py
        self.cond_cond = cond_half(self.cond, self.batch)  # once per load, not per unguided model call
        self.probes.zero_()
        self.write_model_input(self.x if self.point is None else self.point, c_in0)


def cond_half(cond, B: int):
    """The conditional half of (nested) conditioning: every tensor's last B rows, as views (all
    of a [B] one)."""
    return conditioning.map_tensors(lambda v: v[-B:], cond)


def add_nonfinite_probe(probe: torch.Tensor, out: torch.Tensor) -> None:
    """Adds to the float64 scalar `probe` a value that is non-finite exactly when `out` holds an
    inf or a NaN.

    float32 and narrower: the float64 sum (float32's largest value times any tensor size stays
    far below float64's, so a finite output never overflows; a float32 sum could), or from
    SMALL_PROBE elements on, where converting costs more than the two extra tiny adds, out's
    min and max from one pass (aminmax propagates NaN; an inf is the min or the max), summed
    in float64. float64: the sum of out * 0, which is 0 for finite values and NaN for inf or
    NaN. The branches read only the shape and dtype. Graph-safe: no host read.
    """
    if out.numel() == 0:  # nothing to watch
        return
    if out.dtype == torch.float64:
        probe.add_((out * 0).sum())
        return
    if out.numel() < SMALL_PROBE:
        probe.add_(out.sum(dtype=torch.float64))
        return
    lo, hi = torch.aminmax(out)
    probe.add_(lo).add_(hi)


def checked_output(raw, model_in: torch.Tensor) -> torch.Tensor:
    """The model's output as a floating tensor shaped like its input: never broadcast, never cast
    (shape and dtype are known while capturing, so this reads no tensor value)."""
    out = plain_output(raw)
    if not out.is_floating_point():
        raise TypeError(f"model returned a {out.dtype} tensor; model(x, t) must return a floating-point tensor "
                        "(epsilon, v or x0)")
    if out.shape != model_in.shape:
        raise ValueError(f"model returned shape {tuple(out.shape)} for an input x of shape "
                         f"{tuple(model_in.shape)}; model(x, t) must return a tensor shaped like x")
    return out


class Loop:
    """Runs a table's rows: model call, non-finite bookkeeping, executor step, corrector."""

    def __init__(self, model, table: StepTable, bufs: LoopBuffers, executor, *, classifier=None,
                 classifier_scale: float = 1.0):
        self.model, self.table, self.bufs, self.executor = model, table, bufs, executor
        self.classifier, self.classifier_scale = classifier, classifier_scale
        self.t_host = table.t_model.tolist()
        self.abar = (1.0 / (1.0 + table.sigma**2)).tolist()  # the level each row's model call sees
        self.corrector = table.corrector_steps.tolist() if table.corrector_steps is not None else None
        # after a row whose point row equals its state row, the corrector moves both
        self.point_is_state = [table.point is None or bool(torch.equal(table.point[r], table.state[r]))
                               for r in range(table.rows)]

    def call_model(self, r: int) -> torch.Tensor:
        b = self.bufs
        x_in, t, cond = b.model_args(r)
        out = checked_output(self.model(x_in, t, **cond), x_in)
        add_nonfinite_probe(b.probe[r][MODEL_OUTPUT], out)
        if self.classifier is not None:
            B = b.batch
            grad = classifier_grad(self.classifier, b.model_in_cond, b.t[r][-B:], b.cond_cond)
            add_nonfinite_probe(b.probe[r][CLASSIFIER_GRADIENT], grad)
            out = classifier_guided(out, grad, self.classifier_scale, self.abar[r], self.executor.d_out[r])
        return out

    def run(self, progress=None) -> None:
        b = self.bufs
        for r in range(self.table.rows):
            self.executor.step(r, self.call_model(r))
            add_nonfinite_probe(b.probe[r][SAMPLE], b.x)  # before the corrector, whose calls probe row r + 1
            if b.point is not None:
                add_nonfinite_probe(b.probe[r][SAMPLE], b.point)
            if self.corrector is not None and self.corrector[r]:
                self.correct(r)
            if progress is not None:
                progress.update(1)

    def correct(self, r: int) -> None:
        """Langevin corrector sub-steps at the level of row r + 1 (see solvers/langevin.py)."""
        b, ex, table = self.bufs, self.executor, self.table
        n = r + 1
        alpha, sigma, _ = vp_levels(self.abar[n])
        to_vp = alpha if table.space == "ve" else 1.0  # the point in VP units is to_vp * point
        target = b.point if b.point is not None else b.x
        M = self.corrector[r]
        for j in range(M):
            x_in, t, cond = b.model_args(n)
            out = checked_output(self.model(x_in, t, **cond), x_in)
            add_nonfinite_probe(b.probe[n][MODEL_OUTPUT], out)  # n < rows: no corrector after the last row
            D, _ = ex.denoised(n, target, out)
            z = rng.randn(b.seeds, r * M + j, STREAM_CORRECTOR, target.shape[1:], device=target.device)
            target.copy_(langevin.update(target, D, z, alpha, sigma, table.corrector_snr,
                                         float(table.corrector_alpha[r]), to_vp))
            if b.point is not None and self.point_is_state[r]:
                b.x.copy_(target)
            b.write_model_input(target, ex.c_in[n], both=b.guided[n])

    def raise_if_nonfinite(self) -> None:
        """FloatingPointError naming the first step, and what, that became non-finite."""
        bad = (~torch.isfinite(self.bufs.probes.flatten())).nonzero()  # the one host read, after the loop
        if not bad.numel():
            return
        r, what = divmod(int(bad[0, 0]), len(PROBES))
        where = f"at step {r} (timestep {self.t_host[r]:g})"
        if what == SAMPLE:
            raise FloatingPointError(f"non-finite sample {where}: the model outputs were finite, but the update "
                                     "overflowed float32 (a model output, guidance scale or classifier gradient "
                                     "too large)")
        raise FloatingPointError(f"non-finite {PROBES[what]} {where}")
