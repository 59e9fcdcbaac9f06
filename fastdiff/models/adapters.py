"""Adapters: any denoiser becomes `model(x, t, **cond) -> tensor` for the Sampler.

The Sampler calls its model as `model(x, t, **cond)` with x: [B, C, H, W] in the model's
dtype and t: float32 [B] training timesteps (fractional for solvers between grid points).
An adapter returns a plain tensor (unwrapping diffusers' `.sample` or a tuple) and hands
t to the model in the form it expects. diffusers is imported only if it is already loaded.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from .unet import UNet

DIFFUSERS_UNETS = ("UNet2DModel", "UNet2DConditionModel")


def plain_output(out) -> torch.Tensor:
    """diffusers' UNet2DOutput (`.sample`), a tuple (its first item) or a tensor -> tensor."""
    if torch.is_tensor(out):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    raise TypeError(f"model returned {type(out).__name__}; expected a tensor, a .sample output or a tuple")


class CallableDenoiser(nn.Module):
    """Wraps any `fn(x, t, **kw)`. timestep_dtype: torch.float32 passes t as given (fractional
    timesteps allowed); an integer dtype rounds t first, for models that index tables by t."""

    def __init__(self, fn, timestep_dtype: torch.dtype = torch.float32):
        super().__init__()
        if not callable(fn):
            raise TypeError(f"model must be callable as model(x, t, **kw), got {type(fn).__name__}")
        self.fn = fn  # an nn.Module is registered, so .to(), .parameters() and .eval() reach it
        self.timestep_dtype = timestep_dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kw) -> torch.Tensor:
        # x: [B, C, H, W]; t: [B]
        t = torch.as_tensor(t, device=x.device)
        if not self.timestep_dtype.is_floating_point:
            t = t.round()  # nearest integer timestep, not truncation
        return plain_output(self.fn(x, t.to(self.timestep_dtype), **kw))


class DiffusersUNet(nn.Module):
    """diffusers' UNet2DModel or UNet2DConditionModel as `model(x, t, **cond) -> tensor`.

    t goes in as float32 [B]: diffusers' sinusoidal projection accepts fractional timesteps.
    class_labels are passed only to a model with a class embedding; encoder_hidden_states
    (and any other keyword) are passed through unchanged.
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        if type(unet).__name__ not in DIFFUSERS_UNETS:
            raise TypeError(f"unet must be one of {', '.join(DIFFUSERS_UNETS)}, got {type(unet).__name__}")
        self.unet = unet
        cfg = unet.config
        self.has_class_embedding = (
            getattr(cfg, "num_class_embeds", None) is not None or getattr(cfg, "class_embed_type", None) is not None
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None,
                **kw) -> torch.Tensor:
        # x: [B, C, H, W]; t: [B] (a scalar is broadcast)
        t = torch.as_tensor(t, device=x.device).to(torch.float32)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if class_labels is not None:
            if not self.has_class_embedding:
                raise ValueError("class_labels given, but this diffusers UNet has no class embedding "
                                 "(config.num_class_embeds / class_embed_type is None)")
            kw["class_labels"] = class_labels
        return plain_output(self.unet(x, t, return_dict=False, **kw))


def is_diffusers_unet(model) -> bool:
    diffusers = sys.modules.get("diffusers")  # a diffusers model implies diffusers is imported
    if diffusers is None:
        return False
    classes = tuple(getattr(diffusers, name) for name in DIFFUSERS_UNETS if hasattr(diffusers, name))
    return isinstance(model, classes)


def adapt(model) -> nn.Module:
    """The Sampler's view of `model`: our UNet and adapters as they are, diffusers UNets
    wrapped in DiffusersUNet, any other callable in CallableDenoiser."""
    if isinstance(model, (UNet, CallableDenoiser, DiffusersUNet)):
        return model
    if is_diffusers_unet(model):
        return DiffusersUNet(model)
    if callable(model):
        return CallableDenoiser(model)
    raise TypeError(f"model must be a UNet, a diffusers UNet2DModel/UNet2DConditionModel or a callable "
                    f"model(x, t, **kw); got {type(model).__name__}")
