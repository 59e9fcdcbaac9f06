"""`fastdiff eval`: sample quality against model evaluations, for every solver, on the digits.

For each (solver, NFE) cell: draw class-conditional samples (seed i gets class i % 10; the
same seeds in every cell), then judge them with the shipped digits classifier:
  accuracy  how often the classifier reads the requested class;
  FD        the Fréchet distance (Heusel et al. 2017) between the Gaussian fitted to the
            classifier's penultimate features of the samples and that of the real digits.
heun evaluates the model twice per step except the last, so a budget of nfe evaluations
runs (nfe + 1) // 2 steps (2 * steps - 1 evaluations: 9 for a budget of 10). The tables are
by budget; the plot and the per-cell table use the sampler's own count. Writes a markdown
table and a PNG plot (default: quality-<model>.md and .png in the current directory; the
committed results are made with --out benchmarks/results/quality-digits.md). Each --guidance-interval LO,HI
adds a row per solver guided only where the model-call sigma lies in [LO, HI]; "model rows"
counts the model's per-sample work (a guided call evaluates two rows per sample, [uncond;
cond], an unguided one row).
"""
from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import nll_eval, results_tables, solver_error
from .solver_error import steps_for_nfe

SOLVERS = ("ddpm", "ddim", "euler", "heun", "dpmpp_2m", "unipc", "euler_ancestral", "dpmpp_2m_sde")
NFES = (10, 20, 50, 100, 250)
EXTRA_CELLS = (("ddpm", 1000),)  # the sampler DDPM was trained for


@dataclass
class Cell:
    solver: str
    budget: int  # the NFE column this cell belongs to
    nfe: int  # model evaluations per sample, as the sampler counts them (heun: budget - 1 if even)
    steps: int
    accuracy: float
    fd: float
    seconds: float
    samples: int
    interval: tuple[float, float] | None = None  # guidance interval (VE sigma), None: every step guided
    model_rows: int = 0  # model rows evaluated per sample (a guided call counts its two halves)

    @property
    def label(self) -> str:
        if self.interval is None:
            return self.solver
        return f"{self.solver}, guided for sigma in [{self.interval[0]:g}, {self.interval[1]:g}]"


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)), in float64.

    tr (C1 C2)^(1/2) = sum of sqrt(eigenvalues of C1^(1/2) C2 C1^(1/2)), a symmetric PSD
    matrix, so symmetric eigendecompositions suffice (no general sqrtm).
    """
    mu1, cov1, mu2, cov2 = (v.double().cpu() for v in (mu1, cov1, mu2, cov2))
    evals, evecs = torch.linalg.eigh(cov1)
    root1 = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T  # C1^(1/2)
    middle = root1 @ cov2 @ root1
    tr_covmean = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * tr_covmean)


class Judge:
    """The shipped digits classifier and the real digits' feature statistics."""

    def __init__(self, device: torch.device):
        from .models.io import load_model
        from .models.pretrained import weights_path

        loaded = load_model(weights_path("digits_classifier"), device=device)
        self.model, self.metadata = loaded.model, loaded.metadata
        self.mean, self.cov = loaded.extra["feature_mean"], loaded.extra["feature_cov"]
        self.data_range = tuple(self.metadata.get("data_range", (-1.0, 1.0)))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        # images: [N, 1, 16, 16] in data_range; labels: [N]
        x = images.clamp(*self.data_range).to(self.mean.device)
        feats = self.model.features(x)  # [N, F]
        accuracy = (self.model.head(feats).argmax(1) == labels.to(x.device)).double().mean().item()
        f = feats.double()
        return accuracy, frechet_distance(f.mean(0), torch.cov(f.T), self.mean, self.cov)


def real_digits_floor(judge: Judge, n: int, seed: int = 0) -> tuple[float, float]:
    """Accuracy and FD of n real digits: the floor a perfect sampler would reach at this n."""
    from .models.digits import load_digits

    images, labels = load_digits(judge.model.config.image_size)
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    return judge(images[idx], labels[idx])


def sample_cell(loaded, solver: str, nfe: int, num_samples: int, batch: int, guidance_scale: float,
                device: torch.device, backend: str, interval=None):
    """num_samples class-conditional samples from one (solver, NFE, guidance interval) setting."""
    from .class_conditioning import class_conditioning
    from .sampler import Sampler

    sampler = Sampler(loaded.model, loaded.schedule, solver=solver, steps=steps_for_nfe(solver, nfe),
                      backend=backend, device=device, **loaded.sampler_options(solver))
    labels = torch.arange(num_samples) % loaded.num_classes  # [N]
    chunks = []
    for lo in range(0, num_samples, batch):
        cond, uncond, w = class_conditioning(labels[lo:lo + batch].to(device), loaded.null_class, guidance_scale)
        chunks.append(sampler.sample(shape=(len(cond["class_labels"]), *loaded.image_shape),
                                     seeds=list(range(lo, lo + len(cond["class_labels"]))), cond=cond,
                                     uncond=uncond, guidance_scale=w,
                                     guidance_interval=interval if w is not None else None).cpu())
    return torch.cat(chunks), labels, sampler


