"""fastdiff.kernels.forward_noise: x_t = sqrt(abar) x0 + sqrt(1 - abar) z, z from fastdiff.rng."""
import pytest
import torch

from fastdiff import rng
from fastdiff.kernels import forward_noise
from fastdiff.rng import STREAM_FORWARD

SHAPES = [(1, 1, 1, 1), (3, 5, 7, 9), (2, 4, 33, 17)]
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def reference(x0, abar, seeds, step=0, noise=None):
    B, S = x0.shape[0], x0.shape[1:]
    z = rng.randn(seeds, step, STREAM_FORWARD, S) if noise is None else noise.float()
    a = abar.double().sqrt().float().view(B, *([1] * len(S)))
    s = (1 - abar.double()).sqrt().float().view(B, *([1] * len(S)))
    return a * x0.float() + s * z


def _assert_close(got, want, dtype):
    rtol, atol = TOL[dtype]
    want = want.to(dtype).double()
    bad = ~((got.double() - want).abs() <= atol + rtol * want.abs())
    assert not bool(bad.any()), (
        f"{int(bad.sum())} mismatches, first at {bad.nonzero()[:5].tolist()}: "
        f"{got.double()[bad][:5].tolist()} vs {want[bad][:5].tolist()}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("given_noise", [False, True], ids=["rng", "noise"])
def test_matches_reference(kernel_device, shape, dtype, given_noise):
    g = torch.Generator().manual_seed(sum(shape))
    B = shape[0]
    x0 = torch.randn(shape, generator=g).to(dtype)
    abar = torch.rand(B, generator=g, dtype=torch.float64)
    seeds = torch.randint(0, 2**62, (B,), generator=g)
    noise = torch.randn(shape, generator=g).to(dtype) if given_noise else None
    out = torch.full(shape, float("nan"), dtype=dtype, device=kernel_device)  # poisoned
    d = lambda t: None if t is None else t.to(kernel_device)  # noqa: E731
    res = forward_noise(d(x0), d(abar), d(seeds), step=5, noise=d(noise), out=out)
    assert res is out
    _assert_close(out.cpu(), reference(x0, abar, seeds, 5, noise), dtype)


def test_more_samples_than_a_grid_axis_holds(kernel_device, N=3):
    """add_noise over 65541 points (> 65535, a GPU grid's axes 1-2): every sample's noise is
    its own seed's, past 65535 too."""
    B = 65541
    g = torch.Generator().manual_seed(N)
    x0, abar = torch.randn(B, N, generator=g), torch.rand(B, generator=g, dtype=torch.float64)
    seeds = torch.randint(0, 2**62, (B,), generator=g)
    out = forward_noise(x0.to(kernel_device), abar.to(kernel_device), seeds.to(kernel_device), step=2)
    _assert_close(out.cpu(), reference(x0, abar, seeds, 2), torch.float32)


def test_allocates_and_in_place(kernel_device):
    x0 = torch.randn(2, 3, 8, device=kernel_device)
    abar = torch.tensor([0.25, 0.81], device=kernel_device)  # float32 abar
    seeds = torch.tensor([1, 2**40], device=kernel_device)
    y = forward_noise(x0, abar, seeds)
    assert y.shape == x0.shape and y.dtype == x0.dtype
    _assert_close(y.cpu(), reference(x0.cpu(), abar.cpu(), seeds.cpu()), torch.float32)
    x_inplace = x0.clone()
    forward_noise(x_inplace, abar, seeds, out=x_inplace)
    assert torch.equal(x_inplace, y)


def test_batch_invariance_and_steps(kernel_device):
    x0 = torch.zeros(3, 40, device=kernel_device)
    abar = torch.zeros(3, dtype=torch.float64, device=kernel_device)  # x_t = z exactly
    seeds = torch.tensor([7, 8, 9], device=kernel_device)
    z = forward_noise(x0, abar, seeds, step=3).cpu()
    z1 = forward_noise(x0[1:2], abar[1:2], seeds[1:2], step=3).cpu()
    assert torch.equal(z[1], z1[0])
    other_step = forward_noise(x0, abar, seeds, step=4).cpu()
    assert float((z == other_step).float().mean()) < 0.05
    want = rng.randn(seeds.cpu(), 3, STREAM_FORWARD, (40,))
    ulps = (z.view(torch.int32).long() - want.view(torch.int32).long()).abs()
    assert bool(((ulps <= 4) | ((z - want).abs() <= 1e-6)).all())


def test_validation(kernel_device):
    x0 = torch.zeros(2, 4, device=kernel_device)
    seeds = torch.zeros(2, dtype=torch.int64, device=kernel_device)
    abar = torch.ones(2, device=kernel_device)
    with pytest.raises(ValueError, match="abar"):
        forward_noise(x0, abar[:1], seeds)
    with pytest.raises(ValueError, match="seeds"):
        forward_noise(x0, abar, seeds.int())
    with pytest.raises(ValueError, match="noise"):
        forward_noise(x0, abar, seeds, noise=torch.zeros(2, 5, device=kernel_device))
    with pytest.raises(ValueError, match="x0"):
        forward_noise(x0.double(), abar, seeds)


def test_add_noise_takes_strided_inputs_on_the_fused_path(kernel_device):
    """A permuted image (NHWC data viewed as NCHW), a strided noise and a strided seed view:
    the fused path equals the torch path on contiguous copies."""
    from fastdiff import Schedule, add_noise

    nhwc = torch.randn(3, 5, 6, 2, device=kernel_device)
    x0 = nhwc.permute(0, 3, 1, 2)  # [3, 2, 5, 6], not contiguous
    noise = torch.randn(3, 2, 6, 5, device=kernel_device).transpose(2, 3)
    seeds = torch.tensor([7, 0, 8, 0, 9, 0], device=kernel_device)[::2]
    t = torch.tensor([10, 500, 990], device=kernel_device)
    sch = Schedule.linear()
    for kw in (dict(noise=noise), dict(seeds=seeds)):
        got = add_noise(x0, t, sch, backend="triton", **kw)
        contiguous = {k: v.contiguous() for k, v in kw.items()}
        want = add_noise(x0.contiguous(), t, sch, backend="torch", **contiguous)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_float64_noising_takes_the_torch_path(kernel_device):
    from fastdiff import Schedule, add_noise

    x0 = torch.randn(2, 3, 4, dtype=torch.float64, device=kernel_device)
    t = torch.tensor([10, 900], device=kernel_device)
    out = add_noise(x0, t, Schedule.linear(), seeds=[1, 2])  # 'auto': the kernel takes no float64
    assert out.dtype == torch.float64
    with pytest.raises(ValueError, match="backend='triton' takes float32, float16, bfloat16 tensors; got dtype float64: use backend='torch'"):
        add_noise(x0, t, Schedule.linear(), seeds=[1, 2], backend="triton")
