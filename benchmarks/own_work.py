"""Each sampler's own work on the CPU: fastdiff's loop and diffusers' loop with the model
replaced by a no-op, for the digits case (8 samples, CFG 3, 20 dpmpp_2m steps against
DPMSolverMultistepScheduler) and the flow case (8 x 16x32x32, 28 euler steps against
FlowMatchEulerDiscreteScheduler, shift 3).

    python benchmarks/own_work.py [rounds] [out.md]

Per case, whole loops alternate (order rotated every round) so a shared machine's drift hits
both alike; reported: medians with a distribution-free interval, and the median of the
per-round ratios fastdiff / diffusers with its interval. Part of fastdiff's own work is the
initial noise, drawn per seed by counter-based Philox in torch int64 ops (identical across
batches, devices and the fused kernel); diffusers' loop draws torch.randn: the last row times
the two draws alone.
"""
import os
import sys

import torch

from fastdiff import bench, bench_cases, rng
from fastdiff.results_tables import pipe_table


def measure_case(lm, rounds: int) -> dict:
    fns = {"fastdiff": bench_cases.fastdiff_loop(lm, "cpu")[1], "diffusers": bench_cases.diffusers_loop(lm, "cpu")}
    samples = {name: t.samples for name, t in bench.measure(fns, "cpu", rounds=rounds, warmup=1, min_round_s=0).items()}
    return {"samples": samples, "ratio": bench.paired_ratio(samples["fastdiff"], samples["diffusers"])}


def main(rounds: str = "41", out: str | None = None) -> None:
    torch.manual_seed(0)
    rounds = int(rounds)
    info = bench.machine_summary("cpu")
    lines = [f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores at the start; torch {info['torch']}, "
             f"diffusers {info['diffusers']}, {info['torch_threads']} torch thread(s), {rounds} rounds", ""]
    rows = []
    for lm in (bench_cases.without_model(bench_cases.digits_model("cpu")), bench_cases.flow_model("cpu")):
        res = measure_case(lm, rounds)

        def cell(name):
            s = res["samples"][name]
            lo, hi, _ = bench.median_interval(s)
            return f"{sorted(s)[len(s) // 2] * 1e3:.2f} ms ({lo * 1e3:.2f}-{hi * 1e3:.2f})"

        r = res["ratio"]
        rows.append([lm.name, cell("fastdiff"), cell("diffusers"),
                     f"{r['median']:.3f} ({r['ci'][0]:.3f}-{r['ci'][1]:.3f}, {r['ci_coverage']:.0%})"])
    lines += pipe_table(["case", "fastdiff (interval)", "diffusers (interval)",
                         "fastdiff / diffusers (interval, coverage)"], rows)
    lm = bench_cases.flow_model("cpu")
    shape, seeds = (lm.batch, *lm.sample_shape), list(range(lm.batch))
    fns = {"fastdiff": lambda: rng.randn(seeds, 0, rng.STREAM_INIT, lm.sample_shape),
           "diffusers": lambda: torch.randn(shape)}
    med = {name: t.median * 1e3 for name, t in bench.measure(fns, "cpu", rounds=rounds, warmup=1,
                                                                 min_round_s=0).items()}
    lines += ["", f"Initial noise alone, {lm.batch} x {'x'.join(map(str, lm.sample_shape))}: fastdiff's rng.randn "
              f"{med['fastdiff']:.2f} ms, torch.randn {med['diffusers']:.2f} ms (medians)."]
    bench.print_and_write("\n".join(lines) + "\n", out)


if __name__ == "__main__":
    main(*sys.argv[1:])
