"""Solver error with the model held fixed: each solver's sample against the converged
probability-flow ODE solution of the same model, from the same noise and label.

A sampler's distance from the real data mixes two errors: the model's (how far its
probability-flow ODE lands from the data) and the solver's (how far its few steps land from
that ODE's solution). This module measures the second alone:

  reference  heun at `reference_steps` steps on a karras grid; its own error is bounded by
             halving (the RMSE between the solutions at N and N/2 steps, stated beside it);
  rmse       sqrt(mean (x - ref)^2) over samples and pixels, in data units ([-1, 1]);
  off        the fraction of pixels that differ from the reference by more than one level of
             an 8-bit image (1/255 of the data range: 2/255 in data units).

Every cell uses the same seeds (noise) and labels (seed i gets class i % num_classes), the
model's own sampler options (its prediction type and clipping) and, at guidance w != 1,
classifier-free guidance with the null class. The grids are named: `trailing` (diffusers'
spacing of integer timesteps), `karras` (rho = 7) and `exponential` (log sigma uniform, which
is log-SNR uniform: lambda = -log sigma), all from sigma_max of the schedule down to the data.

    python -m fastdiff.solver_error --num-samples 40 --out benchmarks/results/solver-error-digits.md
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import results_tables

SOLVERS = ("ddim", "heun", "dpmpp_2m", "unipc")  # the deterministic (probability-flow ODE) solvers
GRIDS = {"trailing": {"spacing": "trailing"}, "karras": {"sigmas": "karras"}, "exponential": {"sigmas": "exponential"}}
NFES = (5, 10, 20, 50)
GUIDANCE_SCALES = (1.0, 3.0)
REFERENCE_SOLVER, REFERENCE_GRID = "heun", "karras"
LEVEL = 2.0 / 255.0  # one 8-bit level of a [-1, 1] image


@dataclass
class ErrorCell:
    guidance: float
    solver: str
    grid: str
    budget: int  # the NFE column this cell belongs to
    nfe: int  # model evaluations per sample, as the sampler counts them
    steps: int
    rmse: float
    off: float
    seconds: float


@dataclass
class Reference:
    guidance: float
    steps: int
    nfe: int
    halving_rmse: float  # RMSE between the solutions at `steps` and `steps // 2`
    halving_off: float
    seconds: float


def steps_for_nfe(solver: str, nfe: int) -> int:
    """Steps that cost `nfe` model evaluations: Heun's last step is a single Euler step."""
    return (nfe + 1) // 2 if solver == "heun" else nfe


def rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).square().mean().sqrt())


def off_fraction(x: torch.Tensor, ref: torch.Tensor, level: float = LEVEL) -> float:
    return float(((x.double() - ref.double()).abs() > level).double().mean())


def class_samples(loaded, sampler, labels: torch.Tensor, seeds: list[int], guidance_scale: float,
                  batch: int) -> torch.Tensor:
    """sampler's class-conditional samples [N, *image_shape] on the CPU: seeds[i] with labels[i],
    classifier-free guidance with the model's null class unless guidance_scale == 1."""
    guided = guidance_scale != 1.0  # w = 1 is exactly the conditional model
    chunks = []
    for lo in range(0, len(seeds), batch):
        y = labels[lo:lo + batch].to(sampler.device)
        uncond = {"class_labels": torch.full_like(y, loaded.null_class)} if guided else None
        chunks.append(sampler.sample(shape=(len(y), *loaded.image_shape), seeds=seeds[lo:lo + batch],
                                     cond={"class_labels": y}, uncond=uncond,
                                     guidance_scale=guidance_scale if guided else None).cpu())
    return torch.cat(chunks)


def make_sampler(loaded, solver: str, steps: int, grid: str | None, device, backend: str = "auto", **options):
    """A Sampler for the loaded model with its own options; grid None is the solver's default."""
    from .sampler import Sampler

    if grid is not None and grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; allowed: {', '.join(GRIDS)}")
    return Sampler(loaded.model, loaded.schedule, solver=solver, steps=steps, device=device, backend=backend,
                   **(GRIDS[grid] if grid is not None else {}), **loaded.sampler_options(solver), **options)