def evaluate(loaded, judge: Judge, cells: list[tuple], *, num_samples: int, batch: int,
             guidance_scale: float, device: torch.device, backend: str = "auto", progress: bool = True) -> list[Cell]:
    from tqdm.auto import tqdm

    results = []
    bar = tqdm(cells, desc="eval", disable=not progress, dynamic_ncols=True)
    for solver, nfe, *interval in bar:  # (solver, nfe) or (solver, nfe, (lo, hi))
        interval = interval[0] if interval else None
        bar.set_postfix_str(f"{solver} @ {nfe}")
        start = time.perf_counter()
        images, labels, sampler = sample_cell(loaded, solver, nfe, num_samples, batch, guidance_scale, device,
                                              backend, interval)
        seconds = time.perf_counter() - start
        accuracy, fd = judge(images, labels)
        from .command_options import model_rows

        cell = Cell(solver, nfe, sampler.num_model_evals, sampler.steps, accuracy, fd, seconds, num_samples,
                    interval, model_rows(sampler, guidance_scale, interval))
        results.append(cell)
        bar.write(f"{cell.label:>16} NFE {cell.nfe:>4} ({cell.model_rows} model rows): accuracy {accuracy:.3f}  "
                  f"FD {fd:8.3f}  ({seconds:.0f} s)")
    return results


def write_markdown(results: list[Cell], path: Path, header: dict, floor: tuple[float, float]) -> None:
    solvers = list(dict.fromkeys(c.label for c in results))
    nfes = sorted({c.budget for c in results})
    floor_note = (f"real digits ({header['samples per cell']} drawn at random): accuracy {floor[0]:.3f}, "
                  f"FD {floor[1]:.3f} (the floor at this sample count)")
    lines = [*results_tables.header_lines("Sample quality on the digits: classifier accuracy and Fréchet distance "
                                          "vs model evaluations", header, [floor_note]), ""]
    for title, fmt in (("Classifier accuracy (higher is better)", lambda c: f"{c.accuracy:.3f}"),
                       ("Fréchet distance on classifier features (lower is better)", lambda c: f"{c.fd:.2f}")):
        lines += [f"## {title}", "",
                  *results_tables.nfe_table(["solver"], [(s,) for s in solvers], nfes,
                                            {(c.label, c.budget): fmt(c) for c in results}), ""]
    lines += ["## Every cell", "", "model rows: model evaluations per sample counting both halves of a guided "
              "call ([uncond; cond]).", ""]
    lines += results_tables.pipe_table(
        ["solver", "NFE budget", "NFE", "steps", "samples", "accuracy", "FD", "seconds", "model rows"],
        [[c.label, f"{c.budget}", f"{c.nfe}", f"{c.steps}", f"{c.samples}", f"{c.accuracy:.3f}", f"{c.fd:.3f}",
          f"{c.seconds:.1f}", f"{c.model_rows}"] for c in results], align="lrrrrrrrr")
    results_tables.write(path, lines)


