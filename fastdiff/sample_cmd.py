"""`fastdiff sample`: the embedded digits model (or --model) into a PNG grid, or, with
--outdir, bulk mode: one file per seed, shared among ranks, resumable (fastdiff/bulk.py).

    fastdiff sample                                   # dpmpp_2m_sde, 20 steps, guidance 3, 8 per class
    fastdiff sample --solver unipc --steps 10 --classes 3,7 --per-class 16 --out sevens.png
    fastdiff sample --model run/digits.safetensors    # any saved model (its .json beside it)
    fastdiff sample --seeds 0-999 --outdir out/ [--nproc 2 | under torchrun]

Both modes read the model, solver, steps, guidance, classes and seeds the same way
(fastdiff/command_options.py, fastdiff/class_conditioning.py); a flag of the other mode is refused.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from .command_options import (add_model_arguments, guidance_scale, load_diffusion_model, model_rows, parse_classes,
                              parse_guidance_interval, rate_text, resolve_device, show_progress)

DEFAULT_SOLVER, DEFAULT_STEPS, DEFAULT_PER_CLASS, DEFAULT_OUT, DEFAULT_BATCH = "dpmpp_2m_sde", 20, 8, "samples.png", 64
CELL_SCALE = 4  # 16x16 digits are drawn 4x larger (nearest) so the grid is readable
GRID_FLAGS = {"per_class": "--per-class", "out": "--out", "guidance_interval": "--guidance-interval"}
BULK_FLAGS = {"batch": "--batch", "format": "--format", "npz": "--npz", "nproc": "--nproc"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .bulk import FORMATS
    from .solvers import SOLVERS

    add_model_arguments(p)
    p.add_argument("--solver", default=DEFAULT_SOLVER,
                   help=f"one of {', '.join(SOLVERS)} (default: %(default)s)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="solver steps (default: %(default)s)")
    p.add_argument("--classes", default=None,
                   help="comma-separated class ids: one grid row each; in bulk mode seed s gets "
                        "classes[s %% len(classes)] (default: all classes)")
    p.add_argument("--guidance-interval", default=None, metavar="LO,HI",
                   help="guide only the steps whose model-call VE sigma lies in [LO, HI]; elsewhere the model "
                        "sees the conditional half alone (default: every step)")
    p.add_argument("--seeds", default=None,
                   help="one seed per sample, e.g. 0-79 or 1,5,9-12 (grid: row by row, default 0..N-1; "
                        "bulk mode: required)")
    g = p.add_argument_group("grid mode (without --outdir): one PNG, a row per class")
    g.add_argument("--per-class", type=int, default=None, help=f"samples per row (default {DEFAULT_PER_CLASS})")
    g.add_argument("--out", default=None, help=f"output image (default {DEFAULT_OUT})")
    g = p.add_argument_group(
        "bulk mode (--seeds A-B --outdir DIR)",
        "one file per seed, DIR/{seed:06d}.png, shared among the ranks of a torchrun job; a rerun skips the files "
        "already there and refuses other settings; a second run into DIR waits for the first")
    g.add_argument("--outdir", default=None, help="write DIR/{seed:06d}.png (or .npy) instead of a grid")
    g.add_argument("--batch", type=int, default=None, help=f"samples per batch and rank (default {DEFAULT_BATCH})")
    g.add_argument("--format", choices=FORMATS, default=None, help="png (uint8, default) or npy (raw float32)")
    g.add_argument("--npz", default=None, help="also collect every sample into this .npz (rank 0, at the end)")
    g.add_argument("--nproc", type=int, default=None,
                   help="spawn this many local ranks instead of torchrun (on the CPU each gets cores/N threads)")


def main(args: argparse.Namespace) -> int:
    bulk_mode = args.outdir is not None
    other, belongs, here = ((GRID_FLAGS, "grid mode (without --outdir)", "bulk mode writes one file per seed into "
                             "--outdir") if bulk_mode else
                            (BULK_FLAGS, "bulk mode (--outdir DIR)", "grid mode writes one image, --out"))
    for name, flag in other.items():
        if getattr(args, name) is not None:
            raise ValueError(f"{flag} belongs to {belongs}; {here}")
    from .solvers import check_solver

    check_solver(args.solver)
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    guidance_scale(args)
    return bulk_main(args) if bulk_mode else grid_main(args)


# ---- grid mode ---------------------------------------------------------------------------
def check_writable(out: Path) -> None:
    """Fail before sampling, not after, if the image cannot be written."""
    from PIL import Image

    if str(out) == "" or out.is_dir():
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
    """images [rows*cols, C, H, W] in data_range -> one image, row-major, with a white gutter;
    written atomically (a full disk leaves no partial file and names the path)."""
    from PIL import Image

    from .output_files import atomic_open

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
    image = Image.fromarray(array[..., 0] if C == 1 else array)
    with atomic_open(path) as f:
        image.save(f, format=Image.registered_extensions()[path.suffix.lower()])


def grid_main(args: argparse.Namespace) -> int:
    from .class_conditioning import class_conditioning, model_calls_per_step
    from .sampler import Sampler
    from .seeds import parse_seed_range

    per_class = DEFAULT_PER_CLASS if args.per_class is None else args.per_class
    if per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {per_class}")
    out = Path(DEFAULT_OUT if args.out is None else args.out)
    check_writable(out)
    device = resolve_device(args.device)
    loaded = load_diffusion_model(args.model, device)
    meta = loaded.metadata
    classes = parse_classes(args.classes, meta.get("num_classes"))
    rows = len(classes) if classes is not None else 1
    n = rows * per_class
    seeds = parse_seed_range(args.seeds) if args.seeds is not None else list(range(n))
    if len(seeds) != n:
        raise ValueError(f"--seeds gives {len(seeds)} seeds; need one per sample: {rows} rows x {per_class} = {n}")

    w = guidance_scale(args) if classes is not None else None
    interval = parse_guidance_interval(args.guidance_interval) if args.guidance_interval is not None else None
    # one call: a CUDA graph captured here would never be replayed, so run the loop eagerly
    sampler = Sampler(loaded.model, loaded.schedule, solver=args.solver, steps=args.steps, graph=False,
                      backend=args.backend, device=device, **loaded.sampler_options(args.solver))
    cond = uncond = cfg = None
    if classes is not None:
        labels = torch.tensor(classes, device=device).repeat_interleave(per_class)  # [N], row by row
        cond, uncond, cfg = class_conditioning(labels, loaded.null_class, w)
    if interval is not None and cfg is None:
        raise ValueError("--guidance-interval needs guidance: a class-conditional model and --guidance-scale "
                         "other than 0 and 1")

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    x = sampler.sample(shape=(n, *loaded.image_shape), seeds=seeds, cond=cond, uncond=uncond, guidance_scale=cfg,
                       guidance_interval=interval, progress=show_progress(args))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start

    save_grid(x, rows, out, loaded.data_range)
    evals = sampler.num_model_evals
    batch = n * model_calls_per_step(w)
    print(f"wrote {out} ({rows} rows x {per_class}; {args.solver}, {sampler.steps} steps"
          + (f", guidance {w:g}" if w is not None else "")
          + (f" for sigma in [{interval[0]:g}, {interval[1]:g}]" if interval else "") + f", {device.type})")
    if interval is None:
        print(f"sampling took {seconds:.2f} s: {rate_text(evals, seconds)} "
              f"({evals} evaluations of a batch of {batch}, {evals * batch / seconds:.0f} images/s through the model)")
    else:
        images = n * model_rows(sampler, w, interval)  # rows through the model, both halves
        print(f"sampling took {seconds:.2f} s: {rate_text(evals, seconds)} ({evals} evaluations of a batch of "
              f"{n} or {batch}: {images // n} rows per sample, {images / seconds:.0f} images/s through the model)")
    return 0


# ---- bulk mode ---------------------------------------------------------------------------
def bulk_main(args: argparse.Namespace) -> int:
    """A bulk run: joins the process group of torchrun, or spawns --nproc local ranks."""
    from .distributed import launch
    from .seeds import parse_seed_range

    if args.outdir == "":
        raise ValueError("--outdir must name a folder, got ''")
    if args.seeds is None:
        raise ValueError("bulk mode (--outdir) needs --seeds, e.g. --seeds 0-49999")
    seeds = parse_seed_range(args.seeds)
    if args.batch is not None and args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if args.nproc is not None and args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if args.npz is not None and Path(args.npz).suffix != ".npz":
        raise ValueError(f"--npz must name a .npz file, got {args.npz!r}")
    if args.nproc is not None and "RANK" not in os.environ:
        _check_settings_before_launch(args)  # a spawned rank's error would read as "rank 0 failed"
        launch(args.nproc, _run_rank, args, seeds)
        return 0
    _run_rank(args, seeds)
    return 0


def run_settings(args: argparse.Namespace, classes) -> dict:
    """What the files of a bulk run depend on, keyed by flag: recorded in DIR/.fastdiff-run.json."""
    model = args.model if not Path(args.model).exists() else str(Path(args.model).resolve())
    return {"--model": model, "--solver": args.solver, "--steps": args.steps, "--guidance-scale": args.guidance_scale,
            "--classes": classes, "--format": args.format or "png"}


def _check_settings_before_launch(args: argparse.Namespace) -> None:
    from .models.pretrained import load_pretrained
    from .output_files import check_run_settings

    if Path(args.outdir).is_dir():
        classes = parse_classes(args.classes, load_pretrained(args.model).num_classes)
        check_run_settings(Path(args.outdir), run_settings(args, classes), record=False)


def cpu_threads_per_rank(local_world: int) -> int:
    """Each of the local ranks gets its share of the cores this process may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, local_world))


def _run_rank(args: argparse.Namespace, seeds: list[int]):
    from .bulk import generate
    from .distributed import distributed
    from .sampler import Sampler

    with distributed(args.device) as (ranks, device):
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if device.type == "cpu" and local_world > 1 and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(cpu_threads_per_rank(local_world))  # N ranks x all cores oversubscribes
        loaded = load_diffusion_model(args.model, device)
        classes = parse_classes(args.classes, loaded.num_classes)
        sampler = Sampler(loaded.model, loaded.schedule, solver=args.solver, steps=args.steps,
                          backend=args.backend, device=device, **loaded.sampler_options(args.solver))
        return generate(sampler, seeds, args.outdir, sample_shape=loaded.image_shape,
                        batch=DEFAULT_BATCH if args.batch is None else args.batch, fmt=args.format or "png",
                        data_range=loaded.data_range, classes=classes, null_class=loaded.null_class,
                        guidance_scale=guidance_scale(args) if classes is not None else None, npz=args.npz,
                        progress=show_progress(args), ranks=ranks, settings=run_settings(args, classes))
