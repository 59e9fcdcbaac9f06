"""The model dtypes the fused kernels take (model input and output tensors); state is float32."""
from __future__ import annotations

import torch

MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
