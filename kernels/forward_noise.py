"""Forward noising q(x_t | x_0) with in-kernel noise (img2img, training).

    x_t[b] = sqrt(abar_b) * x0[b] + sqrt(1 - abar_b) * z[b]
    z = noise[b] if given, else N(0, 1) keyed (seeds[b], step, STREAM_FORWARD, element)

sqrt(abar_b) and sqrt(1 - abar_b) are taken in float64 and rounded to float32, the
combination in fp32, cast on store to out's dtype.
"""
import torch
import triton
import triton.language as tl

from fastdiff.devices import on_device
from fastdiff.dtypes import MODEL_DTYPES
from fastdiff.rng import STREAM_FORWARD

from .philox import normal_block
from .tiles import NUM_WARPS, launch_grid, sample_tile, tile_shape


@triton.jit
def _forward_noise_kernel(
    x0_ptr, abar_ptr, seed_ptr, noise_ptr, out_ptr, step, B, N,
    HAS_NOISE: tl.constexpr, STREAM: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    b, e, start, mask, in_batch = sample_tile(B, N, ROWS, BLOCK)  # kernels/tiles.py
    offs = b * N + e  # [ROWS, BLOCK] of rows b of [B, N]

    abar = tl.load(abar_ptr + b, mask=in_batch, other=0.0).to(tl.float64)  # per-sample: exact sqrt in fp64
    a = tl.sqrt(abar).to(tl.float32)
    s = tl.sqrt(1.0 - abar).to(tl.float32)
    x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_NOISE:
        z = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        z = normal_block(tl.load(seed_ptr + b, mask=in_batch, other=0), start, step, STREAM, ROWS, BLOCK)
    tl.store(out_ptr + offs, (a * x0 + s * z).to(out_ptr.dtype.element_ty), mask=mask)


def forward_noise(
    x0: torch.Tensor,
    abar: torch.Tensor,
    seeds: torch.Tensor,
    step: int = 0,
    noise: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x_t = sqrt(abar_b) x0 + sqrt(1 - abar_b) z; x0 [B, *S], abar [B], seeds [B] int64."""

    def check(cond, msg):
        if not cond:
            raise ValueError(f"forward_noise: {msg}")

    check(isinstance(x0, torch.Tensor) and x0.dtype in MODEL_DTYPES, f"x0 dtype must be one of {MODEL_DTYPES}")
    check(x0.dim() >= 1 and x0.is_contiguous(), "x0 must be contiguous [B, *S]")
    B, device = x0.shape[0], x0.device
    check(isinstance(abar, torch.Tensor) and abar.shape == (B,), f"abar must be a [{B}] tensor")
    check(abar.dtype in (torch.float32, torch.float64), f"abar must be float32/float64, got {abar.dtype}")
    check(isinstance(seeds, torch.Tensor) and seeds.shape == (B,) and seeds.dtype == torch.int64,
          "seeds must be an int64 tensor [B]")
    check(0 <= int(step) < 2**32, f"step must be in [0, 2**32), got {step}")
    for name, t in (("noise", noise), ("out", out)):
        if t is not None:
            check(t.shape == x0.shape, f"{name} shape {tuple(t.shape)} != x0 shape {tuple(x0.shape)}")
            check(t.dtype in MODEL_DTYPES and t.is_contiguous(), f"{name} must be a contiguous float tensor")
            check(t.device == device, f"{name} is on {t.device}, x0 on {device}")
    check(abar.device == device and seeds.device == device, "abar and seeds must be on x0's device")
    if out is None:
        out = torch.empty_like(x0)
    N = x0[0].numel() if B else 0
    if B == 0 or N == 0:
        return out
    abar, seeds = abar.contiguous(), seeds.contiguous()  # the kernel reads abar[b], seeds[b]
    ROWS, BLOCK = tile_shape(N)
    grid = launch_grid("forward_noise", B, N, ROWS, BLOCK)
    with on_device(x0):
        _forward_noise_kernel[grid](
            x0, abar, seeds, noise if noise is not None else x0, out, int(step), B, N,
            HAS_NOISE=noise is not None, STREAM=STREAM_FORWARD, ROWS=ROWS, BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )
    return out
