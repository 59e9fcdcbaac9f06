"""Which GPU work goes to: Triton launches, CUDA streams and graph capture all use the
*current* CUDA device, whatever device the tensors are on, so the kernel launchers and
Sampler.sample enter their tensors' device first (a no-op on the CPU)."""
from __future__ import annotations

import contextlib

import torch


def on_device(where: torch.Tensor | torch.device):
    """Context manager: make the GPU of `where` (a tensor or a device) the current device."""
    device = where.device if isinstance(where, torch.Tensor) else torch.device(where)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
