"""Whole sampling loops over one model, side by side, and their one-time costs.

    fastdiff-eager          Sampler(graph=False): the CPU default (torch backend); on CUDA the
                            fused kernels, launched eagerly
    fastdiff-graph          Sampler(graph=True): the whole loop replayed from one CUDA graph
    fastdiff-graph-compile  the same with compile=True: a torch.compile'd U-Net inside the graph
    fastdiff-compile        CPU: Sampler(compile=True), the eager loop over the compiled U-Net
    diffusers-eager         the diffusers pipelines' loop: torch.cat for CFG, scale_model_input,
                            the model, the CFG combine, scheduler.step
    model-eager             the model alone, one call on the loop's batch (x steps: its model time)
    model-graph             the model alone, all `steps` calls replayed from one CUDA graph: the limit
    model-compile           CPU: the compiled model alone (as compile=True calls it): fastdiff-compile's limit
    model-graph-compile     CUDA: the compiled model alone, `steps` calls in one graph: fastdiff-graph-compile's limit

Models: on every device the digits model (8 samples, CFG 3, 20 steps, dpmpp_2m against
DPMSolverMultistepScheduler, as `fastdiff sample`), and a flow-matching loop over a no-op
velocity model (8 x 16x32x32, euler 28 steps against FlowMatchEulerDiscreteScheduler, shift 3):
each sampler's own work on a flow model. On CUDA also the CIFAR10-shaped
UNet2DModel (b1 fp32, b64 fp16; 50 steps, ddpm against DDPMScheduler) and the SD1.5-shaped
UNet2DConditionModel (b1, b8; CFG 7.5, fp16, 25 steps, dpmpp_2m against
DPMSolverMultistepScheduler), random weights (timing does not depend on weights).
Graph-mode cases are CUDA only. On CUDA compilation runs for SD1.5 b1 only (its it/s target;
each compile costs a minute or more); on the CPU for the digits model. compile_model compiles
a channels_last copy of a conv net, so eager cases beside compiled ones are unaffected.
One-time costs (first call; graph warm-up and capture; compile) go into extra_info.
"""
import gc
import math

import pytest
import torch

from fastdiff import bench

CUDA = torch.cuda.is_available()
LOOP_BUDGET_S = 4.0  # timed seconds per case, roughly: rounds = budget / seconds per call, in [3, 10]
GUIDANCE_INTERVAL = (0.28, 5.42)
SIDE_BY_SIDE_BUDGET_S = 75.0  # the same for the interleaved digits rounds, in [5, 15]
EAGER = ("fastdiff-eager", "diffusers-eager", "model-eager")
GRAPH = ("fastdiff-graph", "model-graph")
CPU_COMPILE = ("fastdiff-compile", "model-compile")  # on CUDA the compiled U-Net runs inside the graph


def cases(quick: bool):
    """(case name, builder, impls), in run order: most telling first, in case a budget runs out."""
    f16, f32 = torch.float16, torch.float32
    impls = EAGER + (GRAPH if CUDA else ())
    if quick:
        return [("digits-b2-fp32", lambda d: bench.digits_model(d, batch=2, steps=3), impls)]
    out = [("digits-b8-fp32", lambda d: bench.digits_model(d, batch=8, steps=20),
            impls + (() if CUDA else CPU_COMPILE)),
           ("flow-noop-b8-fp32", lambda d: bench.flow_model(d), tuple(i for i in impls if not i.startswith("model")))]
    if CUDA:
        out += [
            ("cifar10-b1-fp32", lambda d: bench.cifar10_model(d, 1, f32, steps=50), impls),
            ("sd15-b1-fp16", lambda d: bench.sd15_model(d, 1, f16, steps=25),
             impls + ("fastdiff-graph-compile", "model-graph-compile")),
            ("cifar10-b64-fp16", lambda d: bench.cifar10_model(d, 64, f16, steps=50), impls),
            ("sd15-b8-fp16", lambda d: bench.sd15_model(d, 8, f16, steps=25), impls),
        ]
    return out


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    params = [pytest.param(name, build, impl, id=f"{name}-{impl}")
              for name, build, impls in cases(metafunc.config.getoption("--bench-quick")) for impl in impls]
    metafunc.parametrize("case,build,impl", params)


_model: dict = {}  # one model at a time: the case being run


def loop_model(case: str, build, device) -> bench.LoopModel:
    if _model.get("case") != case:
        _model.clear()
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()
        _model.update(case=case, lm=build(device))
    return _model["lm"]


