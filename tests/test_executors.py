"""The torch executor's rows against the table's definition, evaluated independently in float64.

Rows whose D only their own update reads are folded on the host (TorchExecutor's docstring):
they must still be x_next = state . [x, P, D, D_raw, H..., z] with P = x (no separate points)
and D_raw = d_point*x + d_out*o, to float32 rounding, as must the rows that form D (pushed,
clipped).
"""
import pytest
import torch

from fastdiff import rng
from fastdiff.executors import TorchExecutor
from fastdiff.guidance import Thresholding
from fastdiff.loop import LoopBuffers
from fastdiff.rng import STREAM_STEP
from fastdiff.solvers.table import D, D_RAW, H0, H1, H2, NCOL, P, X, Z, StepTable

F64 = torch.float64
EPS32 = torch.finfo(torch.float32).eps
B, S = 3, (3, 5, 7)
# row: (what it is, state coefficients {column: value}, pushes D)
ROWS = [
    ("plain, reads P", {X: 0.83, P: 0.1, D: 0.21, D_RAW: -0.05}, False),
    ("pushed", {X: 0.6, D: 0.4}, True),
    ("noisy, reads H0", {X: 1.0, D: -0.3, H0: 0.25, Z: 0.7}, False),
    ("pushed, reads H0", {X: 0.9, D: 0.35, D_RAW: 0.1, H0: -0.45}, True),
    ("noisy, reads H0 and H1", {X: 0.37, D: 1.3, H0: -0.6, H1: 0.2, Z: 0.05}, False),
]


def _table() -> StepTable:
    g = torch.Generator().manual_seed(11)
    R = len(ROWS)
    state = torch.zeros(R, NCOL, dtype=F64)
    for r, (_, coefs, _) in enumerate(ROWS):
        for col, c in coefs.items():
            state[r, col] = c
    rand = lambda lo, hi: lo + (hi - lo) * torch.rand(R, generator=g, dtype=F64)  # noqa: E731
    return StepTable(solver="random-rows", space="ve", t_model=torch.linspace(900, 100, R, dtype=F64),
                     sigma=rand(0.5, 3.0), c_in=rand(0.3, 1.0), d_point=rand(0.5, 1.5), d_out=rand(-1.7, -0.4),
                     state=state, point=None, push=torch.tensor([p for *_, p in ROWS]), init_noise_sigma=1.0,
                     history_len=2)


@pytest.mark.parametrize("cfg", [False, True], ids=["nocfg", "cfg"])
@pytest.mark.parametrize("clip", [None, 1.0], ids=["plain", "clipped"])
def test_rows_equal_the_float64_definition(clip, cfg):
    table = _table()
    bufs = LoopBuffers(table, B, S, torch.float32, "cpu", cfg=cfg)
    executor = TorchExecutor(table, bufs, Thresholding(clip=clip))
    # the rows under test: unpushed rows fold unless D is clipped
    assert executor.folded == [clip is None and not push for *_, push in ROWS]
    g = torch.Generator().manual_seed(5)
    seeds = torch.tensor([3, 17, 2**40 + 1])
    w = torch.tensor([1.0, 4.5, 7.5])  # per-sample guidance scales
    bufs.load(2 * torch.randn(B, *S, generator=g), seeds, w.expand(table.rows, B) if cfg else None, {},
              float(table.c_in[0]))
    history = []  # float64, newest first
    for r, (what, _, push) in enumerate(ROWS):
        out = 1.5 * torch.randn((2 * B if cfg else B, *S), generator=g)
        x = bufs.x.double()  # the state the row starts from
        if cfg:
            u, c = out[:B].double(), out[B:].double()
            ws = w.double().view(B, 1, 1, 1)
            o, o_mag = u + ws * (c - u), u.abs() + ws * (c.abs() + u.abs())
        else:
            o, o_mag = out.double(), out.double().abs()
        dp, do = float(table.d_point[r]), float(table.d_out[r])
        D_raw = dp * x + do * o
        Dv = D_raw.clamp(-clip, clip) if clip is not None else D_raw
        z = rng.randn(seeds, r, STREAM_STEP, S).double()
        V = {X: x, P: x, D: Dv, D_RAW: D_raw, Z: z, **dict(zip((H0, H1, H2), history))}
        terms = [(i, float(c)) for i, c in enumerate(table.state[r]) if c != 0]
        want = sum(c * V[i] for i, c in terms)
        # float32 rounding of every term, of D_raw (|d_point x| + |d_out| |o| and o's own rounding)
        scale = sum(abs(c) * V[i].abs() for i, c in terms)
        scale = scale + (abs(table.state[r, D]) + abs(table.state[r, D_RAW])) * (abs(dp) * x.abs() + abs(do) * o_mag)
        executor.step(r, out)
        err = (bufs.x.double() - want).abs()
        bound = 8 * EPS32 * scale
        assert bool((err <= bound).all()), (f"row {r} ({what}): worst error {float(err.max()):.3g}, "
                                            f"{float((err / bound).max()):.3g} x the float32 bound")
        if push:
            history = ([Dv] + history)[:2]
