"""Where a launch goes: Triton launches on the *current* CUDA device's stream, whatever device
the pointers are on, so every launcher enters its tensors' device first (a no-op on the CPU,
where the kernels run in Triton's interpreter)."""
from __future__ import annotations

import contextlib

import torch


def on_device(t: torch.Tensor):
    """Context manager: make t's GPU the current device for the launch inside it."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
