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


def check_device(device, name: str = "device") -> torch.device:
    """`device` as a torch.device, or a ValueError naming `name` (the parameter or option it came
    from) when it is not a CPU or CUDA device, or names a GPU this machine does not have."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name}: unknown device {device!r}; allowed: cpu, cuda, cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: unsupported device {device!r}; allowed: cpu, cuda, cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}={device!r}: CUDA is not available on this machine; use 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name}={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                             f"allowed: cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev
