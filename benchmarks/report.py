"""Results of a benchmark run: summarize pytest-benchmark's JSON, render markdown and a plot.

    python benchmarks/report.py benchmarks/results/2026-11-26-cpu.json          # -> .md + .png beside it
    python benchmarks/report.py benchmarks/results/2026-11-26-cpu.json --print  # also print the short table

`summarize` (called by conftest.py at session end) turns pytest-benchmark's JSON into the
results file: machine and versions, every case's raw samples, median and quartiles (per
step for step cases, per loop for loops), and the ratios: speedup over diffusers; a loop
over its limit (steps x the model alone, in a CUDA graph where there is one); GB/s and
the fraction of copy bandwidth; the one-time costs; each target beside its measured value.
Targets are reported, never asserted.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from fastdiff.bench import fmt_time, paired_ratio, verdict
from fastdiff.results_tables import header_lines, pipe_table

SCHEMA = "fastdiff-bench/1"
FUSED = "fastdiff-triton-graph"
HEADLINE_SHAPE = [16, 4, 64, 64]
BANDWIDTH_MIB = 64
LIMIT_NOTE = {"model-eager": " (eager model)", "model-compile": " (compiled model)",
              "model-graph-compile": " (compiled model in a graph)"}
COMPILED_LIMIT = {"fastdiff-compile": "model-compile", "fastdiff-graph-compile": "model-graph-compile"}


# ---- summarize ----------------------------------------------------------------------
def sample_stats(samples: list[float]) -> dict:
    s = sorted(samples)
    q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else (s[0],) * 3
    return {"median_s": statistics.median(s), "q1_s": q1, "q3_s": q3, "iqr_s": q3 - q1, "min_s": s[0],
            "max_s": s[-1], "rounds": len(s), "samples_s": samples}


def summarize(pb: dict, meta: dict) -> dict:
    """pytest-benchmark's output JSON + run metadata -> the results document (module docstring)."""
    cases = []
    for b in pb["benchmarks"]:
        info = {k: v for k, v in b["extra_info"].items() if k not in ("median_per_step_s", "GBps", "fraction_of_copy")}
        per = info.get("steps_per_call", 1)
        samples = [x / per for x in b["stats"]["data"]]
        cases.append({"name": b["name"], **info, "iterations": b["stats"]["iterations"], **sample_stats(samples)})
    copy = meta.get("copy_bandwidth")
    _step_ratios([c for c in cases if c.get("kind") == "step"], copy)
    _loop_ratios([c for c in cases if c.get("kind") in ("loop", "model")])
    for c in cases:
        if c.get("kind") == "side_by_side":
            _side_by_side(c)
        elif c.get("kind") == "pipeline_side_by_side":
            _pipeline_side_by_side(c)
    machine = dict(meta.get("machine", {}))
    cpu = pb.get("machine_info", {}).get("cpu", {})
    machine.setdefault("cpu_brand", cpu.get("brand_raw"))
    machine["cpu_count"] = cpu.get("count")
    results = {
        "schema": SCHEMA, "date": pb.get("datetime", "")[:10], "datetime": pb.get("datetime"),
        "device": meta.get("device"), "device_name": meta.get("device_name"), "quick": meta.get("quick", False),
        "command": meta.get("command"), "elapsed_s": meta.get("elapsed_s"), "machine": machine,
        "versions": {k: machine.get(k) for k in ("python", "torch", "triton", "diffusers")},
        "commit": pb.get("commit_info", {}).get("id"), "copy_bandwidth": copy, "cases": cases,
        "one_time": [{k: c.get(k) for k in ("case", "impl", "first_call_s", "warmup_s", "capture_s", "compile_s")}
                     for c in cases if c.get("kind") == "loop" and c.get("first_call_s") is not None],
    }
    results["targets"] = targets(results)
    return results


def _step_ratios(steps: list[dict], copy: dict | None) -> None:
    diffusers = {(c["solver"], tuple(c["shape"]), c["cfg"]): c for c in steps if c["impl"] == "diffusers"}
    for c in steps:
        c["GBps"] = c["bytes"] / c["median_s"] / 1e9
        c["fraction_of_copy"] = c["GBps"] / copy["GBps"] if copy else None
        d = diffusers.get((c["solver"], tuple(c["shape"]), c["cfg"]))
        c["speedup_over_diffusers"] = d["median_s"] / c["median_s"] if d and c is not d else None


def _loop_ratios(entries: list[dict]) -> None:
    """Per loop: it/s, the limit (steps x the model alone: in a CUDA graph where measured, else
    eager; for the CPU's compile=True loop the compiled model alone), the ratio to it and to the
    eager model, the speedup over diffusers; and the compile time where it can be isolated."""
    by_case: dict[str, dict[str, dict]] = {}
    for c in entries:
        by_case.setdefault(c["case"], {})[c["impl"]] = c
    for impls in by_case.values():
        steps = next(iter(impls.values()))["steps"]
        model_time = {c["impl"]: c["median_s"] * steps / c["model_calls"] for c in impls.values()
                      if c["kind"] == "model"}
        diffusers = impls.get("diffusers-eager")
        for c in impls.values():
            if c["kind"] != "loop":
                continue
            if c["impl"].endswith("compile"):  # only the compiled model bounds a compiled loop
                limit = COMPILED_LIMIT[c["impl"]] if COMPILED_LIMIT[c["impl"]] in model_time else None
            else:
                limit = next((k for k in ("model-graph", "model-eager") if k in model_time), None)
            c["it_per_s"] = steps / c["median_s"]
            c["limit"], c["limit_s"] = limit, model_time.get(limit)
            c["ratio_to_limit"] = c["median_s"] / model_time[limit] if limit else None
            c["ratio_to_model_eager"] = (c["median_s"] / model_time["model-eager"] if "model-eager" in model_time
                                         else None)
            c["speedup_over_diffusers"] = (diffusers["median_s"] / c["median_s"]
                                           if diffusers and c is not diffusers else None)
        # compile time: the compiled loop's start-up minus the same loop's without compile
        for compiled, plain, key in (("fastdiff-graph-compile", "fastdiff-graph", "warmup_s"),
                                     ("fastdiff-compile", "fastdiff-eager", "first_call_s")):
            a, b = impls.get(compiled), impls.get(plain)
            if a and b and a.get(key) and b.get(key):
                a["compile_s"] = a[key] - b[key]


SIDE_BY_SIDE_PAIRS = {  # ratio -> (numerator impl, denominator impl), per round
    "ratio_to_model_eager": ("fastdiff", "model-eager"),
    "speedup_over_diffusers": ("diffusers-eager", "fastdiff"),
    "compile_ratio_to_model_compile": ("fastdiff-compile", "model-compile"),
    "compile_speedup_over_diffusers": ("diffusers-eager", "fastdiff-compile"),
    "compile_speedup_over_diffusers_compiled": ("diffusers-compile", "fastdiff-compile"),
    "guidance_interval_speedup": ("fastdiff", "fastdiff-interval"),  # full CFG / CFG inside an interval
}


def _side_by_side(c: dict) -> None:
    """Interleaved rounds: per-impl stats; each ratio of SIDE_BY_SIDE_PAIRS as the median of its
    per-round ratios with a distribution-free interval; each sampler's own work (no-op model)."""
    c["round"] = {k: c.pop(k) for k in ("median_s", "q1_s", "q3_s", "iqr_s", "min_s", "max_s", "rounds", "samples_s")}
    samples = c.pop("samples_by_impl")
    c["by_impl"] = {impl: sample_stats(s) for impl, s in samples.items()}
    med = {impl: st["median_s"] for impl, st in c["by_impl"].items()}
    c["paired"] = {k: paired_ratio(samples[a], samples[b]) for k, (a, b) in SIDE_BY_SIDE_PAIRS.items()
                   if a in med and b in med}
    c["ratio_to_model_eager"] = c["paired"]["ratio_to_model_eager"]["median"]
    c["speedup_over_diffusers"] = c["paired"]["speedup_over_diffusers"]["median"]
    if "fastdiff-noop" in med:  # the sampler's own work, timed directly (model replaced by a no-op)
        c["overhead_s"] = {"fastdiff": med["fastdiff-noop"], "diffusers": med.get("diffusers-noop")}
        c["ratio_from_overhead"] = 1 + med["fastdiff-noop"] / med["model-eager"]