def reference_solution(loaded, labels: torch.Tensor, seeds: list[int], guidance_scale: float, steps: int, batch: int,
                       device="cpu", backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(the reference at `steps`, the same at steps // 2): heun on a karras grid, whose
    difference bounds the reference's own error."""
    return tuple(class_samples(loaded, make_sampler(loaded, REFERENCE_SOLVER, n, REFERENCE_GRID, device, backend),
                               labels, seeds, guidance_scale, batch) for n in (steps, steps // 2))


def solver_error(loaded, *, solvers=SOLVERS, nfes=NFES, grids=tuple(GRIDS), guidance_scales=GUIDANCE_SCALES,
                 num_samples: int = 40, reference_steps: int = 500, batch: int = 40, device="cpu",
                 backend: str = "auto", log=None) -> tuple[list[ErrorCell], list[Reference]]:
    """Every (guidance, solver, grid, NFE) cell's distance from the reference solution; see the
    module docstring. `log(line)` is called after each cell (e.g. print)."""
    from .grids import make_grid
    from .solvers import build_table, check_solver

    for s in solvers:
        if build_table(check_solver(s), make_grid(loaded.schedule, 4), "epsilon").uses_noise().any():
            raise ValueError(f"solvers: {s!r} draws noise at every step; solver error is for the deterministic "
                             f"(probability-flow ODE) solvers, e.g. {', '.join(SOLVERS)}")
    for g in grids:
        if g not in GRIDS:
            raise ValueError(f"unknown grid {g!r}; allowed: {', '.join(GRIDS)}")
    if num_samples < 1 or batch < 1:
        raise ValueError(f"num_samples and batch must be >= 1, got {num_samples} and {batch}")
    if reference_steps < 4:
        raise ValueError(f"reference_steps must be >= 4 (it is checked against half as many), got {reference_steps}")
    if min(nfes) < 1:
        raise ValueError(f"nfes must be positive, got {list(nfes)}")
    log = log or (lambda line: None)
    labels = torch.arange(num_samples) % loaded.num_classes
    seeds = list(range(num_samples))
    cells, references = [], []
    for w in guidance_scales:
        start = time.perf_counter()
        ref, half = reference_solution(loaded, labels, seeds, w, reference_steps, batch, device, backend)
        reference = Reference(w, reference_steps, 2 * reference_steps - 1, rmse(half, ref), off_fraction(half, ref),
                              time.perf_counter() - start)
        references.append(reference)
        log(f"guidance {w:g}: reference {REFERENCE_SOLVER} {reference_steps} steps on {REFERENCE_GRID}; "
            f"vs {reference_steps // 2} steps: rmse {reference.halving_rmse:.2e} ({reference.seconds:.0f} s)")
        for solver in solvers:
            for grid in grids:
                for nfe in nfes:
                    start = time.perf_counter()
                    sampler = make_sampler(loaded, solver, steps_for_nfe(solver, nfe), grid, device, backend)
                    x = class_samples(loaded, sampler, labels, seeds, w, batch)
                    cell = ErrorCell(w, solver, grid, nfe, sampler.num_model_evals, sampler.steps, rmse(x, ref),
                                     off_fraction(x, ref), time.perf_counter() - start)
                    cells.append(cell)
                    log(f"guidance {w:g} {solver:>9} {grid:>11} NFE {cell.nfe:>3}: rmse {cell.rmse:.2e} "
                        f"off {cell.off:.3f} ({cell.seconds:.0f} s)")
    return cells, references


def write_markdown(cells: list[ErrorCell], references: list[Reference], path: Path, header: dict) -> None:
    lines = [*results_tables.header_lines(
        "Solver error on the digits: distance from the converged probability-flow solution", header,
        ["rmse: root mean square difference from the reference, in data units ([-1, 1]); off: fraction of "
         "pixels more than one 8-bit level (2/255 in data units) from the reference"]), ""]
    nfes = sorted({c.budget for c in cells})
    for ref in references:
        w = ref.guidance
        lines += [f"## Guidance {w:g}", "",
                  f"Reference: {REFERENCE_SOLVER}, {ref.steps} steps ({ref.nfe} evaluations) on a {REFERENCE_GRID} "
                  f"grid. Halving check: {ref.steps // 2} steps differ from it by rmse {ref.halving_rmse:.2e}, "
                  f"off {ref.halving_off:.4f}.", ""]
        keys = dict.fromkeys((c.solver, c.grid) for c in cells if c.guidance == w)
        for title, fmt in (("rmse", lambda c: f"{c.rmse:.2e}"), ("off (fraction of pixels)", lambda c: f"{c.off:.3f}")):
            lines += [f"### {title}", "",
                      *results_tables.nfe_table(["solver", "grid"], keys, nfes,
                                                {(c.solver, c.grid, c.budget): fmt(c) for c in cells
                                                 if c.guidance == w}), ""]
    lines += ["## Every cell", ""]
    lines += results_tables.pipe_table(
        ["guidance", "solver", "grid", "NFE budget", "NFE", "steps", "rmse", "off", "seconds"],
        [[f"{c.guidance:g}", c.solver, c.grid, f"{c.budget}", f"{c.nfe}", f"{c.steps}", f"{c.rmse:.3e}",
          f"{c.off:.4f}", f"{c.seconds:.1f}"] for c in cells], align="rllrrrrrr")
    results_tables.write(path, lines)
    path.with_suffix(".json").write_text(json.dumps(
        {"header": header, "references": [asdict(r) for r in references], "cells": [asdict(c) for c in cells]},
        indent=1) + "\n")


def write_plot(cells: list[ErrorCell], references: list[Reference], path: Path, title: str) -> bool:
    """log-log rmse against NFE, one panel per guidance scale; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(1, len(references), figsize=(5.5 * len(references), 4.4), squeeze=False)
    solvers = list(dict.fromkeys(c.solver for c in cells))
    grids = list(dict.fromkeys(c.grid for c in cells))
    styles, markers = ("-", "--", ":", "-."), "osD^v"
    for ax, ref in zip(axes[0], references):
        for i, solver in enumerate(solvers):
            for j, grid in enumerate(grids):
                row = sorted((c for c in cells if (c.guidance, c.solver, c.grid) == (ref.guidance, solver, grid)),
                             key=lambda c: c.nfe)
                if row:
                    ax.plot([c.nfe for c in row], [c.rmse for c in row], color=f"C{i}", ls=styles[j % 4],
                            marker=markers[j % 5], ms=4, label=f"{solver}, {grid}")
        ax.axhline(ref.halving_rmse, color="gray", lw=1, ls="--",
                   label=f"reference: {ref.steps // 2} vs {ref.steps} steps")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = sorted({c.budget for c in cells})
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("model evaluations per sample (NFE)")
        ax.set_ylabel("rmse to the converged solution (data units)")
        ax.set_title(f"guidance {ref.guidance:g}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=6, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _list(name: str, text: str, kind=int) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name} must be a comma-separated list, got {text!r}") from None
    if not values:
        raise ValueError(f"{name} must list at least one value, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="digits", help="a shipped model name or a .safetensors path")
    p.add_argument("--solvers", default=",".join(SOLVERS), help="comma-separated (default %(default)s)")
    p.add_argument("--grids", default=",".join(GRIDS), help="comma-separated (default %(default)s)")
    p.add_argument("--nfes", default=",".join(map(str, NFES)), help="default %(default)s")
    p.add_argument("--guidance-scales", default=",".join(f"{w:g}" for w in GUIDANCE_SCALES), help="default %(default)s")
    p.add_argument("--num-samples", type=int, default=40, help="default %(default)s")
    p.add_argument("--reference-steps", type=int, default=500, help="heun steps of the reference (default %(default)s)")
    p.add_argument("--batch", type=int, default=40, help="samples per sampler call (default %(default)s)")
    p.add_argument("--out", default="solver-error-digits.md", help="markdown table; .json and .png beside it")
    p.add_argument("--device", default="cpu")


def main(args: argparse.Namespace, command: str = "python -m fastdiff.solver_error") -> int:
    from .command_options import load_diffusion_model

    out = Path(args.out)
    if out.suffix != ".md":
        raise ValueError(f"--out must end in .md (the plot and JSON go beside it), got {str(out)!r}")
    device = torch.device(args.device)
    loaded = load_diffusion_model(args.model, device)
    if loaded.num_classes is None or loaded.schedule is None:
        raise ValueError(f"--model {args.model!r}: solver error needs a class-conditional diffusion model")
    options = dict(solvers=_list("--solvers", args.solvers, str), grids=_list("--grids", args.grids, str),
                   nfes=_list("--nfes", args.nfes), guidance_scales=_list("--guidance-scales", args.guidance_scales,
                                                                           float))
    start = time.perf_counter()
    cells, references = solver_error(loaded, **options, num_samples=args.num_samples,
                                     reference_steps=args.reference_steps, batch=args.batch, device=device,
                                     log=lambda line: print(line, flush=True))
    total = time.perf_counter() - start
    device_name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)" \
        if device.type == "cpu" else torch.cuda.get_device_name(device)
    header = {"model": args.model, "samples": f"{args.num_samples} (seeds 0..{args.num_samples - 1}, seed i "
              f"gets class i % {loaded.num_classes})", "sampler options (ddim's)": loaded.sampler_options("ddim"),
              "device": device_name, "torch": torch.__version__, "total time": f"{total / 60:.1f} min",
              "command": f"{command} --solvers {args.solvers} --grids {args.grids} --nfes {args.nfes} "
                         f"--guidance-scales {args.guidance_scales} --num-samples {args.num_samples} "
                         f"--reference-steps {args.reference_steps} --out {args.out}"}
    write_markdown(cells, references, out, header)
    plot = out.with_suffix(".png")
    wrote = write_plot(cells, references, plot, f"{args.model}: solver error, {args.num_samples} samples, {device_name}")
    print(f"wrote {out}, {out.with_suffix('.json')}" + (f" and {plot}" if wrote else "") + f" in {total / 60:.1f} min")
    return 0


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """`fastdiff eval --solver-error`: its own options; eval's --solvers, --nfes and --num-samples
    apply when given (their defaults are the quality run's, so unless given this run takes its own)."""
    g = p.add_argument_group("solver error (--solver-error)")
    g.add_argument("--solver-error", action="store_true",
                   help="instead of sample quality: each deterministic solver's distance from the converged "
                        f"probability-flow solution (default: {', '.join(SOLVERS)} at NFE "
                        f"{','.join(map(str, NFES))}, 40 samples; out solver-error-<model>.md)")
    g.add_argument("--grids", default=",".join(GRIDS), help="with --solver-error (default %(default)s)")
    g.add_argument("--guidance-scales", default=",".join(f"{w:g}" for w in GUIDANCE_SCALES),
                   help="with --solver-error (default %(default)s)")
    g.add_argument("--reference-steps", type=int, default=500,
                   help="with --solver-error: heun steps of the reference (default %(default)s)")
    p.set_defaults(quality_defaults={k: p.get_default(k) for k in ("solvers", "nfes", "num_samples")})


def eval_main(args: argparse.Namespace) -> int:
    from .command_options import resolve_device

    given = {k: getattr(args, k) for k, v in args.quality_defaults.items() if getattr(args, k) != v}
    run = argparse.Namespace(
        model=args.model, solvers=given.get("solvers", ",".join(SOLVERS)), grids=args.grids,
        nfes=given.get("nfes", ",".join(map(str, NFES))), guidance_scales=args.guidance_scales,
        num_samples=given.get("num_samples", 40), reference_steps=args.reference_steps, batch=args.batch,
        out=args.out or f"solver-error-{Path(args.model).stem}.md", device=str(resolve_device(args.device)))
    return main(run, command="fastdiff eval --solver-error")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m fastdiff.solver_error", description=__doc__.split("\n")[0])
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