@pytest.mark.benchmark(group="loop", timer=bench.synced_clock)
def test_loop(benchmark, device, case, build, impl):
    if impl == "diffusers-eager" or not case.startswith("digits"):
        pytest.importorskip("diffusers")
    lm = loop_model(case, build, device)
    info = {**lm.info(), "kind": "model" if impl.startswith("model") else "loop", "impl": impl, "model_calls": 1}
    compile = impl.endswith("compile")
    if impl.startswith("fastdiff"):
        graph = impl.startswith("fastdiff-graph")
        sampler, run = bench.fastdiff_loop(lm, device, graph=graph, compile=compile)
        info["first_call_s"] = bench.timed_call(run, device)  # buffers; with graph: warm-up (+ compile), capture
        info.update(sampler.timings if graph else {})
    elif impl == "diffusers-eager":
        run = bench.diffusers_loop(lm, device)
        info["first_call_s"] = bench.timed_call(run, device)
    else:
        run, info["model_calls"] = bench.model_alone(lm, device, graph=impl.startswith("model-graph"),
                                                     compile=compile)
        info["first_call_s"] = bench.timed_call(run, device)
    per_call = bench.timed_call(run, device)  # a warm call sizes the rounds
    iterations = max(1, math.ceil(0.02 / per_call))  # model-eager: >= 20 ms per round
    rounds = max(3, min(10, int(LOOP_BUDGET_S / (per_call * iterations))))
    benchmark.extra_info.update(info)
    benchmark.pedantic(run, rounds=rounds, iterations=iterations, warmup_rounds=0)


@pytest.mark.benchmark(group="side-by-side", timer=bench.synced_clock)
def test_digits_side_by_side(benchmark, device, quick):
    """The digits claims as one interleaved measurement: each round runs fastdiff's loop (the
    device's default Sampler), the diffusers-style loop and steps x the model alone, in turn,
    so background load on a shared machine hits all alike; and both loops once more with the
    model replaced by a no-op, which times each sampler's own work directly; and fastdiff's
    loop guided only inside GUIDANCE_INTERVAL (the model sees B rows outside it). On the CPU (not
    --bench-quick) also Sampler(compile=True), the diffusers-style loop over the same compiled
    model, and steps x the compiled model alone.
    pytest-benchmark times the whole round; the per-impl samples are in extra_info."""
    pytest.importorskip("diffusers")
    lm = bench.digits_model(device, batch=2 if quick else 8, steps=3 if quick else 20)
    noop = bench.without_model(lm)
    alone, _ = bench.model_alone(lm, device)
    fns = {"fastdiff": bench.fastdiff_loop(lm, device)[1], "diffusers-eager": bench.diffusers_loop(lm, device),
           "model-eager": lambda: [alone() for _ in range(lm.steps)],
           # guidance only for sigma in [0.28, 5.42] (Kynkaenniemi et al.'s EDM2 interval): 10 of the 20
           # dpmpp_2m steps at 2B rows, the others at B
           "fastdiff-interval": bench.fastdiff_loop(lm, device, guidance_interval=GUIDANCE_INTERVAL)[1]}
    if not (CUDA or quick):
        alone_compiled, _ = bench.model_alone(lm, device, compile=True)
        fns["fastdiff-compile"] = bench.fastdiff_loop(lm, device, compile=True)[1]
        fns["diffusers-compile"] = bench.diffusers_loop(bench.with_compiled_model_in_diffusers_loop(lm), device)
        fns["model-compile"] = lambda: [alone_compiled() for _ in range(lm.steps)]
    fns.update({"fastdiff-noop": bench.fastdiff_loop(noop, device)[1],
                "diffusers-noop": bench.diffusers_loop(noop, device)})
    samples = {name: [] for name in fns}

    def one_round():  # in an order rotated every round: each impl takes each position in turn
        for name in bench.rotated(list(fns), len(samples["fastdiff"])):
            samples[name].append(bench.timed_call(fns[name], device))

    for fn in fns.values():  # warm-up (compilation; on CUDA the graph capture)
        fn()
    one_round()
    rounds = max(5, min(15, int(SIDE_BY_SIDE_BUDGET_S / sum(s[-1] for s in samples.values()))))
    for s in samples.values():
        s.clear()
    benchmark.extra_info.update(lm.info(), kind="side_by_side", impl="interleaved", samples_by_impl=samples)
    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)