def _pipeline_side_by_side(c: dict) -> None:
    """A pipeline, original against accelerated, interleaved: the median per-round speedup and its interval."""
    c["round"] = {k: c.pop(k) for k in ("median_s", "q1_s", "q3_s", "iqr_s", "min_s", "max_s", "rounds", "samples_s")}
    samples = c.pop("samples_by_impl")
    c["by_impl"] = {impl: sample_stats(s) for impl, s in samples.items()}
    c["paired"] = {"speedup_over_diffusers": paired_ratio(samples["diffusers"], samples["fastdiff"])}
    c["speedup_over_diffusers"] = c["paired"]["speedup_over_diffusers"]["median"]


def _find(results: dict, **match) -> dict | None:
    for c in results["cases"]:
        if all(c.get(k) == v for k, v in match.items()):
            return c
    return None


def targets(results: dict) -> list[dict]:
    """Each target of the issue beside its measured value (None where not measured here)."""
    cuda = results["device"] == "cuda"
    out = []

    def add(name, goal, value, unit, met, note="", paired=None):
        """met(value); with a paired ratio's interval, met only when the whole interval is,
        missed only when none of it is: else None, within noise (fastdiff.bench.verdict)."""
        ci = paired["ci"] if paired else None
        out.append({"target": name, "goal": goal, "measured": value, "unit": unit,
                    "met": None if value is None else verdict(ci, value, met), "note": note, "ci": ci,
                    "ci_coverage": paired["ci_coverage"] if paired else None})

    step_impl = FUSED if cuda else "fastdiff-torch"
    note = "" if cuda else "GPU target; here the CPU's torch backend, for reference"
    big = [c for c in results["cases"] if c.get("kind") == "step" and c["impl"] == FUSED
           and c["tensor_MiB"] >= BANDWIDTH_MIB and c.get("fraction_of_copy") is not None]
    worst = min(big, key=lambda c: c["fraction_of_copy"]) if big else None
    add("fused step, fraction of copy bandwidth at >= 64 MiB per tensor (lowest case)", ">= 0.90",
        worst["fraction_of_copy"] if worst else None, "", lambda v: v >= 0.9,
        f"{worst['name']}" if worst else "needs CUDA")
    head = _find(results, kind="step", impl=step_impl, solver="ddpm", cfg=True, shape=HEADLINE_SHAPE)
    add("step time, ddpm + CFG, 16x4x64x64", "<= 8 us", head["median_s"] * 1e6 if head else None, "us",
        lambda v: v <= 8 and cuda, note)
    add("speedup over diffusers DDPMScheduler.step + CFG, 16x4x64x64", ">= 40x",
        head.get("speedup_over_diffusers") if head else None, "x", lambda v: v >= 40 and cuda, note)
    for case in ("digits-b8-fp32", "cifar10-b1-fp32", "sd15-b1-fp16", "cifar10-b64-fp16", "sd15-b8-fp16"):
        c = _find(results, case=case, impl="fastdiff-graph")
        if cuda and c is not None:
            add(f"{case}: loop / (steps x model in a CUDA graph)", "<= 1.01", c["ratio_to_limit"], "",
                lambda v: v <= 1.01)
    for case, goal in (("cifar10-b1-fp32", 7.0), ("sd15-b1-fp16", 3.5)):
        c = _find(results, case=case, impl="fastdiff-graph")
        add(f"{case}{' CFG' if case.startswith('sd') else ''}: speedup over diffusers eager", f">= {goal:g}x",
            c.get("speedup_over_diffusers") if c else None, "x", lambda v, g=goal: v >= g,
            "" if c else "needs CUDA")
    c = _find(results, case="sd15-b1-fp16", impl="fastdiff-graph-compile")
    add("sd15-b1-fp16 CFG with compile=True", ">= 150 it/s", c["it_per_s"] if c else None, "it/s",
        lambda v: v >= 150, "" if c else "needs CUDA")
    if not cuda:  # the CPU claims, from the interleaved measurement where there is one
        digits = [c for c in results["cases"] if str(c.get("case", "")).startswith("digits")]
        d = next((c for c in digits if c["kind"] == "side_by_side"), None)
        d = d or next((c for c in digits if c.get("impl") == "fastdiff-eager"), None)
        how = (("side by side" if d["kind"] == "side_by_side" else "sequential cases") + f", {d['case']}") if d else ""
        if d and d.get("overhead_s"):
            o = d["overhead_s"]
            how += (f"; sampler's own work per loop (no-op model): fastdiff {fmt_time(o['fastdiff'])}, "
                    f"diffusers {fmt_time(o['diffusers'])}, so 1 + own / model = {d['ratio_from_overhead']:.4f}")
        paired = (d or {}).get("paired", {})

        def ratio(key, fallback_case=None, fallback_key=None):  # (value, its paired interval)
            if key in paired:
                return paired[key]["median"], paired[key]
            c = next((c for c in digits if c.get("impl") == fallback_case), None) if fallback_case else d
            return (c.get(fallback_key or key) if c else None), None

        value, p = ratio("ratio_to_model_eager")
        add("digits (CPU): fastdiff loop / (steps x model alone)", "<= 1.05", value, "", lambda v: v <= 1.05, how, p)
        add("digits (CPU): 1 + sampler's own work (timed with a no-op model) / (steps x model alone)", "<= 1.05",
            d.get("ratio_from_overhead") if d else None, "", lambda v: v <= 1.05,
            "the same bound from the overhead timed directly: far below the whole loop's noise")
        value, p = ratio("speedup_over_diffusers")
        add("digits (CPU): speedup over the diffusers-style loop, same eager model", "> 1x", value, "x",
            lambda v: v > 1, how, p)
        how = "Sampler(compile=True) against its compiled model alone and the diffusers-style loops"
        value, p = ratio("compile_ratio_to_model_compile", "fastdiff-compile", "ratio_to_limit")
        add("digits (CPU): compile=True loop / (steps x compiled model alone)", "<= 1.05", value, "",
            lambda v: v <= 1.05, how if value else "not run", p)
        value, p = ratio("compile_speedup_over_diffusers", "fastdiff-compile", "speedup_over_diffusers")
        add("digits (CPU): compile=True speedup over the diffusers-style loop (eager model)", "> 1x", value, "x",
            lambda v: v > 1, (how + "; the gain is torch.compile's") if value else "not run", p)
        value, p = ratio("compile_speedup_over_diffusers_compiled")
        add("digits (CPU): compile=True speedup over the diffusers-style loop over the same compiled model",
            "> 1x", value, "x", lambda v: v > 1, how if value else "not run", p)
    return out


