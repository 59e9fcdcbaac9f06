"""`fastdiff bench`: a quick speed summary on this machine, and the timing helpers.

    fastdiff bench                  # the telling cases on the current device (<= 2 min on a 2-core CPU)
    fastdiff bench --device cpu --json bench.json

The full suite is `pytest benchmarks/ --benchmark-only`; both build their cases from
fastdiff/bench_cases.py (re-exported here).

Copy bandwidth: bytes read + written by a large copy.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# the cases, re-exported: benchmarks/ and the tests reach them as bench.<name>
from .bench_cases import (  # noqa: F401
    BANDWIDTH_SHAPE, SCHEDULERS, STEP_SHAPES, LoopModel, _step_table, cifar10_model, diffusers_loop,
    diffusers_scheduler, diffusers_step, digits_model, fastdiff_loop, fastdiff_step, flow_model, model_alone,
    sd15_model, step_bytes, with_compiled_model_in_diffusers_loop, without_model,
)


# ---- timing -------------------------------------------------------------------------
def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def synced_clock() -> float:
    """perf_counter after a device sync: pytest-benchmark's timer for CUDA work."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


@dataclass
class Timing:
    samples: list[float]  # seconds per call, one per round

    def quantile(self, q: float) -> float:
        s = sorted(self.samples)
        if len(s) == 1:
            return s[0]
        return statistics.quantiles(s, n=4, method="inclusive")[{0.25: 0, 0.5: 1, 0.75: 2}[q]]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def iqr(self) -> float:
        return self.quantile(0.75) - self.quantile(0.25)

    def as_dict(self) -> dict:
        return {"median_s": self.median, "q1_s": self.quantile(0.25), "q3_s": self.quantile(0.75),
                "iqr_s": self.iqr, "min_s": min(self.samples), "rounds": len(self.samples),
                "samples_s": self.samples}


def timed_call(fn: Callable[[], object], device, repeat: int = 1) -> float:
    """Seconds for `repeat` calls of fn, with a device sync before and after."""
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return time.perf_counter() - start


def rotated(names: list, i: int) -> list:
    """Round i's order: the list rotated by i, so each case takes each position in turn."""
    k = i % len(names) if names else 0
    return names[k:] + names[:k]


