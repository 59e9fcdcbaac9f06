"""The triton backend (fused kernel; Triton's interpreter without a GPU) equals the torch backend.

Every solver x prediction type x CFG on/off in fp32, stochastic solvers included (both draw
the same counter-based noise); in fp16/bf16 the fused path's error against a float64
reference is at most twice the torch backend's.
"""
import pytest
import torch

from fastdiff import SOLVERS, Sampler, Schedule
from fastdiff.columns import P
from gaussian_model import GaussianDenoiser
from reference_loop import plain_loop

SCHEDULE = Schedule.linear()
SHAPES = [(1, 1, 1), (3, 5, 7), (4, 33, 17)]  # per-sample; batch sizes vary below


def run(backend, solver, prediction, cfg, dtype, shape, batch, device, **kw):
    model = GaussianDenoiser(SCHEDULE, prediction=prediction).to(device)
    sampler = Sampler(model, SCHEDULE, solver=solver, steps=4, prediction=prediction, backend=backend,
                      device=device, dtype=dtype, **kw)
    seeds = list(range(7, 7 + batch))
    extra = {}
    if cfg:
        extra = dict(cond={"class_labels": torch.linspace(-1, 1, batch, device=device)},
                     uncond={"class_labels": torch.zeros(batch, device=device)}, guidance_scale=3.0)
    return sampler.sample(shape=(batch, *shape), seeds=seeds, **extra), sampler, extra


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("cfg", [False, True], ids=["nocfg", "cfg"])
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_triton_equals_torch_fp32(solver, prediction, cfg, kernel_device):
    shape, batch = SHAPES[(len(solver) + len(prediction)) % 3], 2 + cfg
    a, _, _ = run("triton", solver, prediction, cfg, torch.float32, shape, batch, kernel_device)
    b, _, _ = run("torch", solver, prediction, cfg, torch.float32, shape, batch, kernel_device)
    assert rel_err(a, b) < 1e-5, rel_err(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("cfg", [False, True], ids=["nocfg", "cfg"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_half_precision_error_is_at_most_twice_torchs(solver, cfg, dtype, kernel_device):
    shape, batch = (3, 5, 7), 2
    tri, sampler, extra = run("triton", solver, "epsilon", cfg, dtype, shape, batch, kernel_device)
    tor, _, _ = run("torch", solver, "epsilon", cfg, dtype, shape, batch, kernel_device)
    model64 = GaussianDenoiser(SCHEDULE).double()
    seeds = list(range(7, 7 + batch))
    cond = {k: v.cpu() for k, v in extra.get("cond", {}).items()} or None
    uncond = {k: v.cpu() for k, v in extra.get("uncond", {}).items()} or None
    ref = plain_loop(model64, sampler.table, seeds, shape, cond, uncond, extra.get("guidance_scale"),
                     dtype=torch.float64)
    e_tri, e_tor = rel_err(tri.cpu(), ref), rel_err(tor.cpu(), ref)
    assert e_tri <= 2 * e_tor + 1e-6, (e_tri, e_tor)


RUNGE_KUTTA = dict(warmup="pseudo_runge_kutta")  # plms: 13 rows, 3 steps of 4, then PLMS


@pytest.mark.parametrize("cfg", [False, True], ids=["nocfg", "cfg"])
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_triton_equals_torch_on_pndms_runge_kutta_warmup(prediction, cfg, kernel_device):
    """Its inner rows read the point column P (o2 = (P - C x) / E, o3 from D_raw and P)."""
    shape, batch = SHAPES[(len(prediction) + cfg) % 3], 2 + cfg
    a, sampler, _ = run("triton", "plms", prediction, cfg, torch.float32, shape, batch, kernel_device, **RUNGE_KUTTA)
    b, _, _ = run("torch", "plms", prediction, cfg, torch.float32, shape, batch, kernel_device, **RUNGE_KUTTA)
    assert sampler.table.rows == 13 and bool((sampler.table.state[:, P] != 0).any())  # the P column is used
    assert rel_err(a, b) < 1e-5, rel_err(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_runge_kutta_warmup_error_is_at_most_twice_torchs(dtype, kernel_device):
    shape, batch = (3, 5, 7), 2
    tri, sampler, _ = run("triton", "plms", "epsilon", False, dtype, shape, batch, kernel_device, **RUNGE_KUTTA)
    tor, _, _ = run("torch", "plms", "epsilon", False, dtype, shape, batch, kernel_device, **RUNGE_KUTTA)
    ref = plain_loop(GaussianDenoiser(SCHEDULE).double(), sampler.table, [7, 8], shape, dtype=torch.float64)
    e_tri, e_tor = rel_err(tri.cpu(), ref), rel_err(tor.cpu(), ref)
    assert e_tri <= 2 * e_tor + 1e-6, (e_tri, e_tor)


@pytest.mark.parametrize("kw", [dict(clip_sample=True, clip_range=0.5), dict(thresholding=True),
                                dict(guidance_rescale=0.7), dict(corrector="langevin", snr=0.1)],
                         ids=["clip", "dynamic", "rescale", "langevin"])
def test_triton_equals_torch_with_extras(kw, kernel_device):
    a, _, _ = run("triton", "ddim", "epsilon", True, torch.float32, (3, 5, 7), 3, kernel_device, **kw)
    b, _, _ = run("torch", "ddim", "epsilon", True, torch.float32, (3, 5, 7), 3, kernel_device, **kw)
    assert rel_err(a, b) < 1e-5, rel_err(a, b)


def test_auto_backend_is_torch_on_cpu_and_triton_on_cuda():
    sampler = Sampler(GaussianDenoiser(SCHEDULE), SCHEDULE, steps=2)
    assert sampler.backend == ("triton" if sampler.device.type == "cuda" else "torch")


def test_float64_models_take_the_torch_backend(kernel_device):
    """The fused step reads fp32/fp16/bf16 model tensors: 'auto' picks the torch executor for a
    float64 model, an explicit 'triton' is refused naming the dtypes, and a float64 *output* of
    a float32 model is read as float32."""
    model64 = GaussianDenoiser(SCHEDULE).double()
    assert Sampler(model64, SCHEDULE, steps=2, device=kernel_device, dtype=torch.float64).backend == "torch"
    with pytest.raises(ValueError, match="backend='triton' takes float32, float16, bfloat16 tensors; got dtype "
                                         "float64: use backend='torch'"):
        Sampler(model64, SCHEDULE, steps=2, backend="triton", device=kernel_device, dtype=torch.float64)

    class Float64Out(torch.nn.Module):  # float32 in, float64 out
        def __init__(self):
            super().__init__()
            self.inner = GaussianDenoiser(SCHEDULE)

        def forward(self, x, t):
            return self.inner(x.double(), t)

    args = dict(solver="dpmpp_2m", steps=4, device=kernel_device, dtype=torch.float32)
    a, b = (Sampler(Float64Out().to(kernel_device), SCHEDULE, backend=backend, **args).sample(
        shape=(2, 3, 5), seeds=[1, 2]) for backend in ("triton", "torch"))
    assert rel_err(a, b) < 1e-5
