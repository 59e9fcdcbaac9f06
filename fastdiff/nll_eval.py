"""`fastdiff eval --nll`: the digits model's likelihood of real digits, in bits/dim.

For each digit (the classifier's held-out 20% split, stratified, seed 0; the shipped
diffusion model itself was trained on all 1797 digits, so these are training digits for it),
quantized to 256 levels in [-1, 1]:
  ELBO      fastdiff.elbo over every timestep (or --nll-timesteps drawn at random), variance
            fixed_large, discretized decoder: bpd and its prior / diffusion / decoder parts;
            its Monte-Carlo spread (one x_t draw per timestep), estimated per digit from
            adjacent timesteps: Var(sum_t L_t) ~ 1/2 sum_t (L_{t+1} - L_t)^2;
  ODE       fastdiff.log_likelihood, Heun over --nll-ode-steps intervals, --nll-probes
            Rademacher probes, uniformly dequantized: bits/dim of the discrete data.
Both use the model unconditionally (the null class). Writes a markdown file with the
command that made it (default: nll-<model>.md in the current directory; the committed
results are made with --out benchmarks/results/nll-digits.md).
"""
from __future__ import annotations

import argparse
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from . import results_tables


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("likelihood (--nll)")
    g.add_argument("--nll", action="store_true", help="instead of sample quality: ELBO and ODE log-likelihood "
                   "in bits/dim of --num-samples real digits (default out: nll-<model>.md)")
    g.add_argument("--nll-timesteps", type=int, default=None,
                   help="ELBO timesteps drawn per digit (default: all, T model calls per digit)")
    g.add_argument("--nll-ode-steps", type=int, default=50, help="ODE intervals (Heun; default %(default)s)")
    g.add_argument("--nll-probes", type=int, default=1, help="Hutchinson probes (default %(default)s)")


def heldout_digits(n: int, image_size: int) -> torch.Tensor:
    """The first n digits of the classifier's held-out split, quantized to 256 levels: [n, 1, S, S]."""
    from .models.digits import load_digits
    from .models.train_classifier import stratified_split

    images, labels = load_digits(image_size)
    _, test = stratified_split(labels, 0.2, torch.Generator().manual_seed(0))
    if n > test.numel():
        raise ValueError(f"--num-samples: the held-out split has {test.numel()} digits, asked for {n}")
    x = images[test[torch.randperm(test.numel(), generator=torch.Generator().manual_seed(0))[:n]]]
    return ((x + 1) * 127.5).round() / 127.5 - 1


def monte_carlo_spread(terms: torch.Tensor) -> torch.Tensor:
    """[B] std of the all-timestep bound from one draw per timestep, from adjacent terms [B, T]."""
    return (0.5 * (terms[:, 2:] - terms[:, 1:-1]).square().sum(1)).sqrt()


