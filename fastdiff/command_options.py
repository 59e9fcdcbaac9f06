"""What the sampling commands share (`fastdiff sample` in grid and bulk mode, `fastdiff eval`,
`fastdiff bench`): the --model, --device, --backend and --guidance-scale arguments, one
meaning each, and what they resolve to. The guidance scale's meaning is
fastdiff/class_conditioning.py's: 0 the unconditional model, 1 the conditional model alone.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

DEFAULT_GUIDANCE = 3.0


def add_model_arguments(p: argparse.ArgumentParser, guidance: bool = True) -> None:
    p.add_argument("--model", default="digits",
                   help="a shipped model name (digits) or a .safetensors path with its .json beside it "
                        "(default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"),
                   help="the step executor: torch, or the fused Triton kernel (default: %(default)s: triton on "
                        "CUDA, torch on the CPU)")
    if guidance:
        p.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE,
                       help="classifier-free guidance scale w: out = u + w (c - u); 0 is the unconditional "
                            "model, 1 the conditional model alone (both one model call per step) "
                            "(default: %(default)s)")
    add_progress_arguments(p)


def add_progress_arguments(p: argparse.ArgumentParser) -> None:
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", action="store_true", help="show the progress bar even when stderr is not a "
                     "terminal (default: shown on a terminal only)")
    bar.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def show_progress(args: argparse.Namespace) -> bool:
    """A bar on an interactive terminal, or anywhere with --progress; never with --no-progress."""
    return args.progress or (not args.no_progress and sys.stderr.isatty())


def guidance_scale(args: argparse.Namespace) -> float:
    w = args.guidance_scale
    if not math.isfinite(w):
        raise ValueError(f"--guidance-scale must be a finite number, got {w}")
    return w


def parse_guidance_interval(text: str) -> tuple[float, float]:
    """--guidance-interval 'LO,HI' -> (lo, hi), checked by guidance.check_guidance_interval."""
    from .guidance import check_guidance_interval

    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = None
    if values is None or len(values) != 2:
        raise ValueError(f"--guidance-interval must be LO,HI (two VE sigmas), got {text!r}")
    try:
        return check_guidance_interval(values)
    except ValueError as e:
        raise ValueError(f"--guidance-interval {text!r}: {e}") from None


def model_rows(sampler, guidance_scale: float | None, interval) -> int:
    """Model rows per sample: 2 for each guided row ([uncond; cond]), else 1 (guidance.row_guidance's
    rule, the one the sampler applies; no guidance at w = 0 or 1, class_conditioning's meaning)."""
    from .guidance import row_guidance

    if guidance_scale is None or guidance_scale in (0.0, 1.0):
        return sampler.table.rows
    rows = row_guidance(sampler.table.sigma.tolist(), None, guidance_scale, interval)
    return sum(1 if f is None else 2 for f in rows)


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: unknown device {name!r}; allowed: cpu, cuda, cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: unsupported device {name!r}; allowed: cpu, cuda, cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def load_diffusion_model(name_or_path: str, device: torch.device):
    """fastdiff.load_pretrained(--model), checked to be a diffusion model (a schedule and an
    image_shape in its JSON)."""
    from .models.pretrained import load_pretrained

    loaded = load_pretrained(name_or_path, device=device)
    if loaded.schedule is None or "image_shape" not in loaded.metadata:
        raise ValueError(f"--model {name_or_path!r} is not a diffusion model (no schedule/image_shape in its JSON)")
    return loaded


def parse_classes(text: str | None, num_classes: int | None) -> list[int] | None:
    """--classes as class ids (default: all); None for an unconditional model."""
    if num_classes is None:
        if text is not None:
            raise ValueError("--classes needs a class-conditional model; this one is unconditional")
        return None
    if text is None:
        return list(range(num_classes))
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ValueError(f"--classes must be comma-separated integers, got {text!r}") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad or not classes:
        raise ValueError(f"--classes: {bad or text!r} out of range; allowed: 0..{num_classes - 1}")
    return classes


def rate_text(evals: int, seconds: float) -> str:
    """Model evaluations per second, or seconds per evaluation when that reads better (< 1/s)."""
    if seconds > 0 and evals / seconds >= 1:
        return f"{evals / seconds:.1f} model evaluations/s"
    return f"{seconds / max(evals, 1):.2f} s per model evaluation"
