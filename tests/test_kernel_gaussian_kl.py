"""fastdiff.kernels.gaussian_kl against the torch reference (fastdiff.likelihood.gaussian_kl_torch)
and against the posterior means written out in float64."""
import pytest
import torch

from fastdiff.kernels import gaussian_kl
from fastdiff.likelihood import gaussian_kl_torch

# (rows, rows_per_sample, sample shape): odd sizes, a row longer than one block, one element
SHAPES = [(6, 3, (1, 5, 7)), (5, 1, (3, 11)), (4, 2, (1300,)), (3, 3, (1,))]
TOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}


def inputs(R, k, S, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(R, *S, generator=g).to(dtype)
    out = torch.randn(R, *S, generator=g).to(dtype)
    x0 = torch.rand(R // k, *S, generator=g) * 2 - 1
    coef = torch.stack([torch.rand(R, generator=g) + 0.5, -torch.rand(R, generator=g), torch.rand(R, generator=g),
                        torch.rand(R, generator=g) * 10, torch.randn(R, generator=g)], 1)
    return x_t, x0, out, coef


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("R,k,S", SHAPES, ids=lambda v: str(v))
def test_matches_reference(kernel_device, R, k, S, dtype):
    x_t, x0, out, coef = inputs(R, k, S, dtype, seed=R * 7 + len(S))
    d = lambda t: t.to(kernel_device)  # noqa: E731
    got = gaussian_kl(d(x_t), d(x0), d(out), d(coef), k).cpu()
    assert got.dtype == torch.float32 and got.shape == (R,)
    want = gaussian_kl_torch(x_t, x0, out, coef, k)
    bad = ~((got.double() - want).abs() <= TOL[dtype] * (want.abs() + 1))
    assert not bool(bad.any()), f"rows {bad.nonzero().flatten().tolist()}: {got[bad].tolist()} vs {want[bad].tolist()}"


def test_is_the_posterior_mean_distance():
    """The reference against mu_q and mu_theta formed separately, in float64."""
    R, k, S = 4, 2, (3, 5)
    x_t, x0, out, coef = inputs(R, k, S, torch.float32, seed=1)
    c = coef.double()
    coef_xt = torch.rand(R, dtype=torch.float64)  # any x_t coefficient: it cancels
    D = c[:, 0, None, None] * x_t.double() + c[:, 1, None, None] * out.double()
    x0r = x0.double().repeat_interleave(k, 0)
    mu_q = c[:, 2, None, None] * x0r + coef_xt[:, None, None] * x_t.double()
    mu_p = c[:, 2, None, None] * D + coef_xt[:, None, None] * x_t.double()
    want = c[:, 3] * (mu_q - mu_p).square().sum((1, 2)) + c[:, 4]
    torch.testing.assert_close(gaussian_kl_torch(x_t, x0, out, coef, k), want, rtol=1e-5, atol=1e-6)


def test_rows_do_not_depend_on_the_batch(kernel_device):
    x_t, x0, out, coef = (t.to(kernel_device) for t in inputs(6, 2, (1, 9, 9), torch.float32, seed=2))
    whole = gaussian_kl(x_t, x0, out, coef, 2)
    part = gaussian_kl(x_t[2:4].contiguous(), x0[1:2].contiguous(), out[2:4].contiguous(), coef[2:4].contiguous(), 2)
    assert torch.equal(whole[2:4], part)


def test_validation(kernel_device):
    x_t, x0, out, coef = (t.to(kernel_device) for t in inputs(4, 2, (5,), torch.float32, seed=3))
    with pytest.raises(ValueError, match="rows_per_sample"):
        gaussian_kl(x_t, x0, out, coef, 3)
    with pytest.raises(ValueError, match="x0"):
        gaussian_kl(x_t, x0.half(), out, coef, 2)
    with pytest.raises(ValueError, match="coef"):
        gaussian_kl(x_t, x0, out, coef[:, :4].contiguous(), 2)
    with pytest.raises(ValueError, match="out"):
        gaussian_kl(x_t, x0, out.double(), coef, 2)
    with pytest.raises(ValueError, match="x_t"):
        gaussian_kl(x_t.t(), x0, out, coef, 2)