def main(args: argparse.Namespace) -> int:
    from .command_options import load_diffusion_model, resolve_device
    from .likelihood import elbo, log_likelihood

    for name in ("num_samples", "batch", "nll_ode_steps", "nll_probes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.nll_timesteps is not None and args.nll_timesteps < 1:
        raise ValueError(f"--nll-timesteps must be >= 1, got {args.nll_timesteps}")
    out = Path(args.out) if args.out is not None else Path(f"nll-{Path(args.model).stem}.md")
    if out.suffix != ".md":
        raise ValueError(f"--out must end in .md, got {str(out)!r}")
    device = resolve_device(args.device)
    loaded = load_diffusion_model(args.model, device)
    meta = loaded.metadata
    if meta.get("num_classes") is None:
        raise ValueError(f"--model {args.model!r}: --nll needs a class-conditional diffusion model")
    x = heldout_digits(args.num_samples, meta["image_shape"][-1]).to(device)
    null = meta.get("null_class", meta["num_classes"])
    prediction = meta.get("prediction", "epsilon")

    rows, seconds, start = [], [0.0, 0.0], time.perf_counter()
    for lo in range(0, len(x), args.batch):
        xb = x[lo:lo + args.batch]
        cond = {"class_labels": torch.full((len(xb),), null, device=device)}
        seeds = list(range(lo, lo + len(xb)))
        t0 = time.perf_counter()
        b = elbo(loaded.model, loaded.schedule, xb, prediction=prediction, cond=cond, seeds=seeds,
                 timesteps=args.nll_timesteps, variance="fixed_large", backend=args.backend,
                 batch_timesteps=max(1, 250 // len(xb)))  # ~250 rows per model call
        t1 = time.perf_counter()
        o = log_likelihood(loaded.model, loaded.schedule, xb, steps=args.nll_ode_steps, probes=args.nll_probes,
                           seeds=seeds, prediction=prediction, cond=cond, dequantize=True)
        t2 = time.perf_counter()
        seconds[0] += t1 - t0
        seconds[1] += t2 - t1
        spread = monte_carlo_spread(b.terms) if b.terms is not None else torch.full_like(b.bpd, math.nan)
        rows.append((b.bpd, b.prior, b.diffusion, b.decoder, spread, o.bpd))
        if not args.no_progress:
            print(f"digits {lo + len(xb)}/{len(x)}: elbo {t1 - t0:.0f} s, ode {t2 - t1:.0f} s", file=sys.stderr)
    total = time.perf_counter() - start
    cols = [torch.cat(c).cpu() for c in zip(*rows)]
    write_results(out, cols, args, device, total, seconds)
    print(f"wrote {out}: ELBO {float(cols[0].mean()):.3f} bits/dim, ODE {float(cols[5].mean()):.3f} bits/dim "
          f"({len(x)} digits, {total / 60:.1f} min)")
    return 0


def command(args, out: Path) -> str:
    """The command line that makes this file (the options that matter, spelled out)."""
    parts = ["fastdiff", "eval", "--nll", "--model", args.model, "--num-samples", args.num_samples,
             "--batch", args.batch, "--nll-ode-steps", args.nll_ode_steps, "--nll-probes", args.nll_probes]
    if args.nll_timesteps is not None:
        parts += ["--nll-timesteps", args.nll_timesteps]
    if args.device is not None:
        parts += ["--device", args.device]
    return shlex.join(str(p) for p in parts + ["--out", out])


def write_results(out: Path, cols, args, device, total: float, seconds: list[float]) -> None:
    bpd, prior, diffusion, decoder, spread, ode = cols
    n = len(bpd)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"

    def cell(v: torch.Tensor) -> str:  # mean ± standard error over digits
        v = v.double()
        se = float(v.std() / math.sqrt(n)) if n > 1 else math.nan
        return f"{float(v.mean()):.4f} ± {se:.4f}"

    timesteps = "all 1000" if args.nll_timesteps is None else f"{args.nll_timesteps} drawn per digit"
    facts = {
        "command": f"`{command(args, out)}`",
        "model": f"{args.model}, unconditional (null class); digits: {n} from the classifier's held-out 20% "
                 "split (seed 0), quantized to 256 levels in [-1, 1]; the diffusion model was trained on all 1797 "
                 "digits, so these are not held out from it",
        "ELBO": f"{timesteps} timesteps, variance fixed_large, discretized Gaussian decoder (variance beta_1)",
        "ODE": f"Heun over {args.nll_ode_steps} Karras intervals ({2 * args.nll_ode_steps - 1} model calls), "
               f"{args.nll_probes} Rademacher probe(s), uniform dequantization",
        "device": f"{device_name}; torch {torch.__version__}; total {total / 60:.1f} min: ELBO "
                  f"{seconds[0]:.0f} s ({seconds[0] / n:.1f} s per digit), "
                  f"ODE {seconds[1]:.0f} s ({seconds[1] / n:.1f} s per digit)"}
    lines = [*results_tables.header_lines("Likelihood of real digits under the digits model (bits/dim, lower is "
                                          "better)", facts), ""]
    lines += results_tables.pipe_table(
        ["figure", "mean ± s.e. over digits"],
        [["ELBO bound (bpd)", cell(bpd)], ["prior term", cell(prior)], ["diffusion terms (t >= 2)", cell(diffusion)],
         ["decoder term (t = 1)", cell(decoder)],
         ["Monte-Carlo std of one digit's bound (one draw per timestep)", cell(spread)],
         ["ODE log-likelihood (bpd, dequantized)", cell(ode)]], align="lr")
    lines += ["", "Per digit (bpd): ELBO, ODE", "", ", ".join(f"{float(a):.3f}/{float(b):.3f}" for a, b in zip(bpd, ode))]
    results_tables.write(out, lines)
