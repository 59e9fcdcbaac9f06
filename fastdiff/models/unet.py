"""An ADM/DDPM-style U-Net in plain PyTorch (Ho et al. 2020; Dhariwal & Nichol 2021).

Residual blocks (GroupNorm + SiLU, timestep embedding as scale/shift of the second norm),
a sinusoidal embedding of the (possibly fractional) training timestep, self-attention at
chosen resolutions, and optional class conditioning whose extra index `num_classes` is the
null class used for classifier-free guidance. Called as `model(x, t, class_labels=y)`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    image_size: int = 16
    in_channels: int = 1
    out_channels: int = 1
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (8,)  # feature-map sizes with self-attention
    head_channels: int = 32
    dropout: float = 0.0
    num_groups: int = 32
    num_classes: int | None = None  # None: unconditional; else index num_classes is null

    def __post_init__(self):
        # JSON round trips turn tuples into lists; keep the dataclass hashable and equal.
        object.__setattr__(self, "channel_mults", tuple(self.channel_mults))
        object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))
        if self.image_size % 2 ** (len(self.channel_mults) - 1):
            raise ValueError(
                f"image_size={self.image_size} must be divisible by "
                f"2**(len(channel_mults)-1)={2 ** (len(self.channel_mults) - 1)}"
            )
        for mult in self.channel_mults:
            if (self.base_channels * mult) % self.num_groups:
                raise ValueError(
                    f"base_channels*mult={self.base_channels * mult} must be divisible by "
                    f"num_groups={self.num_groups}"
                )

    def to_dict(self) -> dict:
        return asdict(self)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of float timesteps (Transformer / DDPM). t: [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]  # [B, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def zero_init(module: nn.Module) -> nn.Module:
    # Residual branches start as the identity, which stabilises early training (ADM).
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)  # scale and shift of norm2
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # x: [B, Cin, H, W], emb: [B, E]
        h = self.conv1(F.silu(self.norm1(x)))  # [B, Cout, H, W]
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    def __init__(self, ch: int, head_channels: int, groups: int):
        super().__init__()
        self.heads = max(1, ch // head_channels)
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero_init(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each [B, heads, HW, C/heads]
        h = F.scaled_dot_product_attention(q, k, v)  # [B, heads, HW, C/heads]
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(h)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """Res blocks (each optionally followed by attention) at one resolution."""

    def __init__(self, chans: list[tuple[int, int]], emb_dim: int, attn: bool, cfg: UNetConfig):
        super().__init__()
        self.res = nn.ModuleList(
            ResBlock(i, o, emb_dim, cfg.dropout, cfg.num_groups) for i, o in chans
        )
        self.attn = nn.ModuleList(
            AttentionBlock(o, cfg.head_channels, cfg.num_groups) if attn else nn.Identity()
            for _, o in chans
        )


class UNet(nn.Module):
    """ADM-style U-Net: `model(x, t, class_labels=None)` -> epsilon (or whatever it was trained on)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        ch0 = cfg.base_channels
        emb_dim = 4 * ch0
        self.time_mlp = nn.Sequential(nn.Linear(ch0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # One extra row: the null class (index num_classes) for classifier-free guidance.
        self.class_emb = (
            nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes is not None else None
        )
        self.conv_in = nn.Conv2d(cfg.in_channels, ch0, 3, padding=1)

        # Encoder: record every skip's channel count for the decoder.
        skips = [ch0]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        ch, res = ch0, cfg.image_size
        for i, mult in enumerate(cfg.channel_mults):
            out = ch0 * mult
            chans = []
            for _ in range(cfg.num_res_blocks):
                chans.append((ch, out))
                ch = out
                skips.append(ch)
            self.down.append(Level(chans, emb_dim, res in cfg.attention_resolutions, cfg))
            last = i == len(cfg.channel_mults) - 1
            self.downsample.append(nn.Identity() if last else Downsample(ch))
            if not last:
                skips.append(ch)
                res //= 2

        self.mid_res1 = ResBlock(ch, ch, emb_dim, cfg.dropout, cfg.num_groups)
        self.mid_attn = AttentionBlock(ch, cfg.head_channels, cfg.num_groups)
        self.mid_res2 = ResBlock(ch, ch, emb_dim, cfg.dropout, cfg.num_groups)

        # Decoder: num_res_blocks + 1 blocks per level, each eating one skip.
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.channel_mults))):
            out = ch0 * mult
            chans = []
            for _ in range(cfg.num_res_blocks + 1):
                chans.append((ch + skips.pop(), out))
                ch = out
            self.up.append(Level(chans, emb_dim, res in cfg.attention_resolutions, cfg))
            self.upsample.append(Upsample(ch) if i > 0 else nn.Identity())
            if i > 0:
                res *= 2

        self.norm_out = nn.GroupNorm(cfg.num_groups, ch)
        self.conv_out = zero_init(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        # x: [B, C, H, W]; t: [B] float (or a scalar); class_labels: [B] long or None
        cfg = self.config
        self._check_inputs(x, class_labels)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_mlp(timestep_embedding(t, cfg.base_channels).to(x.dtype))  # [B, E]
        if self.class_emb is not None:
            if class_labels is None:  # unconditional call: the null class
                class_labels = torch.full((x.shape[0],), cfg.num_classes, device=x.device)
            emb = emb + self.class_emb(class_labels.long())

        h = self.conv_in(x)
        hs = [h]
        for level, down in zip(self.down, self.downsample):
            for res, attn in zip(level.res, level.attn):
                h = attn(res(h, emb))
                hs.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                hs.append(h)

        h = self.mid_res2(self.mid_attn(self.mid_res1(h, emb)), emb)

        for level, up in zip(self.up, self.upsample):
            for res, attn in zip(level.res, level.attn):
                h = attn(res(torch.cat([h, hs.pop()], dim=1), emb))
            h = up(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def _check_inputs(self, x: torch.Tensor, class_labels: torch.Tensor | None) -> None:
        """Shapes and dtypes always (free); label values only where that costs no device
        sync (a CPU tensor, outside torch.compile): an index past the embedding on CUDA is
        otherwise a device-side assert."""
        cfg = self.config
        want = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"UNet input x must be [B, {want[0]}, {want[1]}, {want[2]}] (in_channels, image_size "
                             f"of this model), got {list(x.shape)}")
        if class_labels is None:
            return
        if self.class_emb is None:
            raise ValueError("class_labels given to an unconditional UNet (num_classes=None)")
        if not torch.is_tensor(class_labels) or class_labels.dtype.is_floating_point or \
                class_labels.dtype.is_complex or class_labels.dtype == torch.bool:
            what = class_labels.dtype if torch.is_tensor(class_labels) else type(class_labels).__name__
            raise TypeError(f"class_labels must be an integer tensor [B] (class ids), got {what}")
        if tuple(class_labels.shape) != (x.shape[0],):
            raise ValueError(f"class_labels must be [B] = [{x.shape[0]}], got {list(class_labels.shape)}")
        if class_labels.device.type == "cpu" and not torch.compiler.is_compiling():
            bad = class_labels[(class_labels < 0) | (class_labels > cfg.num_classes)]
            if bad.numel():
                raise ValueError(f"class_labels must be in 0..{cfg.num_classes - 1} (or {cfg.num_classes}, the null "
                                 f"class), got {int(bad[0])}")
