"""Every kernel variant the library launches compiles for sm_90 and sm_80, here, without a GPU.

fastdiff.kernel_compile runs the library's paths in Triton's interpreter with the launchers
intercepted, then compiles each distinct variant with triton.compile and the ptxas of Triton's
wheel. Default: the covering quick set (every option value of each kernel and model dtype)
for sm_90, and each kernel and dtype's heaviest variant for sm_80: 40 compiles, ~37 s of CPU
(75-85 s wall on this shared, loaded 2-core machine). FASTDIFF_KERNEL_SWEEP=full: every
variant of the full sweep, both archs (minutes).
This proves the kernels compile and bounds their registers and spills; it says nothing about
their speed or their numerics on silicon (the interpreter tests and the CUDA tests do that).
"""
import os

import pytest

from fastdiff import kernel_compile as kc

FULL = os.environ.get("FASTDIFF_KERNEL_SWEEP") == "full"
# Spill allowance of the fused step, bytes per thread (ptxas's spill stores/loads): none.
# A spill is a local-memory round trip per element in a kernel that should only stream x,
# the model output and the history; the step is bandwidth-bound, so a spill costs bandwidth.
SPILL_ALLOWANCE = {"fp32": 0, "fp16": 0, "bf16": 0}

pytestmark = pytest.mark.skipif(kc.ptxas_path() is None,
                                reason="no ptxas (Triton's wheel bundles one; or set TRITON_PTXAS_PATH)")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    variants = kc.collect(full=FULL)
    if FULL:
        tasks = [(v, arch) for v in variants for arch in kc.ARCHS]
    else:  # the covering set for sm_90; for sm_80 each kernel and dtype's heaviest (listed first)
        cover = kc.covering(variants)
        heaviest = {(v.family, v.dtype): v for v in reversed(cover)}.values()
        tasks = [(v, 90) for v in cover] + [(v, 80) for v in heaviest]
    results = kc.compile_tasks(tasks, cache_dir=str(tmp_path_factory.mktemp("triton-cache")))
    return variants, results


def test_the_collector_sees_every_kernel_and_flag_the_library_launches(sweep):
    """The sweep is not vacuous: the fused step, forward noising and the KL reduction with each
    model dtype, the schedule tables; and each of the step's feature flags both on and off."""
    variants, _ = sweep
    assert {(v.family, v.dtype) for v in variants} >= {
        ("affine_step", "fp32"), ("affine_step", "fp16"), ("affine_step", "bf16"),
        ("forward_noise", "fp32"), ("forward_noise", "fp16"), ("forward_noise", "bf16"),
        ("gaussian_kl", "fp32"), ("gaussian_kl", "fp16"), ("gaussian_kl", "bf16"), ("schedule_tables", "fp64")}
    step = [v for v in variants if v.family == "affine_step"]
    names = kc._jit_function(kc.kernel_objects()["fastdiff.kernels.affine_step:_affine_step_kernel"]).arg_names
    seen = {}
    for v in step:
        for name, value in v.named_constexprs(names).items():
            seen.setdefault(name, set()).add(value)
    for flag in ("HAS_POINT", "CFG", "PUSH", "NOISE", "CLIP", "THRESH", "OUT_SCALE", "WRITE_MODEL_IN",
                 "MODEL_IN_CFG"):
        assert seen[flag] == {False, True}, (flag, seen[flag])
    assert seen["K"] >= {0, 1, 2}
    assert {v.signature["model_in_ptr"] for v in step} >= {"*fp32", "*fp16", "*bf16"}


def test_every_variant_compiles_for_sm90_and_sm80(sweep):
    _, results = sweep
    assert {r.arch for r in results} == set(kc.ARCHS)
    failed = [f"{r.variant.kernel} sm_{r.arch} {r.variant.named_constexprs(list(r.variant.signature))}: {r.error}"
              for r in results if r.error]
    assert not failed, "\n".join(failed[:3])
    assert all(r.registers > 0 for r in results)  # ptxas's report was read


def test_fused_step_spills_within_allowance(sweep):
    _, results = sweep
    over = [(r.variant.dtype, f"sm_{r.arch}", r.spill_stores, r.spill_loads)
            for r in results if r.variant.family == "affine_step" and not r.error
            and max(r.spill_stores, r.spill_loads) > SPILL_ALLOWANCE[r.variant.dtype]]
    assert not over, f"fused step spills beyond {SPILL_ALLOWANCE} bytes: {over}"
