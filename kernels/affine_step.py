"""The fused solver step: one row of a coefficient table (fastdiff.solvers.table), one launch.

Per sample b and element e, with the row r = [d_point, d_out, c_in_next, state[8], point[8], push[8]]:

    o      = out[b]                       or  u + w_b * (c - u),  (u, c) = (out[b], out[B+b])
    o      = o * out_scale[b]                                       (rescaled-CFG pre-pass)
    D_raw  = d_point * P + d_out * o       P = point if given else x
    D      = clamp(D_raw, -clip, clip)     or  clamp(D_raw, -s_b, s_b) / s_b   (thresh s_b)
    V      = [x, P, D, D_raw, H0, H1, H2, z]   z ~ N(0, 1) keyed (seeds[b], counter, STREAM_STEP, e),
                                           counter = r unless the table keys it ahead (churn)
    x      <- state . V
    point  <- point_row . V                (x_next when there is no separate point)
    push_dest <- push_row . V              (the history push, D for most solvers; may alias the oldest H_k)
    model_in[b] (and model_in[B+b]) <- c_in_next * point   (cast to the model's dtype)

fp32 math in registers whatever the model dtype; each element is read and written by the
same program, so in-place updates and a push into a history slot it reads are safe.
"""
import torch
import triton
import triton.language as tl

from fastdiff.columns import MAX_HISTORY, NCOL
from fastdiff.devices import on_device
from fastdiff.dtypes import MODEL_DTYPES
from fastdiff.rng import STREAM_STEP

from .philox import normal_block
from .tiles import NUM_WARPS, launch_grid, sample_tile, tile_shape

ROW_WIDTH = 3 + 3 * NCOL  # [d_point, d_out, c_in_next, state[NCOL], point[NCOL], push[NCOL]]
# in-kernel column offsets of the row (constexpr globals)
_W = tl.constexpr(ROW_WIDTH)
_S = tl.constexpr(3)  # state[j] at _S + j
_P = tl.constexpr(3 + NCOL)  # point[j] at _P + j
_Q = tl.constexpr(3 + 2 * NCOL)  # push[j] at _Q + j


