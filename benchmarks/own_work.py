"""Each sampler's own work on the CPU: fastdiff's loop and diffusers' loop with the model
replaced by a no-op, for the digits case (8 samples, CFG 3, 20 dpmpp_2m steps against
DPMSolverMultistepScheduler) and the flow case (8 x 16x32x32, 28 euler steps against
FlowMatchEulerDiscreteScheduler, shift 3).

    python benchmarks/own_work.py [rounds] [out.md]

Per case, whole loops alternate (order rotated every round) so a shared machine's drift hits
both alike; reported: medians with a distribution-free interval, and the median of the
per-round ratios fastdiff / diffusers with its interval. Part of fastdiff's own work is the
initial noise, drawn per seed by counter-based Philox (identical across batches, devices and
the fused kernel; numpy uint64 lanes on the CPU); diffusers' loop draws torch.randn: a line
times the two draws alone. The last table splits the flow loop's own work: the same loop
with the non-finite probes stubbed out, with torch.randn in place of the Philox noise, and
both (comparisons, not code paths: the library always probes and always draws Philox).
"""
import os
import sys

import torch

from fastdiff import bench, bench_cases, loop, rng
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
              f"{med['fastdiff']:.2f} ms, torch.randn {med['diffusers']:.2f} ms (medians).", ""]
    lines += pipe_table(["flow loop", "median"],
                        [[name, f"{t.median * 1e3:.2f} ms"] for name, t in flow_breakdown(lm, rounds).items()])
    bench.print_and_write("\n".join(lines) + "\n", out)


def flow_breakdown(lm, rounds: int) -> dict:
    """The flow loop as it is, without its non-finite probes, with torch.randn noise, with
    neither, and diffusers' loop, alternated as above."""
    run, probe, randn = bench_cases.fastdiff_loop(lm, "cpu")[1], loop.add_nonfinite_probe, rng.randn

    def torch_noise(seeds, step, stream, shape, device=None, dtype=torch.float32):
        return torch.randn(len(seeds), *shape, dtype=dtype)

    def variant(probes: bool, philox: bool):
        def call():
            loop.add_nonfinite_probe = probe if probes else (lambda slot, t: None)
            rng.randn = randn if philox else torch_noise
            try:
                return run()
            finally:
                loop.add_nonfinite_probe, rng.randn = probe, randn
        return call

    fns = {"fastdiff": variant(True, True), "without the probes": variant(False, True),
           "with torch.randn noise": variant(True, False), "with neither": variant(False, False),
           "diffusers": bench_cases.diffusers_loop(lm, "cpu")}
    return bench.measure(fns, "cpu", rounds=rounds, warmup=1, min_round_s=0)


if __name__ == "__main__":
    main(*sys.argv[1:])