def measure(fns: dict[str, Callable[[], object]], device, *, rounds: int = 7, warmup: int = 2,
            min_round_s: float = 2e-3) -> dict[str, Timing]:
    """Time several functions side by side: warm up, then rounds that call each in turn, in
    an order rotated every round (so drifting background load hits all alike); a round
    repeats a call until it lasts min_round_s, with a device sync at both ends. Returns
    seconds per call."""
    inner = {}
    for name, fn in fns.items():
        for _ in range(max(1, warmup)):  # the last warm-up call sizes the rounds
            last = timed_call(fn, device)
        inner[name] = max(1, math.ceil(min_round_s / max(last, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(rounds):
        for name in rotated(list(fns), i):
            samples[name].append(timed_call(fns[name], device, inner[name]) / inner[name])
    return {name: Timing(s) for name, s in samples.items()}


def print_and_write(text: str, path: str | None) -> None:
    """A report script's markdown: printed, and written to `path` when given."""
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text)


def median_interval(values: list[float], level: float = 0.90) -> tuple[float, float, float]:
    """(low, high, coverage): a distribution-free interval for the median of `values`.

    The k-th smallest and k-th largest value cover the median with probability
    1 - 2 P(Binomial(n, 1/2) <= k - 1); k is the largest that keeps that >= level (for 9
    values the 2nd and 8th, 96%). Too few values for `level`: the full range, whose coverage
    is returned as it is (4 values: 87.5%).
    """
    s, n = sorted(values), len(values)
    if n == 0:
        raise ValueError("median_interval needs at least one value")

    def coverage(k: int) -> float:
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n

    k = 1
    while k < (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return s[k - 1], s[n - k], coverage(k)


def paired_ratio(num: list[float], den: list[float]) -> dict:
    """Median of the per-round ratios num[i] / den[i] and its interval (median_interval): within
    one round both ran back to back, so the ratio cancels the machine's drift."""
    if len(num) != len(den) or not num:
        raise ValueError(f"paired_ratio needs two equally long, non-empty series; got {len(num)} and {len(den)}")
    ratios = [a / b for a, b in zip(num, den)]
    lo, hi, cover = median_interval(ratios)
    return {"median": statistics.median(ratios), "ci": [lo, hi], "ci_coverage": cover}


def verdict(ci: list[float] | None, value: float, ok) -> bool | None:
    """ok(value), unless the interval straddles the goal: then None, within noise."""
    if ci is not None and ok(ci[0]) != ok(ci[1]):
        return None
    return bool(ok(value))


def copy_bandwidth(device, nbytes: int | None = None, rounds: int = 10) -> tuple[float, Timing, int]:
    """Device copy bandwidth in bytes/s (read + written) of a large copy into a preallocated
    tensor (a clone without the allocation). Returns (bytes/s, timing, bytes per copy)."""
    device = torch.device(device)
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 26)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    timing = measure({"copy": lambda: dst.copy_(src)}, device, rounds=rounds, min_round_s=1e-2)["copy"]
    return 2 * nbytes / timing.median, timing, nbytes


# ---- the command --------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per case (default %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, few rounds: checks that every case runs (seconds); not a measurement")
    p.add_argument("--compile", action="store_true",
                   help="also time the digits loop with Sampler(compile=True) against its compiled model "
                        "alone (compiling takes a minute or so the first time)")
    p.add_argument("--json", default=None, help="also write every measurement (samples, medians, IQRs) here")


@dataclass
class Row:
    case: str
    timings: dict  # column -> Timing (seconds per step for step cases, per loop for loops)
    limit: float | None = None  # seconds: copy-bandwidth time of the bytes, or steps x model alone
    limit_name: str = ""
    first_call_s: float | None = None
    note: str = ""


def _have_diffusers() -> bool:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


def _step_row(device, quick: bool, rounds: int, copy_bps: float, diffusers: bool) -> Row:
    cuda = device.type == "cuda"
    shape = (1, 4, 16, 16) if quick else (16, 4, 64, 64)
    dtype = torch.float16 if cuda else torch.float32
    fused = fastdiff_step("ddpm", shape, True, device, dtype, backend="triton", graph=True) if cuda else None
    reference = fastdiff_step("ddpm", shape, True, device, dtype, backend="torch")
    cases = {"fastdiff": fused or reference}
    if cuda:
        cases["reference"] = reference
    if diffusers:
        cases["diffusers"] = diffusers_step("ddpm", shape, True, device, dtype)
    t = measure({k: c.run for k, c in cases.items()}, device, rounds=rounds * 3)
    per_step = {k: Timing([s / cases[k].steps_per_call for s in t[k].samples]) for k in cases}
    name = f"step ddpm+CFG {'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')}"
    note = "fused kernel replayed in a CUDA graph" if cuda else "torch backend (the CPU default)"
    return Row(name, per_step, cases["fastdiff"].bytes_moved / copy_bps, "bytes at copy bandwidth", note=note)


def _loop_row(lm: LoopModel, device, rounds: int, diffusers: bool, compile: bool = False) -> Row:
    """fastdiff's default Sampler (compile=True: over the compiled model, whose limit is then the
    compiled model alone) against the reference, diffusers and steps x the model alone."""
    cuda = device.type == "cuda"
    run = fastdiff_loop(lm, device, compile=compile)[1]
    first = timed_call(run, device)  # the first call: buffers, and on CUDA warm-up + graph capture
    fns = {"fastdiff": run}
    if cuda:
        fns["reference"] = fastdiff_loop(lm, device, backend="torch", graph=False)[1]
    if diffusers:
        fns["diffusers"] = diffusers_loop(lm, device)
    limit_run, calls = model_alone(lm, device, graph=cuda, compile=compile)
    fns["limit"] = limit_run
    noop = without_model(lm)
    fns["fastdiff-noop"] = fastdiff_loop(noop, device)[1]
    if diffusers:
        fns["diffusers-noop"] = diffusers_loop(noop, device)
    t = measure(fns, device, rounds=rounds, warmup=1)
    limit = t.pop("limit").median * lm.steps / calls
    own = {k[:-5]: t.pop(k).median for k in list(t) if k.endswith("-noop")}
    note = "sampler's own work per loop (model replaced by a no-op): " + ", ".join(
        f"{k} {fmt_time(v)}" for k, v in own.items()) + f"; {lm.note}"
    name = f"loop {lm.name}{' CFG' if lm.cfg else ''} {lm.steps} steps {lm.solver}{' compile' if compile else ''}"
    return Row(name, t, limit, ("compiled " if compile else "") + "model alone"
               + (" in a CUDA graph" if cuda else "") + f" x {lm.steps}",
               first_call_s=first, note=note)


def fmt_time(seconds: float | None) -> str:
    """Seconds with a unit that keeps three significant digits (s, ms, us); '-' for None."""
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale or unit == "us":
            return f"{seconds / scale:.3g} {unit}"
    return "-"


def _speedup(ratio: float) -> str:
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def vs_diffusers(timings: dict) -> str:
    """fastdiff against diffusers from their paired rounds: the median per-round speedup, or
    'within noise' with the median's interval (median_interval) when that interval holds 1."""
    if "diffusers" not in timings:
        return "n/a"
    p = paired_ratio(timings["diffusers"].samples, timings["fastdiff"].samples)
    if verdict(p["ci"], p["median"], lambda v: v > 1) is None:
        return f"within noise ({p['ci'][0]:.2f}-{p['ci'][1]:.2f}x)"
    return _speedup(p["median"])


def print_table(rows: list[Row], header: str) -> None:
    cols = ("case", "fastdiff", "reference", "diffusers", "limit", "vs diffusers", "fastdiff/limit")
    lines = []
    for r in rows:
        med = {k: t.median for k, t in r.timings.items()}
        fd = med["fastdiff"]
        lines.append((r.case, f"{fmt_time(fd)} ±{fmt_time(r.timings['fastdiff'].iqr / 2)}",
                      fmt_time(med.get("reference")) if "reference" in med else "(same)",
                      fmt_time(med.get("diffusers")) if "diffusers" in med else "n/a",
                      fmt_time(r.limit),
                      vs_diffusers(r.timings),
                      f"{fd / r.limit:.3f}" if r.limit else "-"))
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(cols)]
    print(header)
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths)))
    print()
    print("fastdiff: the default Sampler on this device (CUDA: fused kernels + one CUDA graph; CPU: eager, "
          "torch backend), with compile=True on '... compile' rows; reference: the torch backend, eager; "
          "median ± IQR/2 of interleaved rounds; vs diffusers: the median of the per-round ratios; limit: the "
          "least time the case can take (below, per case); fastdiff/limit: fastdiff's median over it, 1.000 "
          "being no time beyond the limit (the digits loop's target is <= 1.05).")
    for r in rows:
        extra = f"first call {fmt_time(r.first_call_s)}; " if r.first_call_s is not None else ""
        print(f"  {r.case}: limit = {r.limit_name}; {extra}{r.note}")


