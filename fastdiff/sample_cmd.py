"""`fastdiff sample`: a grid of samples, one row per class, from the embedded digits model.

    fastdiff sample                                   # dpmpp_2m, 20 steps, guidance 3, 8 per class
    fastdiff sample --solver unipc --steps 10 --classes 3,7 --per-class 16 --out sevens.png
    fastdiff sample --model run/digits.safetensors    # any saved model (its .json beside it)

Prints where it wrote, the wall time and the model evaluations per second.
(Bulk mode, `--seeds A-B --outdir DIR`, one file per seed, is fastdiff/bulk.py.)
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

DEFAULT_SOLVER, DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_PER_CLASS = "dpmpp_2m", 20, 3.0, 8
CELL_SCALE = 4  # 16x16 digits are drawn 4x larger (nearest) so the grid is readable


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="digits",
                   help="a shipped model name (digits) or a .safetensors path with its .json beside it")
    p.add_argument("--solver", default=DEFAULT_SOLVER, help="default: %(default)s")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="default: %(default)s")
    p.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE,
                   help="classifier-free guidance scale w: out = u + w (c - u); 1 is the conditional model alone "
                        "(one model call per step) (default %(default)s)")
    p.add_argument("--guidance-interval", default=None, metavar="LO,HI",
                   help="guide only the steps whose model-call VE sigma lies in [LO, HI]; elsewhere the model "
                        "sees the conditional half alone (default: every step)")
    p.add_argument("--classes", default=None, help="comma-separated class ids, one row each (default: all)")
    p.add_argument("--per-class", type=int, default=DEFAULT_PER_CLASS, help="samples per row (default %(default)s)")
    p.add_argument("--seeds", default=None,
                   help="one seed per sample, row by row, e.g. 0-79 or 1,5,9-12 (default 0..N-1)")
    p.add_argument("--out", default="samples.png", help="output image (default %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--backend", default="auto", help="auto, torch, triton (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: unknown device {name!r}; allowed: cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: unsupported device {name!r}; allowed: cpu, cuda, cuda:N")
    return device


def parse_classes(text: str | None, num_classes: int | None) -> list[int] | None:
    """Class ids for the rows; None for an unconditional model."""
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


def parse_guidance_interval(text: str) -> tuple[float, float]:
    """'LO,HI' -> (lo, hi), checked by guidance.check_guidance_interval (--guidance-interval)."""
    from .guidance import check_guidance_interval

    parts = text.split(",")
    try:
        values = tuple(float(v) for v in parts)
    except ValueError:
        values = None
    if values is None or len(values) != 2:
        raise ValueError(f"--guidance-interval must be LO,HI (two VE sigmas), got {text!r}")
    try:
        return check_guidance_interval(values)
    except ValueError as e:
        raise ValueError(f"--guidance-interval {text!r}: {e}") from None


def model_rows(sampler, guidance_scale: float, interval) -> int:
    """Model rows per sample: 2 for each guided row ([uncond; cond]), else 1 (guidance.row_guidance's rule,
    the one the sampler applies)."""
    from .guidance import row_guidance

    rows = row_guidance(sampler.table.sigma.tolist(), None, guidance_scale, interval)
    return sum(1 if f is None else 2 for f in rows)


def check_writable(out: Path) -> None:
    """Fail before sampling, not after, if the image cannot be written."""
    from PIL import Image

    if out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a directory; give a file name such as samples.png")
    if out.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--out {str(out)!r}: unknown image extension {out.suffix!r}; use e.g. .png")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"--out {str(out)!r}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ValueError(f"--out {str(out)!r}: not writable")


def save_grid(images: torch.Tensor, rows: int, path: Path, data_range=(-1.0, 1.0), scale: int = CELL_SCALE,
              pad: int = 2) -> None:
    """images [rows*cols, C, H, W] in data_range -> one PNG, row-major, with a white gutter."""
    from PIL import Image

    N, C, H, W = images.shape
    cols = N // rows
    lo, hi = data_range
    x = ((images.float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")  # [N, C, sH, sW]
    h, w = H * scale, W * scale
    grid = torch.ones(C, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i in range(N):
        r, c = divmod(i, cols)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = x[i]
    array = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # [H, W, C]
    Image.fromarray(array[..., 0] if C == 1 else array).save(path)


def main(args: argparse.Namespace) -> int:
    from .models.pretrained import PRETRAINED, load_from_file, load_pretrained
    from .sampler import Sampler
    from .seeds import parse_seed_range
    from .solvers import check_solver

    check_solver(args.solver)
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {args.per_class}")
    out = Path(args.out)
    check_writable(out)
    device = resolve_device(args.device)

    if args.model in PRETRAINED:
        loaded = load_pretrained(args.model, device=device)
    else:
        loaded = load_from_file(args.model, device=device)
    meta = loaded.metadata
    if loaded.schedule is None or "image_shape" not in meta:
        raise ValueError(f"--model {args.model!r} is not a diffusion model (no schedule/image_shape in its JSON)")
    classes = parse_classes(args.classes, meta.get("num_classes"))
    rows = len(classes) if classes is not None else 1
    n = rows * args.per_class
    seeds = parse_seed_range(args.seeds) if args.seeds is not None else list(range(n))
    if len(seeds) != n:
        raise ValueError(f"--seeds gives {len(seeds)} seeds; need one per sample: {rows} rows x {args.per_class} = {n}")

    w = args.guidance_scale
    guided = classes is not None and w != 1.0  # w = 1 is exactly the conditional model: skip the uncond half
    interval = parse_guidance_interval(args.guidance_interval) if args.guidance_interval is not None else None
    if interval is not None and not guided:
        raise ValueError("--guidance-interval needs guidance: a class-conditional model and --guidance-scale "
                         "other than 1")
    sampler = Sampler(loaded.model, loaded.schedule, solver=args.solver, steps=args.steps,
                      backend=args.backend, device=device, **loaded.sampler_options())
    cond = uncond = None
    if classes is not None:
        labels = torch.tensor(classes, device=device).repeat_interleave(args.per_class)  # [N], row by row
        cond = {"class_labels": labels}
        if guided:
            uncond = {"class_labels": torch.full_like(labels, meta.get("null_class", meta["num_classes"]))}

    shape = (n, *meta["image_shape"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    x = sampler.sample(shape=shape, seeds=seeds, cond=cond, uncond=uncond,
                       guidance_scale=w if guided else None, guidance_interval=interval,
                       progress=not args.no_progress)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start

    save_grid(x, rows, out, tuple(meta.get("data_range", (-1.0, 1.0))))
    evals = sampler.num_model_evals
    batch = n * (2 if guided else 1)
    images = n * model_rows(sampler, w if guided else 1.0, interval)  # rows through the model, both halves
    print(f"wrote {out} ({rows} rows x {args.per_class}; {args.solver}, {sampler.steps} steps"
          + (f", guidance {w:g}" if guided else "")
          + (f" for sigma in [{interval[0]:g}, {interval[1]:g}]" if interval else "") + f", {device.type})")
    if interval is None:
        print(f"sampling took {seconds:.2f} s: {evals / seconds:.1f} model evaluations/s "
              f"({evals} evaluations of a batch of {batch}, {images / seconds:.0f} images/s through the model)")
    else:
        print(f"sampling took {seconds:.2f} s: {evals / seconds:.1f} model evaluations/s ({evals} evaluations "
              f"of a batch of {n} or {batch}: {images // n} rows per sample, {images / seconds:.0f} images/s "
              "through the model)")
    return 0
