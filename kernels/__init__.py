"""Triton kernels (installed as fastdiff.kernels): one op per file, each a kernel + launcher.

    affine_step      one row of a solver's coefficient table, fused (affine_step.py)
    forward_noise    q(x_t | x_0) with in-kernel noise (forward_noise.py)
    gaussian_kl      the variational bound's denoising KLs, one per row, fused (gaussian_kl.py)
    schedule_tables  alphas_cumprod, SNRs and DDPM posterior tables on the device (schedule_tables.py)

philox.py holds the in-kernel normal draw, bit-compatible with fastdiff.rng; tiles.py the 1-D
grid of (samples, chunk) tiles the per-sample kernels launch.
"""
from .affine_step import affine_step
from .forward_noise import forward_noise
from .gaussian_kl import gaussian_kl
from .schedule_tables import schedule_tables

__all__ = ["affine_step", "forward_noise", "gaussian_kl", "schedule_tables"]
