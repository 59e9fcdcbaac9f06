"""The per-step update: everything between two model calls (see fastdiff/bench.py).

    fastdiff-torch         the torch backend's executor row, eager
    fastdiff-triton        the fused kernel, launched eagerly (host launch cost included)
    fastdiff-triton-graph  the fused kernel, 20 launches replayed from one CUDA graph: the
                           kernel's own time, as inside fastdiff's captured loop (CUDA only)
    diffusers              CFG combine + scheduler.step + the next model input, as pipelines do

Sizes: the four latent shapes on every device, plus 256x4x128x128 (64 MiB per float32
tensor, the bandwidth target's size) on CUDA. On the CPU the Triton cases are skipped:
the interpreter is far too slow to time. Model dtype: float16 on CUDA, float32 on the CPU.
"""
import math

import pytest
import torch

from fastdiff import bench

pytestmark = pytest.mark.benchmark(group="step", timer=bench.synced_clock, min_time=2e-3, max_time=0.1,
                                   min_rounds=5)
CUDA = torch.cuda.is_available()
SHAPES = bench.STEP_SHAPES + ((bench.BANDWIDTH_SHAPE,) if CUDA else ())
QUICK_SHAPES, QUICK_SOLVERS = ((1, 4, 16, 16),), ("ddpm", "dpmpp_2m")
IMPLS = ("fastdiff-torch", "fastdiff-triton", "fastdiff-triton-graph", "diffusers")
CPU_SKIP = "Triton on the CPU runs in its interpreter, far too slow to time: fused-step cases are CUDA only"


def pytest_generate_tests(metafunc):
    if "shape" not in metafunc.fixturenames:
        return
    quick = metafunc.config.getoption("--bench-quick")
    cases = []
    for shape in QUICK_SHAPES if quick else SHAPES:
        for cfg in (False, True):
            for solver in QUICK_SOLVERS if quick else tuple(bench.SCHEDULERS):
                for impl in IMPLS:
                    marks = [pytest.mark.skipif(not CUDA and impl.startswith("fastdiff-triton"), reason=CPU_SKIP)]
                    cases.append(pytest.param(shape, cfg, solver, impl, marks=marks, id=(
                        f"{'x'.join(map(str, shape))}-{'cfg' if cfg else 'nocfg'}-{solver}-{impl}")))
    metafunc.parametrize("shape,cfg,solver,impl", cases)


def test_step(benchmark, device, copy_bandwidth, shape, cfg, solver, impl):
    if impl == "diffusers":
        pytest.importorskip("diffusers")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if impl == "diffusers":
        case = bench.diffusers_step(solver, shape, cfg, device, dtype)
    else:
        backend = "triton" if impl.startswith("fastdiff-triton") else "torch"
        case = bench.fastdiff_step(solver, shape, cfg, device, dtype, backend=backend,
                                   graph=impl.endswith("-graph"))
    for _ in range(3):  # warm-up: Triton compilation, allocator, diffusers' lazy state
        case.run()
    benchmark.extra_info.update(
        kind="step", impl=impl, solver=solver, scheduler=bench.SCHEDULERS[solver], shape=list(shape), cfg=cfg,
        dtype=str(dtype).replace("torch.", ""), bytes=case.bytes_moved, steps_per_call=case.steps_per_call,
        tensor_MiB=math.prod(shape) * 4 / 2**20)
    benchmark(case.run)
    if benchmark.stats is not None:  # GB/s here too, so pytest-benchmark's own JSON shows it
        per_step = benchmark.stats.stats.median / case.steps_per_call
        benchmark.extra_info.update(median_per_step_s=per_step, GBps=case.bytes_moved / per_step / 1e9,
                                    fraction_of_copy=case.bytes_moved / per_step / copy_bandwidth)