# ---- render ---------------------------------------------------------------------------
def fmt(v, spec: str = ".3g", suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def target_rows(results: dict) -> list[list[str]]:
    rows = []
    for t in results["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured" if t["measured"] is None else "within noise"}[
            t["met"]]
        ci = t.get("ci")
        measured = fmt(t["measured"], ".4g", f" {t['unit']}".rstrip()) + (
            f" ({100 * t['ci_coverage']:.0f}% CI {ci[0]:.3g}-{ci[1]:.3g})" if ci else "")
        rows.append([t["target"], t["goal"], measured, met, t["note"]])
    return rows


def markdown(results: dict, png_name: str | None) -> str:
    m, v = results["machine"], results["versions"]
    copy = results.get("copy_bandwidth")
    hw = m.get("gpu") or m.get("cpu_brand") or m.get("cpu")
    gpu = f" ({m.get('gpu_memory_GiB')} GiB, CUDA {m.get('cuda')})" if m.get("gpu") else ""
    commit = f"; commit {results['commit'][:10]}" if results.get("commit") else ""
    lines = header_lines(f"fastdiff benchmarks: {results['device_name']}, {results['date']}", {
        "machine": f"{hw}{gpu}; CPU {m.get('cpu_brand') or m.get('cpu')}, {m.get('cpu_count')} cores seen, "
                   f"{m.get('torch_threads')} torch threads; {m.get('platform')}",
        "versions": f"python {v['python']}, torch {v['torch']}, triton {v['triton']}, "
                    f"diffusers {v['diffusers']}{commit}",
        "command": f"`{results['command']}` ({fmt(results.get('elapsed_s'), '.0f')} s)",
        "copy bandwidth": (f"{fmt(copy['GBps'], '.1f')} GB/s (read + written, {copy['bytes_per_copy'] >> 20} MiB copy)"
                           if copy else "not measured in this run")})
    if results.get("quick"):
        lines += ["", "**--bench-quick: tiny sizes and few rounds; these numbers are not measurements.**"]
    if results["device"] != "cuda":
        lines += ["", ("CPU run: the reduced set. Fused Triton steps, CUDA graphs and the CIFAR10/SD1.5-shaped "
                       "U-Nets are CUDA only; the per-step cases cover the four latent shapes with the torch "
                       "backend and diffusers; torch.compile runs for the digits model (the eager loop over "
                       "the compiled U-Net).")]
    lines += ["", "## Targets (reported, not asserted)", "",
              *pipe_table(["target", "goal", "measured", "met", "note"], target_rows(results))]
    loops = [c for c in results["cases"] if c.get("kind") == "loop"]
    if loops:
        lines += ["", "## Whole sampling loops", "",
                  "Median per loop (IQR). Limit: steps x the model alone (in one CUDA graph where "
                  "available, else eager). diffusers: its pipelines' eager loop over the same model.", ""]
        rows = []
        for c in loops:
            rows.append([c["case"], f"{c['solver']} / {c['scheduler']}", f"{c['steps']}", "yes" if c["cfg"] else "no",
                         c["impl"], f"{fmt_time(c['median_s'])} ({fmt_time(c['iqr_s'])})", fmt(c["it_per_s"], ".1f"),
                         fmt(c.get("ratio_to_limit"), ".3f") + LIMIT_NOTE.get(c.get("limit"), ""),
                         fmt(c.get("speedup_over_diffusers"), ".2f", "x")])
        lines += pipe_table(["case", "solver / diffusers", "steps", "CFG", "impl", "median (IQR)", "it/s", "÷ limit",
                        "vs diffusers"], rows)
        models = [c for c in results["cases"] if c.get("kind") == "model"]
        lines += ["", "Model alone: " + "; ".join(
            f"{c['case']} {c['impl']} {fmt_time(c['median_s'] / c['model_calls'])} per call" for c in models)]
    for c in (c for c in results["cases"] if c.get("kind") == "side_by_side"):
        lines += ["", f"## Side by side: {c['case']} ({c['steps']} steps, {c['solver']} / {c['scheduler']})", "",
                  (f"Each of {c['round']['rounds']} rounds runs every row in turn, in an order rotated every "
                   "round, so background load hits all alike. A ratio is the median of its per-round "
                   "ratios, with a distribution-free interval for that median (its coverage given). The "
                   "-noop rows replace the model by a no-op: each sampler's own work per loop."), ""]
        lines += pipe_table(["ratio", "median", "interval (coverage)"],
                       [[f"{SIDE_BY_SIDE_PAIRS[k][0]} / {SIDE_BY_SIDE_PAIRS[k][1]}", f"{p['median']:.3f}",
                         f"{p['ci'][0]:.3f}-{p['ci'][1]:.3f} ({100 * p['ci_coverage']:.0f}%)"]
                        for k, p in c["paired"].items()])
        lines += [""]
        lines += pipe_table(["impl", "median (IQR)", "min"],
                       [[impl, f"{fmt_time(st['median_s'])} ({fmt_time(st['iqr_s'])})", fmt_time(st["min_s"])]
                        for impl, st in c["by_impl"].items()])
    pipelines = [c for c in results["cases"] if c.get("kind") == "pipeline_side_by_side"]
    if pipelines:
        lines += ["", "## Pipelines end to end: the original against accelerate(pipeline)", "",
                  ("Interleaved rounds (order rotated every round); the speedup is the median of the per-round "
                   "ratios original / accelerated, with a distribution-free interval (its coverage given). "
                   "Everything outside the loop is the pipeline's own in both. First call: accelerate's "
                   "includes building its sampler (on CUDA the graph warm-up and capture)."), ""]
        lines += pipe_table(["pipeline", "scheduler, steps, batch", "original", "accelerated", "speedup (interval)",
                        "first call (original / accelerated)"],
                       [[c["pipeline"], f"{c['scheduler']}, {c['steps']}, {c['batch']}{' CFG' if c['cfg'] else ''}",
                         fmt_time(c["by_impl"]["diffusers"]["median_s"]),
                         fmt_time(c["by_impl"]["fastdiff"]["median_s"]),
                         (f"{c['speedup_over_diffusers']:.3f}x ({c['paired']['speedup_over_diffusers']['ci'][0]:.3f}-"
                          f"{c['paired']['speedup_over_diffusers']['ci'][1]:.3f}, "
                          f"{100 * c['paired']['speedup_over_diffusers']['ci_coverage']:.0f}%)"),
                         f"{fmt_time(c['first_call_s']['diffusers'])} / {fmt_time(c['first_call_s']['fastdiff'])}"]
                        for c in pipelines])
    if results["one_time"]:
        lines += ["", "## One-time costs", "",
                  ("First call: everything before the first result (buffers; on CUDA with graph=True the "
                   "warm-up run, plus compilation with compile=True, then the capture). Compile: warm-up "
                   "(first call on the CPU) with compile minus the same without. Compilation reuses "
                   "torch's on-disk caches when an earlier run left them."), ""]
        lines += pipe_table(["case", "impl", "first call", "graph warm-up", "graph capture", "compile"],
                       [[o["case"], o["impl"], fmt_time(o["first_call_s"]), fmt_time(o.get("warmup_s")),
                         fmt_time(o.get("capture_s")), fmt_time(o.get("compile_s"))] for o in results["one_time"]])
    steps = [c for c in results["cases"] if c.get("kind") == "step"]
    if steps:
        lines += ["", "## Per-step update", "",
                  "Everything between two model calls; bytes are what the step must move (x, model output, "
                  "history, next model input; both CFG halves), in each implementation's dtypes.", ""]
        rows = [["x".join(map(str, c["shape"])), "yes" if c["cfg"] else "no", c["solver"], c["impl"], c["dtype"],
                 f"{fmt_time(c['median_s'])} ({fmt_time(c['iqr_s'])})", f"{c['bytes'] / 2**20:.2f}",
                 fmt(c["GBps"], ".3g"), fmt(c["fraction_of_copy"] and 100 * c["fraction_of_copy"], ".1f", "%"),
                 fmt(c["speedup_over_diffusers"], ".2f", "x")]
                for c in sorted(steps, key=lambda c: (c["tensor_MiB"], c["shape"], c["cfg"], c["solver"], c["impl"]))]
        lines += pipe_table(["shape", "CFG", "solver", "impl", "dtype", "median (IQR)", "MiB moved", "GB/s", "of copy",
                        "vs diffusers"], rows)
    if png_name:
        lines += ["", f"![speedup over diffusers and fraction of the limit]({png_name})"]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> bool:
    """Two panels: speedup over diffusers; fraction of the limit. False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cuda = results["device"] == "cuda"
    step_impl = FUSED if cuda else "fastdiff-torch"
    loops = [c for c in results["cases"] if c.get("kind") == "loop" and c["impl"] != "diffusers-eager"]
    steps = [c for c in results["cases"] if c.get("kind") == "step" and c["impl"] == step_impl]
    speed = [(f"loop {c['case']} {c['impl'][9:]}", c["speedup_over_diffusers"]) for c in loops
             if c.get("speedup_over_diffusers")]
    speed += [(f"step {c['solver']} {'cfg ' if c['cfg'] else ''}{'x'.join(map(str, c['shape']))}",
               c["speedup_over_diffusers"]) for c in steps if c.get("speedup_over_diffusers")]
    frac = [(f"loop {c['case']} {c['impl'][9:]}", 1 / c["ratio_to_limit"]) for c in loops if c.get("ratio_to_limit")]
    frac += [(f"step {c['solver']} {'cfg ' if c['cfg'] else ''}{'x'.join(map(str, c['shape']))} (of copy bw)",
              c["fraction_of_copy"]) for c in steps if c.get("fraction_of_copy")]
    for c in (c for c in results["cases"] if c.get("kind") == "side_by_side"):
        paired = c["paired"]
        for key, label in (("compile_speedup_over_diffusers_compiled", "compile vs diffusers compiled"),
                           ("compile_speedup_over_diffusers", "compile vs diffusers eager")):
            if key in paired:
                speed.insert(0, (f"loop {c['case']} side by side, {label}", paired[key]["median"]))
        if "compile_ratio_to_model_compile" in paired:
            frac.insert(0, (f"loop {c['case']} side by side, compile (compiled model alone)",
                            1 / paired["compile_ratio_to_model_compile"]["median"]))
        speed.insert(0, (f"loop {c['case']} side by side", c["speedup_over_diffusers"]))
        frac.insert(0, (f"loop {c['case']} side by side (model alone)", 1 / c["ratio_to_model_eager"]))
    n = max(len(speed), len(frac), 1)
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.28 * n + 1.6))
    for ax, data, title, ref in ((axes[0], speed, "speedup over diffusers (x, log)", 1.0),
                                 (axes[1], frac, "fraction of the limit (1 = the limit)", 1.0)):
        labels, values = [d[0] for d in data], [d[1] for d in data]
        ax.barh(range(len(values)), values, color=["C0" if lab.startswith("loop") else "C1" for lab in labels])
        ax.set_yticks(range(len(values)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(ref, color="k", lw=0.8)
        ax.set_title(title, fontsize=9)
        if ax is axes[0] and values:
            ax.set_xscale("log")
    fig.suptitle(f"fastdiff on {results['device_name']}, {results['date']} (step: {step_impl})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(results_path: Path) -> tuple[Path, Path | None]:
    """<name>.json -> <name>.md and <name>.png beside it; returns their paths (png None without matplotlib)."""
    results_path = Path(results_path)
    results = json.loads(results_path.read_text())
    if results.get("schema") != SCHEMA:
        raise ValueError(f"{results_path}: not a fastdiff results file (schema {results.get('schema')!r})")
    results["targets"] = targets(results)  # from the measured cases, as this report states the targets
    png = results_path.with_suffix(".png")
    made = plot(results, png)
    md = results_path.with_suffix(".md")
    md.write_text(markdown(results, png.name if made else None))
    return md, png if made else None


def short_table(results: dict) -> str:
    """The few lines a GPU check prints last: targets, then each loop case's headline numbers."""
    lines = [f"{results['device_name']} {results['date']}: targets"]
    for r in target_rows(results):
        lines.append(f"  {r[3]:>12}  {r[2]:>12}  (goal {r[1]})  {r[0]}")
    lines.append("loops: median, ÷ limit, vs diffusers")
    for c in results["cases"]:
        if c.get("kind") == "loop":
            speedup = fmt(c.get("speedup_over_diffusers"), ".2f", "x")
            lines.append(f"  {c['case']:<18} {c['impl']:<23} {fmt_time(c['median_s']):>9}  "
                         f"{fmt(c.get('ratio_to_limit'), '.3f'):>6}  {speedup:>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", help="a results file, benchmarks/results/<date>-<device>.json")
    p.add_argument("--print", action="store_true", help="print the short table (targets, loops) after writing")
    args = p.parse_args(argv)
    md, png = write_report(Path(args.results))
    print(f"wrote {md}" + (f" and {png}" if png else " (no matplotlib: no plot)"))
    if args.print:
        print(short_table(json.loads(Path(args.results).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