def write_plot(results: list[Cell], path: Path, floor: tuple[float, float], title: str) -> bool:
    """Accuracy and FD against NFE, one line per solver; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, (ax_fd, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    markers, styles = "os^vDP*X", ("-", "--", ":", "-.")  # solvers that coincide (ddim/euler) stay visible
    for i, solver in enumerate(dict.fromkeys(c.label for c in results)):
        cells = sorted((c for c in results if c.label == solver), key=lambda c: c.nfe)
        style = {"marker": markers[i % len(markers)], "ls": styles[i % len(styles)], "ms": 5, "label": solver}
        ax_fd.plot([c.nfe for c in cells], [c.fd for c in cells], **style)
        ax_acc.plot([c.nfe for c in cells], [c.accuracy for c in cells], **style)
    ticks = sorted({c.budget for c in results})
    for ax, value, name in ((ax_fd, floor[1], "Fréchet distance (lower is better)"),
                            (ax_acc, floor[0], "classifier accuracy (higher is better)")):
        ax.axhline(value, color="gray", ls="--", lw=1, label="real digits")
        ax.set_xscale("log")
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("model evaluations per sample (NFE)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    ax_fd.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _int_list(name: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{name} must list positive integers, got {text!r}")
    return values


def plan_cells(solvers: list[str], nfes: list[int], extra: bool, intervals=()) -> list[tuple]:
    cells = [(s, n) for s in solvers for n in nfes]
    if extra:
        cells += [c for c in EXTRA_CELLS if c[0] in solvers and c not in cells]
    cells += [(s, n, iv) for iv in intervals for s in solvers for n in nfes]
    return cells


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .command_options import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--solvers", default=",".join(SOLVERS), help="comma-separated (default: all eight)")
    p.add_argument("--nfes", default=",".join(map(str, NFES)), help="model evaluations per sample, "
                   "comma-separated (default %(default)s; plus ddpm at 1000 unless --no-ddpm-1000)")
    p.add_argument("--no-ddpm-1000", action="store_true", help="skip the ddpm cell at 1000 evaluations")
    p.add_argument("--num-samples", type=int, default=500,
                   help="samples per cell, at least 2 (the Fréchet distance needs a covariance) (default %(default)s)")
    p.add_argument("--batch", type=int, default=250, help="samples per sampler call (default %(default)s)")
    p.add_argument("--out", default=None, help="markdown table; the plot goes beside it as .png "
                   "(default: quality-<model>.md, with --nll nll-<model>.md, in the current directory)")
    p.add_argument("--guidance-interval", action="append", default=[], metavar="LO,HI",
                   help="also evaluate guidance only where LO <= sigma <= HI (VE sigma of the model call; "
                        "elsewhere the conditional half alone); repeat for more rows")
    nll_eval.add_arguments(p)
    solver_error.add_eval_arguments(p)


def default_out(model: str) -> Path:
    """quality-<model name or file stem>.md in the current directory."""
    return Path(f"quality-{Path(model).stem}.md")


def main(args: argparse.Namespace) -> int:
    if args.nll:
        if args.guidance_interval:
            raise ValueError("--guidance-interval belongs to the sample-quality table, not --nll")
        return nll_eval.main(args)
    if args.solver_error:
        if args.guidance_interval:
            raise ValueError("--guidance-interval belongs to the sample-quality table, not --solver-error")
        return solver_error.eval_main(args)
    from .command_options import (guidance_scale, load_diffusion_model, parse_guidance_interval, resolve_device,
                                  show_progress)
    from .solvers import check_solver

    solvers = [check_solver(s.strip()) for s in args.solvers.split(",") if s.strip()]
    if not solvers:
        raise ValueError(f"--solvers must name at least one solver; allowed: {', '.join(SOLVERS)}")
    nfes = _int_list("--nfes", args.nfes)
    intervals = [parse_guidance_interval(text) for text in args.guidance_interval]
    if intervals and args.guidance_scale in (0.0, 1.0):
        raise ValueError("--guidance-interval needs guidance (--guidance-scale other than 0 and 1)")
    if args.num_samples < 2:
        raise ValueError(f"--num-samples must be >= 2 (the Fréchet distance needs a covariance), "
                         f"got {args.num_samples}")
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    guidance_scale(args)
    out = Path(args.out) if args.out is not None else default_out(args.model)
    if out.suffix != ".md":
        raise ValueError(f"--out must end in .md (the plot is written beside it as .png), got {str(out)!r}")
    device = resolve_device(args.device)
    loaded = load_diffusion_model(args.model, device)
    if loaded.num_classes is None:
        raise ValueError(f"--model {args.model!r}: eval needs a class-conditional diffusion model")
    out.parent.mkdir(parents=True, exist_ok=True)
    judge = Judge(device)
    cells = plan_cells(solvers, nfes, extra=not args.no_ddpm_1000, intervals=intervals)

    start = time.perf_counter()
    results = evaluate(loaded, judge, cells, num_samples=args.num_samples, batch=args.batch,
                       guidance_scale=args.guidance_scale, device=device, backend=args.backend,
                       progress=show_progress(args))
    total = time.perf_counter() - start
    floor = real_digits_floor(judge, args.num_samples)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    header = {
        "model": args.model, "samples per cell": args.num_samples, "classes": "seed i gets class i % 10",
        "guidance scale": args.guidance_scale,
        "classifier": f"shipped digits CNN, held-out accuracy {judge.metadata.get('heldout_accuracy')}",
        "device": device_name, "torch": torch.__version__, "total time": f"{total / 60:.1f} min",
        "command": "fastdiff eval " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                               (("solvers", args.solvers), ("nfes", args.nfes),
                                                ("num_samples", args.num_samples),
                                                ("guidance_scale", args.guidance_scale),
                                                *(("guidance_interval", t) for t in args.guidance_interval)))
        + (" --no-ddpm-1000" if args.no_ddpm_1000 else ""),
    }
    write_markdown(results, out, header, floor)
    plot = out.with_suffix(".png")
    wrote_plot = write_plot(results, plot, floor, f"digits, {args.num_samples} samples per cell, "
                                                  f"guidance {args.guidance_scale:g}, {device_name}")
    print(f"wrote {out}" + (f" and {plot}" if wrote_plot else " (no plot: matplotlib is not installed)")
          + f" in {total / 60:.1f} min")
    return 0
