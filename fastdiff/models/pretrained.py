"""Models that ship inside the package: `load_pretrained("digits")`."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ..schedules import Schedule
from .io import ModelFileError, load_model

WEIGHTS_DIR = Path(__file__).parent / "weights"
PRETRAINED = {
    "digits": "digits.safetensors",  # class-conditional U-Net, sklearn digits at 16x16
    "digits_classifier": "digits_classifier.safetensors",  # CNN + feature statistics, for eval
}


class Pretrained(NamedTuple):
    model: nn.Module  # eval mode
    schedule: Schedule | None  # None for models that are not denoisers (the classifier)
    metadata: dict

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.metadata["image_shape"])

    @property
    def num_classes(self) -> int | None:
        return self.metadata.get("num_classes")

    @property
    def null_class(self) -> int | None:
        return self.metadata.get("null_class")

    @property
    def data_range(self) -> tuple[float, float]:
        return tuple(self.metadata.get("data_range", (-1.0, 1.0)))

    @property
    def prediction(self) -> str | None:
        return self.metadata.get("prediction")

    def sampler_options(self, solver: str) -> dict:
        """Sampler keywords this model needs: its prediction type, and D clipped to the data
        range (pixel-space models: on the shipped digits, clipping took dpmpp_2m at 20 steps
        from FD 156 to 130 and removed the rare blown-out sample). DDIM then re-derives eps
        from the clipped x0: with diffusers' default (raw eps) its 20-step FD went to 434.
        Only the options `solver` takes (a Sampler refuses options its solver does not use)."""
        from ..solvers import solver_options

        lo, hi = self.data_range
        options = {"prediction": self.prediction or "epsilon"}
        if lo == -hi:
            options.update(clip_sample=True, clip_range=hi)
            if "use_clipped_model_output" in solver_options(solver):
                options.update(use_clipped_model_output=True)
        return options


def weights_path(name: str) -> Path:
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}; allowed: {', '.join(PRETRAINED)}")
    return WEIGHTS_DIR / PRETRAINED[name]


def schedule_from_metadata(metadata: dict, path: str | Path = "the model") -> Schedule | None:
    spec = metadata.get("schedule")
    if spec is None:
        return None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ModelFileError(f"{str(path)!r}: metadata field 'schedule' must be an object with a 'name', "
                             f"got {spec!r}")
    try:
        return Schedule.named(spec["name"], **{k: v for k, v in spec.items() if k != "name"})
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{str(path)!r}: metadata field 'schedule' is invalid: {e}") from None


def load_pretrained(name_or_path: str | Path = "digits", device: str | torch.device = "cpu") -> Pretrained:
    """A shipped model by name (digits, digits_classifier) or a saved model file (a
    .safetensors path with its .json beside it, as `fastdiff train` writes): the model in eval
    mode, its Schedule and metadata (image shape, num_classes, null_class, data range,
    prediction type)."""
    key = str(name_or_path)
    if key in PRETRAINED:
        path = weights_path(key)
    elif key.endswith(".safetensors") or Path(key).exists():
        path = Path(key)
    else:
        raise ValueError(f"unknown model {key!r}: neither a shipped model (shipped: {', '.join(PRETRAINED)}) "
                         "nor a .safetensors path")
    loaded = load_model(path, device=device)
    return Pretrained(loaded.model, schedule_from_metadata(loaded.metadata, path), loaded.metadata)
