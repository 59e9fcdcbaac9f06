"""fastdiff.kernels.schedule_tables against float64 host formulas (Ho et al. 2020)."""
import math

import pytest
import torch

from fastdiff.kernels import schedule_tables


def linear_betas(T):  # Ho et al. 2020, rescaled for T > 1000 (Nichol & Dhariwal 2021)
    scale = 1000 / max(T, 1000)
    return torch.linspace(1e-4 * scale, 0.02 * scale, T, dtype=torch.float64)


def scaled_linear_betas(T):  # Stable Diffusion
    return torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2


def cosine_betas(T, s=0.008):  # Nichol & Dhariwal 2021, betas clipped to 0.999
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return torch.tensor([min(1 - f(t + 1) / f(t), 0.999) for t in range(T)], dtype=torch.float64)


def host_tables(betas):
    """The same quantities, written the obvious way (DDPM's diffusion_utils_2.py)."""
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    var = betas * (1 - abar_prev) / (1 - abar)
    return {
        "alphas_cumprod": abar,
        "sqrt_alphas_cumprod": abar.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - abar).sqrt(),
        "log_snr": torch.log(abar / (1 - abar)),
        "sigma_ve": ((1 - abar) / abar).sqrt(),
        "posterior_variance": var,
        "posterior_log_variance_clipped": torch.log(torch.cat([var[1:2], var[1:]])),
        "posterior_mean_coef1": betas * abar_prev.sqrt() / (1 - abar),
        "posterior_mean_coef2": (1 - abar_prev) * alphas.sqrt() / (1 - abar),
    }


# float64 throughout. On a GPU tl.associative_scan multiplies abar in a tree order, not
# cumprod's left-to-right one: abar may differ by a few ulps (~1e-16), which 1 - abar at the
# first steps (~1e-4) magnifies to ~1e-12 relative; a formula error would show at >= 1e-8.
# Triton's interpreter scans in order: 1e-12 holds there.
RTOL = 1e-10 if torch.cuda.is_available() else 1e-12
SCHEDULES = {"linear": linear_betas, "scaled_linear": scaled_linear_betas, "cosine": cosine_betas}


@pytest.mark.parametrize("T", [2, 7, 1000, 4000])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_matches_host(kernel_device, schedule, T):
    betas = SCHEDULES[schedule](T)
    got = schedule_tables(betas.to(kernel_device))
    want = host_tables(betas)
    assert set(got) == set(want)
    for name, w in want.items():
        g = got[name].cpu()
        assert g.dtype == torch.float64 and g.shape == (T,), name
        err = ((g - w).abs() / (w.abs() + 1e-300)).max()
        assert float(err) <= RTOL, f"{name}: max relative error {float(err):.3g}"


def test_posterior_identities(kernel_device):
    # E[x_{t-1} | x0] = sqrt(abar_prev) x0 and Var[x_{t-1} | x0] = 1 - abar_prev
    tab = {k: v.cpu() for k, v in schedule_tables(cosine_betas(50).to(kernel_device)).items()}
    abar = tab["alphas_cumprod"]
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    mean = tab["posterior_mean_coef1"] + tab["posterior_mean_coef2"] * tab["sqrt_alphas_cumprod"]
    var = tab["posterior_mean_coef2"] ** 2 * (1 - abar) + tab["posterior_variance"]
    torch.testing.assert_close(mean, abar_prev.sqrt(), rtol=RTOL, atol=1e-14)
    torch.testing.assert_close(var, 1 - abar_prev, rtol=RTOL, atol=1e-14)
    torch.testing.assert_close(tab["log_snr"], -2 * tab["sigma_ve"].log(), rtol=RTOL, atol=1e-12)


def test_validation(kernel_device):
    with pytest.raises(ValueError, match="float64"):
        schedule_tables(linear_betas(10).float().to(kernel_device))
    with pytest.raises(ValueError, match="T"):
        schedule_tables(linear_betas(1).to(kernel_device))