@triton.jit(do_not_specialize=["row", "counter"])
def _affine_step_kernel(
    coef_ptr, row, counter, x_ptr, point_ptr, out_ptr, h0_ptr, h1_ptr, h2_ptr, push_ptr, model_in_ptr,
    cfg_w_ptr, seed_ptr, thresh_ptr, out_scale_ptr, clip, B, N,
    HAS_POINT: tl.constexpr, CFG: tl.constexpr,
    K: tl.constexpr, PUSH: tl.constexpr, NOISE: tl.constexpr, CLIP: tl.constexpr,
    THRESH: tl.constexpr, OUT_SCALE: tl.constexpr, WRITE_MODEL_IN: tl.constexpr,
    MODEL_IN_CFG: tl.constexpr, STREAM: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    b, e, start, mask, in_batch = sample_tile(B, N, ROWS, BLOCK)  # kernels/tiles.py
    offs = b * N + e  # [ROWS, BLOCK] of rows b of [B, N]
    offs_cond = (b + B) * N + e  # rows B + b of [2B, N]

    r = coef_ptr + row.to(tl.int64) * _W
    d_point = tl.load(r + 0)
    d_out = tl.load(r + 1)

    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_POINT:
        p = tl.load(point_ptr + offs, mask=mask, other=0.0)
    else:
        p = x

    o = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if CFG:
        w = tl.load(cfg_w_ptr + b, mask=in_batch, other=0.0)
        c = tl.load(out_ptr + offs_cond, mask=mask, other=0.0).to(tl.float32)
        o = o + w * (c - o)
    if OUT_SCALE:
        o = o * tl.load(out_scale_ptr + b, mask=in_batch, other=1.0)

    d_raw = d_point * p + d_out * o
    d = d_raw
    if CLIP:
        d = tl.minimum(tl.maximum(d_raw, -clip), clip)
    if THRESH:
        s = tl.load(thresh_ptr + b, mask=in_batch, other=1.0)
        d = tl.div_rn(tl.minimum(tl.maximum(d_raw, -s), s), s)  # IEEE division, as torch

    # x_next = state . V, point' = point_row . V over V = [x, P, D, D_raw, H0, H1, H2, z]
    # (without a point P is x; the executors fold its coefficient into x's on the host)
    x_next = tl.load(r + _S + 0) * x + tl.load(r + _S + 1) * p
    x_next += tl.load(r + _S + 2) * d + tl.load(r + _S + 3) * d_raw
    if HAS_POINT:
        p_next = tl.load(r + _P + 0) * x + tl.load(r + _P + 1) * p
        p_next += tl.load(r + _P + 2) * d + tl.load(r + _P + 3) * d_raw
    if PUSH:
        q = tl.load(r + _Q + 0) * x + tl.load(r + _Q + 1) * p
        q += tl.load(r + _Q + 2) * d + tl.load(r + _Q + 3) * d_raw
    if K >= 1:
        h = tl.load(h0_ptr + offs, mask=mask, other=0.0)
        x_next += tl.load(r + _S + 4) * h
        if HAS_POINT:
            p_next += tl.load(r + _P + 4) * h
        if PUSH:
            q += tl.load(r + _Q + 4) * h
    if K >= 2:
        h = tl.load(h1_ptr + offs, mask=mask, other=0.0)
        x_next += tl.load(r + _S + 5) * h
        if HAS_POINT:
            p_next += tl.load(r + _P + 5) * h
        if PUSH:
            q += tl.load(r + _Q + 5) * h
    if K >= 3:
        h = tl.load(h2_ptr + offs, mask=mask, other=0.0)
        x_next += tl.load(r + _S + 6) * h
        if HAS_POINT:
            p_next += tl.load(r + _P + 6) * h
        if PUSH:
            q += tl.load(r + _Q + 6) * h
    if NOISE:
        seed = tl.load(seed_ptr + b, mask=in_batch, other=0)
        z = normal_block(seed, start, counter, STREAM, ROWS, BLOCK)
        x_next += tl.load(r + _S + 7) * z
        if HAS_POINT:
            p_next += tl.load(r + _P + 7) * z
        if PUSH:
            q += tl.load(r + _Q + 7) * z
    if not HAS_POINT:
        p_next = x_next

    tl.store(x_ptr + offs, x_next, mask=mask)
    if HAS_POINT:
        tl.store(point_ptr + offs, p_next, mask=mask)
    if PUSH:
        tl.store(push_ptr + offs, q, mask=mask)
    if WRITE_MODEL_IN:
        m = (tl.load(r + 2) * p_next).to(model_in_ptr.dtype.element_ty)
        tl.store(model_in_ptr + offs, m, mask=mask)
        if MODEL_IN_CFG:
            tl.store(model_in_ptr + offs_cond, m, mask=mask)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"affine_step: {msg}")


def _check_per_sample(name: str, t, B: int, device) -> None:
    if t is None:
        return
    _check(isinstance(t, torch.Tensor), f"{name} must be a tensor")
    _check(t.shape == (B,), f"{name} must have shape [{B}], got {tuple(t.shape)}")
    _check(t.dtype == torch.float32, f"{name} must be float32, got {t.dtype}")
    _check(t.device == device, f"{name} is on {t.device}, x on {device}")
    _check(t.is_contiguous(), f"{name} must be contiguous")


