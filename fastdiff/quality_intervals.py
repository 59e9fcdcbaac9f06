"""Sample quality per cell with its noise stated: classifier accuracy and Fréchet distance
(`fastdiff.evaluate`'s Judge and frechet_distance) with bootstrap intervals over samples.

A cell is a solver at a budget of model evaluations, on its default grid unless the cell names
one, optionally with sampler options (`dpmpp_2m@20+sigmas=karras+guidance_rescale=0.7`) and
another model than --model (`dpmpp_2m@20+model=runs/digits/online.safetensors`: models compared
on the same seeds and labels, judged by the same classifier). Every cell draws the same seeds with
the same labels (seed i gets class i % num_classes), so cells are paired sample by sample:

  interval   FD +- 1.96 standard deviations of the FD over bootstrap resamples of the cell's
             samples (a resample repeats samples, which biases its FD upward: its spread, not its
             centre, is used); accuracy: the 2.5-97.5 percentiles over the same resamples;
  vs base    FD(cell) / FD(base cell) with a paired interval: its value times exp(+-1.96 sd of
             the log ratio over the same resamples); the difference is within noise when it contains 1;
  floor      the FD of n real digits against the real digits' statistics, over several
             disjoint draws of n (the best a perfect sampler does at this n).

Features of each cell are kept in --cache (safetensors), so a rerun skips cells already drawn.

    python -m fastdiff.quality_intervals --guidance-scale 1 --num-samples 180 \\
        --cells ddim@10,dpmpp_2m@20,ddpm@1000 --base ddpm@1000 --out benchmarks/results/quality-guidance-1-digits.md
"""
from __future__ import annotations

import argparse
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import results_tables
from .evaluate import Judge, frechet_distance
from .solver_error import class_samples, make_sampler, steps_for_nfe

BOOTSTRAP = 200
# Sampler options a cell may set, with their types (the rest of a cell is solver@nfe)
CELL_OPTIONS = {"model": str, "sigmas": str, "spacing": str, "guidance_rescale": float, "thresholding": lambda v: v in ("1", "true", "True"),
                "dynamic_thresholding_ratio": float, "sample_max_value": float}


@dataclass
class QualityCell:
    name: str  # the cell spec, e.g. dpmpp_2m@20+guidance_rescale=0.7
    solver: str
    nfe: int
    steps: int
    options: dict
    accuracy: float
    accuracy_interval: tuple[float, float]
    fd: float
    fd_interval: tuple[float, float]
    ratio_to_base: tuple[float, float, float] | None  # FD / FD(base): estimate, 2.5%, 97.5%
    seconds: float


def parse_cell(spec: str) -> tuple[str, int, dict]:
    """'solver@nfe[+option=value...]' -> (solver, nfe, options)."""
    from .solvers import check_solver

    head, *opts = spec.strip().split("+")
    solver, sep, nfe = head.partition("@")
    if not sep or not nfe.isdigit() or int(nfe) < 1:
        raise ValueError(f"cell {spec!r} must be solver@nfe[+option=value...], e.g. dpmpp_2m@20+guidance_rescale=0.7")
    options = {}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or key not in CELL_OPTIONS:
            raise ValueError(f"cell {spec!r}: option {opt!r} must be one of {', '.join(CELL_OPTIONS)} as key=value")
        options[key] = CELL_OPTIONS[key](value)
    return check_solver(solver), int(nfe), options


def fd_of(features: torch.Tensor, judge: Judge) -> float:
    return frechet_distance(features.mean(0), torch.cov(features.T), judge.mean, judge.cov)


def percentiles(values: torch.Tensor) -> tuple[float, float]:
    lo, hi = torch.quantile(values.double(), torch.tensor([0.025, 0.975], dtype=torch.float64))
    return float(lo), float(hi)


@torch.no_grad()
def judge_features(judge: Judge, images: torch.Tensor) -> torch.Tensor:
    """The classifier's penultimate features [N, F] in float64, as Judge computes them."""
    return judge.model.features(images.clamp(*judge.data_range).to(judge.mean.device)).double().cpu()