def machine_summary(device) -> dict:
    import platform
    import sys

    import triton

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "triton": triton.__version__,
            "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(), "device": str(device)}
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(args: argparse.Namespace) -> int:
    from .command_options import resolve_device

    device = resolve_device(args.device)
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    rounds = 2 if args.quick else args.rounds
    diffusers = _have_diffusers()
    start = time.perf_counter()
    copy_bps, copy_t, _ = copy_bandwidth(device, (1 << 24) if args.quick else None, rounds=3 if args.quick else 10)
    rows = [_step_row(device, args.quick, rounds, copy_bps, diffusers)]
    if args.quick:
        loops = [digits_model(device, batch=2, steps=3)]
    else:
        loops = [digits_model(device)]
        if device.type == "cuda" and diffusers:
            loops += [cifar10_model(device, 1, torch.float32), sd15_model(device, 1, torch.float16)]
    for lm in loops:
        rows.append(_loop_row(lm, device, rounds, diffusers))
        del lm
    if args.compile:
        rows.append(_loop_row(loops[0], device, rounds, diffusers, compile=True))
    seconds = time.perf_counter() - start
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print_table(rows, f"fastdiff bench on {name} ({device}); copy bandwidth {copy_bps / 1e9:.1f} GB/s; "
                      f"{seconds:.0f} s" + ("; --quick: tiny sizes, not a measurement" if args.quick else ""))
    if not diffusers:
        print("  diffusers is not installed: its columns and the CIFAR10/SD1.5 loops are left out "
              "(pip install diffusers)")
    if args.json:
        doc = {"machine": machine_summary(device), "quick": args.quick, "copy_bandwidth_Bps": copy_bps,
               "copy": copy_t.as_dict(),
               "rows": [{"case": r.case, "limit_s": r.limit, "limit": r.limit_name, "first_call_s": r.first_call_s,
                         "note": r.note, **{k: t.as_dict() for k, t in r.timings.items()}} for r in rows]}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.json}")
    return 0
