"""Whole diffusers pipelines end to end, the original against accelerate(pipeline), side by side.

Each round calls both on the same inputs (prompt embeddings, a fixed generator seed), in an
order rotated every round, so background load hits both alike; the ratio is the median of
the per-round ratios original / accelerated with a distribution-free interval (report.py).
Everything outside the loop (latent preparation, the VAE decode, postprocessing) is the
pipeline's own in both. Tiny random-weight components (fastdiff.bench_cases.PIPELINE_CASES):
on the CPU the model dominates, so the ratio measures what fastdiff's loop costs or saves
around it; on CUDA the accelerated loop is one graph replay.
"""
import pytest
import torch

from fastdiff import bench, bench_cases

ROUNDS_BUDGET_S = 40.0  # timed seconds per case, roughly: rounds in [5, 15]


@pytest.mark.parametrize("name", list(bench_cases.PIPELINE_CASES))
@pytest.mark.benchmark(group="pipelines", timer=bench.synced_clock)
def test_pipeline_side_by_side(benchmark, device, quick, name):
    pytest.importorskip("diffusers")
    from fastdiff.integrations.pipelines import accelerate

    case = bench_cases.PIPELINE_CASES[name](device, steps=3 if quick else 10)
    apipe = accelerate(case.pipe)

    def run(pipe):
        return lambda: pipe(generator=torch.Generator(device).manual_seed(0), **case.call)

    fns = {"diffusers": run(case.pipe), "fastdiff": run(apipe)}
    first = {impl: bench.timed_call(fn, device) for impl, fn in fns.items()}  # fastdiff's: warm-up (+ capture)
    samples = {impl: [] for impl in fns}

    def one_round():
        for impl in bench.rotated(list(fns), len(samples["fastdiff"])):
            samples[impl].append(bench.timed_call(fns[impl], device))

    one_round()
    rounds = max(5, min(15, int(ROUNDS_BUDGET_S / sum(s[-1] for s in samples.values()))))
    for s in samples.values():
        s.clear()
    sampler = next(iter(apipe._samplers.values()))
    benchmark.extra_info.update(case.info, kind="pipeline_side_by_side", impl="interleaved", samples_by_impl=samples,
                                first_call_s=first, graph_timings=sampler.timings)
    benchmark.pedantic(one_round, rounds=3 if quick else rounds, iterations=1, warmup_rounds=0)
