"""Test configuration: without CUDA, Triton kernels run in Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence at conftest import.
"""
import os

import pytest


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


HAS_CUDA = _cuda_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

# Kernels run on CUDA when present, else on the CPU through the interpreter.
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here): GPU-only behaviour")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def kernel_device() -> str:
    return KERNEL_DEVICE
