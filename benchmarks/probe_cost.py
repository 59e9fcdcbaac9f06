"""What the non-finite probe of the sample costs on the CPU (issue 19): the digits model as
`fastdiff sample` runs it (8 samples, CFG 3, 20 dpmpp_2m steps), and the same loop with a no-op
model (the sampler's own time, where the probe's share is largest).

    python benchmarks/probe_cost.py [out.md]

Each configuration runs whole sample() calls with the sample probe on and off (Loop.run
without its two probe lines), interleaved round by round so a shared machine's drift hits
both alike; it reports medians and the probe alone (one reduction of the state, per row).
"""
import os
import statistics
import sys
import time

import torch

from fastdiff import bench, bench_cases, loop
from fastdiff.results_tables import pipe_table


def run_without_sample_probe(self, progress=None):
    """Loop.run as it was before the sample probe (the comparison, not a code path)."""
    for r in range(self.table.rows):
        self.executor.step(r, self.call_model(r))
        if self.corrector is not None and self.corrector[r]:
            self.correct(r)


def interleaved(run, rounds):
    with_probe, without = [], []
    probed = loop.Loop.run
    for _ in range(rounds):
        for times, body in ((with_probe, probed), (without, run_without_sample_probe)):
            loop.Loop.run = body
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    loop.Loop.run = probed
    return statistics.median(with_probe), statistics.median(without)


def main(out=None):
    torch.manual_seed(0)
    lm = bench_cases.digits_model("cpu")
    lines = ["# The sample's non-finite probe: CPU cost", "",
             f"{torch.__version__}, {torch.get_num_threads()} thread(s); digits model, batch {lm.batch}, "
             f"{lm.steps} {lm.solver} steps, CFG; medians of interleaved whole sample() calls; load average "
             f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the start (a shared machine: compare the "
             "columns, not the absolute times).", ""]
    rows = []
    for case, rounds in ((lm, 8), (bench_cases.without_model(lm), 200)):
        sampler, run = bench_cases.fastdiff_loop(case, "cpu")
        run()  # warm-up
        on, off = interleaved(run, rounds)
        x = torch.randn(case.batch, *case.sample_shape)
        reps, probe = 2000, torch.zeros((), dtype=torch.float64)
        start = time.perf_counter()
        for _ in range(reps):
            loop.add_nonfinite_probe(probe, x)
        alone = (time.perf_counter() - start) / reps * sampler.table.rows
        rows.append([case.name, f"{on * 1e3:.3f}", f"{off * 1e3:.3f}", f"{(on - off) / off:+.1%}",
                     f"{alone * 1e3:.3f} ({alone / off:.3%})"])
    lines += pipe_table(["model", "with probe (ms)", "without (ms)", "difference", "probe alone x rows (ms)"], rows)
    bench.print_and_write("\n".join(lines) + "\n", out)


if __name__ == "__main__":
    main(*sys.argv[1:])
