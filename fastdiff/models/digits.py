"""scikit-learn's bundled 8x8 digits (1797 images, no download) as [-1, 1] images."""
from __future__ import annotations

import torch
import torch.nn.functional as F

DATA_RANGE = (-1.0, 1.0)
NUM_CLASSES = 10


def load_digits(image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, 1, S, S] float32 in [-1, 1] and labels [N] int64, upsampled bilinearly to S."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as e:
        raise ImportError("the digits data needs scikit-learn: pip install scikit-learn") from e
    if image_size < 8 or image_size & (image_size - 1):
        raise ValueError(f"image_size must be a power of two >= 8, got {image_size}")
    bunch = sklearn_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0  # [N, 1, 8, 8] in [0, 1]
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x * 2.0 - 1.0).clamp(-1.0, 1.0)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    return x, y