def real_floor(judge: Judge, n: int, draws: int = 5) -> list[float]:
    """FD of `draws` disjoint random sets of n real digits (fewer if the data runs out)."""
    from .models.digits import load_digits

    images, _ = load_digits(judge.model.config.image_size)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return [fd_of(judge_features(judge, images[order[k * n:(k + 1) * n]]), judge)
            for k in range(min(draws, len(images) // n))]


def bootstrap(features: dict[str, torch.Tensor], correct: dict[str, torch.Tensor], judge: Judge, base: str | None,
              resamples: int = BOOTSTRAP, seed: int = 0) -> dict[str, dict]:
    """Per cell: intervals for FD, accuracy and FD / FD(base) from the same `resamples` index sets.
    A resample repeats samples, which biases its FD upward: FD and the ratio take the resamples'
    spread (of FD, of log ratio) around the full sample's value; accuracy their percentiles."""
    n = next(iter(features.values())).shape[0]
    gen = torch.Generator().manual_seed(seed)
    idx = [torch.randint(0, n, (n,), generator=gen) for _ in range(resamples)]
    fds = {k: torch.tensor([fd_of(f[i], judge) for i in idx]) for k, f in features.items()}
    accs = {k: torch.stack([c[i].double().mean() for i in idx]) for k, c in correct.items()}
    out = {}
    for k in features:
        ratio = None
        if base is not None and base in fds:
            r, spread = fd_of(features[k], judge) / fd_of(features[base], judge), float((fds[k] / fds[base]).log().std())
            ratio = (r, r * math.exp(-1.96 * spread), r * math.exp(1.96 * spread))
        fd, spread = fd_of(features[k], judge), 1.96 * float(fds[k].std())
        out[k] = {"fd_interval": (fd - spread, fd + spread), "accuracy_interval": percentiles(accs[k]), "ratio": ratio}
    return out


def cache_path(cache: Path, spec: str, guidance_scale: float, n: int) -> Path:
    name = spec.replace("@", "_at_").replace("+", "_").replace("=", "-").replace("/", "_")
    return cache / f"{name}-w{guidance_scale:g}-n{n}.safetensors"


def model_cache(cache: Path, model: str) -> Path:
    """The cache's folder for --model: a shipped name, or the file's whole resolved path
    (two runs/NAME/digits.safetensors must not share cells)."""
    key = model if not Path(model).suffix else str(Path(model).resolve()).strip("/")
    return cache / key.replace("/", "_")


def draw_cell(loaded, judge: Judge, spec: str, guidance_scale: float, n: int, batch: int, device,
              cache: Path | None) -> tuple[torch.Tensor, torch.Tensor, int, int, float]:
    """(features [n, F], correct [n], nfe, steps, seconds) of one cell, from the cache when there."""
    from safetensors.torch import load_file, save_file

    solver, nfe, options = parse_cell(spec)
    path = cache_path(cache, spec, guidance_scale, n) if cache is not None else None
    if path is not None and path.exists():
        d = load_file(path)
        return d["features"], d["correct"].bool(), int(d["nfe"]), int(d["steps"]), float(d["seconds"])
    start = time.perf_counter()
    if "model" in options:
        from .models.pretrained import load_pretrained

        loaded = load_pretrained(options.pop("model"), device=device)
    sampler = make_sampler(loaded, solver, steps_for_nfe(solver, nfe), None, device, **options)
    labels = torch.arange(n) % loaded.num_classes
    images = class_samples(loaded, sampler, labels, list(range(n)), guidance_scale, batch)
    seconds = time.perf_counter() - start
    feats = judge_features(judge, images)
    with torch.no_grad():
        correct = judge.model.head(feats.to(judge.mean.device, torch.float32)).argmax(1).cpu() == labels
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"features": feats, "correct": correct.to(torch.uint8),
                   "nfe": torch.tensor(sampler.num_model_evals), "steps": torch.tensor(sampler.steps),
                   "seconds": torch.tensor(seconds, dtype=torch.float64)}, str(path))
    return feats, correct, sampler.num_model_evals, sampler.steps, seconds


def quality(loaded, judge: Judge, specs: list[str], *, guidance_scale: float, num_samples: int, batch: int = 60,
            base: str | None = None, device="cpu", cache: Path | None = None, log=None) -> list[QualityCell]:
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 (the Fréchet distance needs a covariance), got {num_samples}")
    if base is not None and base not in specs:
        raise ValueError(f"base {base!r} must be one of the cells {specs}")
    log = log or (lambda line: None)
    features, correct, drawn = {}, {}, {}
    for spec in specs:
        feats, ok, nfe, steps, seconds = draw_cell(loaded, judge, spec, guidance_scale, num_samples, batch, device,
                                                   cache)
        features[spec], correct[spec], drawn[spec] = feats, ok, (nfe, steps, seconds)
        log(f"guidance {guidance_scale:g} {spec:>40}: NFE {nfe:>4} accuracy {ok.double().mean():.3f} "
            f"FD {fd_of(feats, judge):7.2f} ({seconds:.0f} s)")
    stats = bootstrap(features, correct, judge, base)
    cells = []
    for spec in specs:
        solver, _, options = parse_cell(spec)
        nfe, steps, seconds = drawn[spec]
        s = stats[spec]
        cells.append(QualityCell(spec, solver, nfe, steps, options, float(correct[spec].double().mean()),
                                 s["accuracy_interval"], fd_of(features[spec], judge), s["fd_interval"], s["ratio"],
                                 seconds))
    return cells


def write_markdown(cells: list[QualityCell], path: Path, header: dict, floor: list[float], base: str | None) -> None:
    notes = [f"real digits, {len(floor)} disjoint draws of the same n: FD " + ", ".join(f"{v:.1f}" for v in floor)
             + " (the floor at this n; their spread is the spread between seed sets of a perfect sampler)",
             f"intervals from {BOOTSTRAP} bootstrap resamples of the samples (the same indices in every cell, so "
             "cells are compared pairwise): FD +- 1.96 bootstrap standard deviations; FD ratio times exp(+-1.96 sd of "
             "its log); accuracy: 2.5-97.5 percentiles"]
    lines = [*results_tables.header_lines("Sample quality on the digits with its noise: classifier accuracy and "
                                          "Fréchet distance", header, notes), ""]
    ratio_column = [f"FD / FD({base}) (95% paired)"] if base else []
    rows = []
    for c in cells:
        ratio = []
        if base:
            ratio = [f"{c.ratio_to_base[0]:.3f} ({c.ratio_to_base[1]:.3f}-{c.ratio_to_base[2]:.3f})"
                     if c.ratio_to_base else ""]
        rows.append([c.name, f"{c.nfe}", f"{c.steps}",
                     f"{c.accuracy:.3f} ({c.accuracy_interval[0]:.3f}-{c.accuracy_interval[1]:.3f})",
                     f"{c.fd:.1f} ({c.fd_interval[0]:.1f}-{c.fd_interval[1]:.1f})", *ratio, f"{c.seconds:.0f}"])
    lines += results_tables.pipe_table(
        ["cell", "NFE", "steps", "accuracy (95%)", "FD (95%)", *ratio_column, "seconds"], rows,
        align="lrrll" + "l" * len(ratio_column) + "r")
    results_tables.write(path, lines)


def main(args: argparse.Namespace) -> int:
    from .models.pretrained import load_pretrained

    specs = [s.strip() for s in args.cells.split(",") if s.strip()]
    for spec in specs:
        parse_cell(spec)
    out = Path(args.out)
    if out.suffix != ".md":
        raise ValueError(f"--out must end in .md, got {str(out)!r}")
    device = torch.device(args.device)
    loaded = load_pretrained(args.model, device=device)
    judge = Judge(device)
    start = time.perf_counter()
    cells = quality(loaded, judge, specs, guidance_scale=args.guidance_scale, num_samples=args.num_samples,
                    batch=args.batch, base=args.base, device=device, cache=model_cache(Path(args.cache), args.model) if args.cache else None,
                    log=lambda line: print(line, flush=True))
    floor = real_floor(judge, args.num_samples)
    device_name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)" \
        if device.type == "cpu" else torch.cuda.get_device_name(device)
    header = {"model": args.model, "guidance scale": args.guidance_scale,
              "samples per cell": f"{args.num_samples} (seeds 0..{args.num_samples - 1}, seed i gets class i % "
                                  f"{loaded.num_classes}); each solver on its default grid unless the cell names sigmas or spacing",
              "classifier": f"shipped digits CNN, held-out accuracy {judge.metadata.get('heldout_accuracy')}",
              "device": device_name, "torch": torch.__version__,
              "sampling time": f"{sum(c.seconds for c in cells) / 60:.1f} min (cells drawn in this run: "
                               f"{(time.perf_counter() - start) / 60:.1f} min with judging)",
              "command": "python -m fastdiff.quality_intervals"
                         + (f" --model {args.model}" if args.model != "digits" else "")
                         + f" --guidance-scale {args.guidance_scale:g} "
                         f"--num-samples {args.num_samples} --cells {args.cells}"
                         + (f" --base {args.base}" if args.base else "") + f" --out {args.out}"}
    write_markdown(cells, out, header, floor, args.base)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m fastdiff.quality_intervals", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--cells", required=True, help="comma-separated solver@nfe[+option=value...]")
    parser.add_argument("--base", default=None, help="the cell every FD is divided by (paired interval)")
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--num-samples", type=int, default=180)
    parser.add_argument("--batch", type=int, default=60)
    parser.add_argument("--cache", default=None, help="folder for each cell's features, in a subfolder per --model (a rerun skips drawn cells)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu")
    raise SystemExit(main(parser.parse_args()))