def affine_step(
    row: int,
    coef: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor,
    *,
    point: torch.Tensor | None = None,
    history=(),
    push_dest: torch.Tensor | None = None,
    model_in: torch.Tensor | None = None,
    cfg_w: torch.Tensor | None = None,
    seeds: torch.Tensor,
    clip: float | None = None,
    thresh: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
    noise: bool = True,
    noise_counter: int | None = None,
) -> None:
    """Execute row `row` of a coefficient table in place (see the module docstring).

    coef: [R, 3 + 3*NCOL] float32 on x's device. `noise` (from the caller's host copy of
    the table) says whether this row reads z; False skips the draw (z = 0). noise_counter:
    the Philox counter of z (default: `row`; StepTable.noise_counter).
    """
    history = tuple(history)
    _check(isinstance(x, torch.Tensor) and x.dtype == torch.float32, "x must be a float32 tensor")
    _check(x.dim() >= 1 and x.is_contiguous(), "x must be contiguous [B, *S]")
    device, B, S = x.device, x.shape[0], tuple(x.shape[1:])
    N = x[0].numel() if B else 0
    _check(coef.dtype == torch.float32 and coef.dim() == 2 and coef.shape[1] == ROW_WIDTH,
           f"coef must be float32 [R, {ROW_WIDTH}], got {coef.dtype} {tuple(coef.shape)}")
    _check(coef.device == device and coef.is_contiguous(), "coef must be contiguous on x's device")
    row = int(row)
    _check(0 <= row < coef.shape[0], f"row {row} outside [0, {coef.shape[0]})")

    def same_shape(name, t, rows=(B,), dtypes=(torch.float32,)):
        _check(isinstance(t, torch.Tensor), f"{name} must be a tensor")
        _check(t.shape[0] in rows and tuple(t.shape[1:]) == S,
               f"{name} must have shape [{' or '.join(map(str, rows))}, *{list(S)}], got {tuple(t.shape)}")
        _check(t.dtype in dtypes, f"{name} dtype {t.dtype} not in {dtypes}")
        _check(t.device == device, f"{name} is on {t.device}, x on {device}")
        _check(t.is_contiguous(), f"{name} must be contiguous")

    same_shape("out", out, rows=(B, 2 * B), dtypes=MODEL_DTYPES)
    cfg = out.shape[0] == 2 * B and B > 0
    _check(not cfg or cfg_w is not None, "out has 2B rows ([uncond; cond]) but cfg_w is None")
    _check(cfg or cfg_w is None, "cfg_w given but out has B rows (no [uncond; cond] halves)")
    _check_per_sample("cfg_w", cfg_w, B, device)
    if point is not None:
        same_shape("point", point)
    _check(len(history) <= MAX_HISTORY, f"at most {MAX_HISTORY} history buffers, got {len(history)}")
    for k, h in enumerate(history):
        same_shape(f"history[{k}]", h)
    if push_dest is not None:
        same_shape("push_dest", push_dest)
    if model_in is not None:
        same_shape("model_in", model_in, rows=(B, 2 * B), dtypes=MODEL_DTYPES)
    _check(isinstance(seeds, torch.Tensor) and seeds.shape == (B,) and seeds.dtype == torch.int64,
           "seeds must be an int64 tensor [B]")
    _check(seeds.device == device and seeds.is_contiguous(), f"seeds must be contiguous on x's device ({device})")
    _check_per_sample("thresh", thresh, B, device)
    _check_per_sample("out_scale", out_scale, B, device)
    _check(clip is None or thresh is None, "clip and thresh are exclusive (thresholding clips itself)")
    _check(clip is None or clip > 0, f"clip must be positive, got {clip}")
    if B == 0 or N == 0:
        return

    ROWS, BLOCK = tile_shape(N)
    grid = launch_grid("affine_step", B, N, ROWS, BLOCK)
    h = list(history) + [x] * (MAX_HISTORY - len(history))  # unused slots: never read
    with on_device(x):
        _affine_step_kernel[grid](
            coef, row, row if noise_counter is None else int(noise_counter),
            x, point if point is not None else x, out, h[0], h[1], h[2],
            push_dest if push_dest is not None else x, model_in if model_in is not None else x,
            cfg_w if cfg_w is not None else x, seeds, thresh if thresh is not None else x,
            out_scale if out_scale is not None else x, float(clip) if clip is not None else 0.0, B, N,
            HAS_POINT=point is not None, CFG=cfg,
            K=len(history), PUSH=push_dest is not None, NOISE=bool(noise), CLIP=clip is not None,
            THRESH=thresh is not None, OUT_SCALE=out_scale is not None,
            WRITE_MODEL_IN=model_in is not None,
            MODEL_IN_CFG=model_in is not None and model_in.shape[0] == 2 * B,
            STREAM=STREAM_STEP, ROWS=ROWS, BLOCK=BLOCK, num_warps=NUM_WARPS,
        )
