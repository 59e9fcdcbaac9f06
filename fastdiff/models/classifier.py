"""A small CNN that classifies 16x16 digits; its penultimate features give a Fréchet distance.

Used only to judge samples (`fastdiff eval`): accuracy of class-conditional samples under
this classifier, and the Fréchet distance (Heusel et al. 2017) of its features to the real
digits' features, whose mean and covariance ship in the same safetensors file.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DigitsClassifierConfig:
    image_size: int = 16
    in_channels: int = 1
    num_classes: int = 10
    channels: tuple[int, ...] = (32, 64)
    feature_dim: int = 128
    dropout: float = 0.3

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(self.channels))
        if self.image_size % 2 ** len(self.channels):
            raise ValueError(
                f"image_size={self.image_size} must be divisible by 2**len(channels)={2 ** len(self.channels)}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


class DigitsClassifier(nn.Module):
    """conv-conv-pool per stage, then one hidden layer: `features(x)` is that layer."""

    def __init__(self, config: DigitsClassifierConfig):
        super().__init__()
        self.config = cfg = config
        layers: list[nn.Module] = []
        ch = cfg.in_channels
        for out in cfg.channels:
            layers += [nn.Conv2d(ch, out, 3, padding=1), nn.ReLU(),
                       nn.Conv2d(out, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            ch = out
        self.conv = nn.Sequential(*layers)
        side = cfg.image_size // 2 ** len(cfg.channels)
        self.hidden = nn.Linear(ch * side * side, cfg.feature_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, H, W] in [-1, 1] -> [B, feature_dim]
        return F.relu(self.hidden(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, H, W] -> logits [B, num_classes]
        return self.head(self.dropout(self.features(x)))
