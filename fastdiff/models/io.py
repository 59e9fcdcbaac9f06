"""Save and load models as safetensors weights plus a JSON config beside them; never pickle.

    digits.safetensors   the state dict (and any extra tensors, under "extra.<name>")
    digits.json          {"format", "architecture", "config", "metadata"}

The architecture name picks the class from ARCHITECTURES; the config rebuilds it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

FORMAT = "fastdiff.model/1"
EXTRA_PREFIX = "extra."


class ModelFileError(ValueError):
    """A model file that is missing, unreadable or does not match its config."""


@dataclass
class LoadedModel:
    model: nn.Module
    metadata: dict
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. reference statistics


def _architectures() -> dict:
    # Imported here so that io has no import-time dependency on every model file.
    from .classifier import DigitsClassifier, DigitsClassifierConfig
    from .unet import UNet, UNetConfig

    return {"UNet": (UNet, UNetConfig), "DigitsClassifier": (DigitsClassifier, DigitsClassifierConfig)}


def config_path(weights_path: str | Path) -> Path:
    """The JSON that sits beside a .safetensors file."""
    return Path(weights_path).with_suffix(".json")


def save_model(
    model: nn.Module,
    path: str | Path,
    metadata: dict | None = None,
    extra: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `path` (.safetensors) and its JSON beside it. Returns the weights path.

    dtype (e.g. torch.float16) stores the model's floating-point weights smaller; load_model
    casts them back into the model's own parameters. Extra tensors keep their dtype.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path must end in .safetensors, got {str(path)!r}")
    names = {cls: name for name, (cls, _) in _architectures().items()}
    if type(model) not in names:
        raise ValueError(f"cannot save a {type(model).__name__}; allowed: {', '.join(sorted(names.values()))}")
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu")
        tensors[k] = (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
    for name, value in (extra or {}).items():
        tensors[EXTRA_PREFIX + name] = value.detach().to("cpu").contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": FORMAT})
    doc = {
        "format": FORMAT,
        "architecture": names[type(model)],
        "config": model.config.to_dict(),
        "metadata": metadata or {},
    }
    config_path(path).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return path


def read_config(path: str | Path) -> dict:
    """The JSON document beside `path`, checked for the fields load_model needs."""
    cpath = config_path(path)
    if not cpath.is_file():
        raise ModelFileError(f"model config {str(cpath)!r} not found (it must sit beside the .safetensors)")
    try:
        doc = json.loads(cpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"model config {str(cpath)!r} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ModelFileError(f"model config {str(cpath)!r}: format must be {FORMAT!r}")
    for key in ("architecture", "config"):
        if key not in doc:
            raise ModelFileError(f"model config {str(cpath)!r} lacks {key!r}")
    return doc


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the model from its JSON, load the safetensors weights, return it in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelFileError(f"model path must end in .safetensors, got {str(path)!r}")
    if not path.is_file():
        raise ModelFileError(f"model file {str(path)!r} not found")
    doc = read_config(path)
    archs = _architectures()
    if doc["architecture"] not in archs:
        raise ModelFileError(
            f"unknown architecture {doc['architecture']!r}; allowed: {', '.join(sorted(archs))}"
        )
    cls, config_cls = archs[doc["architecture"]]
    cpath = str(config_path(path))
    if not isinstance(doc["config"], dict):
        raise ModelFileError(f"model config {cpath!r}: 'config' must be an object, got {doc['config']!r}")
    check_config_types(config_cls, doc["config"], cpath)
    try:
        config = config_cls(**doc["config"])
        model = cls(config)
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"model config {cpath!r} is invalid: {e}") from None
    metadata = doc.get("metadata", {})
    check_metadata(metadata, config, cpath)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"model file {str(path)!r} is not a valid safetensors file: {e}") from None
    extra = {k[len(EXTRA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EXTRA_PREFIX)}
    state = {k: v for k, v in tensors.items() if not k.startswith(EXTRA_PREFIX)}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else "mismatch"
        raise ModelFileError(f"model file {str(path)!r} does not match its config: {first}") from None
    model.to(device).eval()
    return LoadedModel(model, metadata, {k: v.to(device) for k, v in extra.items()})


_FIELD_TYPES = {  # a config field's annotation -> the JSON values it accepts
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "tuple[int, ...]": lambda v: isinstance(v, (list, tuple)) and all(_FIELD_TYPES["int"](x) for x in v),
    "int | None": lambda v: v is None or _FIELD_TYPES["int"](v),
}


def check_config_types(config_cls, config: dict, where: str) -> None:
    """Each field of a config dataclass has its annotated type: `"base_channels": "32"` is
    named here rather than failing deep inside the model's constructor."""
    import dataclasses

    for f in dataclasses.fields(config_cls):
        check = _FIELD_TYPES.get(str(f.type))
        if f.name in config and check is not None and not check(config[f.name]):
            raise ModelFileError(f"model config {where!r}: field {f.name!r} must be {f.type}, "
                                 f"got {config[f.name]!r}")


def check_metadata(metadata, config, where: str) -> None:
    """metadata is an object; its image_shape, when present, is [C, H, W] of positive integers
    that the model takes (in_channels, image_size when the config has them)."""
    if not isinstance(metadata, dict):
        raise ModelFileError(f"model config {where!r}: 'metadata' must be an object, got {type(metadata).__name__}")
    if "image_shape" not in metadata:
        return
    shape = metadata["image_shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(_FIELD_TYPES["int"](v) and v > 0 for v in shape)):
        raise ModelFileError(f"model config {where!r}: metadata field 'image_shape' must be [C, H, W] of positive "
                             f"integers, got {shape!r}")
    channels, size = getattr(config, "in_channels", None), getattr(config, "image_size", None)
    if channels is not None and size is not None and shape != [channels, size, size]:
        raise ModelFileError(f"model config {where!r}: metadata field 'image_shape' {shape} does not match the "
                             f"model, which takes [{channels}, {size}, {size}] (in_channels, image_size)")
