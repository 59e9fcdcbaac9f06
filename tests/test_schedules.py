"""Schedules match their formulas (and diffusers where it has the same one); grids and conversions."""
import math

import numpy as np
import pytest
import torch

from fastdiff import Schedule, make_grid
from fastdiff.grids import karras_sigmas, spaced_timesteps

F64 = torch.float64


def test_linear_and_scaled_linear_formulas():
    s = Schedule.linear(1000, 1e-4, 0.02)
    assert s.num_train_timesteps == 1000 and s.betas.dtype == F64
    torch.testing.assert_close(s.betas, torch.linspace(1e-4, 0.02, 1000, dtype=F64))
    torch.testing.assert_close(s.alphas_cumprod, torch.cumprod(1 - s.betas, 0))
    sl = Schedule.scaled_linear(1000, 0.00085, 0.012)
    torch.testing.assert_close(sl.betas, torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=F64) ** 2)


def test_cosine_follows_nichol_dhariwal():
    s = Schedule.cosine(1000)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for i in (0, 10, 500, 900):
        assert s.alphas_cumprod[i].item() == pytest.approx(f(i + 1) / f(0), rel=1e-9)
    assert s.betas.max().item() == pytest.approx(0.999)  # capped


def test_sigmoid_follows_chen_2023():
    s = Schedule.sigmoid(1000, start=-3, end=3, tau=1.0)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    v0, v1 = sig(-3), sig(3)
    for i in (0, 400, 999):
        t = (i + 1) / 1000
        want = max((v1 - sig(t * 6 - 3)) / (v1 - v0), 1e-9)
        assert s.alphas_cumprod[i].item() == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name,ours", [
    ("linear", lambda: Schedule.linear(1000, 1e-4, 0.02)),
    ("scaled_linear", lambda: Schedule.scaled_linear(1000, 0.00085, 0.012)),
    ("squaredcos_cap_v2", lambda: Schedule.cosine(1000)),
])
def test_alphas_cumprod_match_diffusers(name, ours):
    diffusers = pytest.importorskip("diffusers")
    kw = {"beta_start": 1e-4, "beta_end": 0.02} if name == "linear" else {"beta_start": 0.00085, "beta_end": 0.012}
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=name, **kw)
    np.testing.assert_allclose(ours().alphas_cumprod.numpy(), sched.alphas_cumprod.double().numpy(),
                               rtol=1e-6, atol=1e-7)


def test_zero_terminal_snr_matches_lin_et_al_and_diffusers():
    diffusers = pytest.importorskip("diffusers")
    ours = Schedule.scaled_linear().rescale_zero_terminal_snr()
    assert ours.alphas_cumprod[-1].item() == 0.0
    before = Schedule.scaled_linear()
    assert ours.alphas_cumprod[0].item() == pytest.approx(before.alphas_cumprod[0].item(), rel=1e-12)
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    rescale_betas_zero_snr=True)
    np.testing.assert_allclose(ours.alphas_cumprod.numpy()[:-1], sched.alphas_cumprod.double().numpy()[:-1],
                               rtol=1e-5, atol=1e-7)


def test_input_scaling_shifts_log_snr():
    s = Schedule.cosine(1000)
    scaled = s.input_scaled(0.5)
    torch.testing.assert_close(scaled.log_snr, s.log_snr + 2 * math.log(0.5), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="b must be > 0"):
        s.input_scaled(0.0)


def test_sigma_and_t_are_inverse_with_log_linear_interpolation():
    s = Schedule.linear()
    t = torch.tensor([0.0, 1.5, 10.25, 500.0, 998.75, 999.0], dtype=F64)
    sig = s.sigma_at(t)
    lo = s.sigmas.log()
    want = (1 - 0.25) * lo[10] + 0.25 * lo[11]
    assert sig[2].log().item() == pytest.approx(want.item(), rel=1e-12)
    torch.testing.assert_close(s.t_at(sig), t, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        s.sigma_at(torch.tensor([1000.0]))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 50, 1000])
def test_spacings_match_diffusers(spacing, steps):
    diffusers = pytest.importorskip("diffusers")
    offset = 1 if spacing == "leading" and steps < 1000 else 0
    sched = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    sched.set_timesteps(steps)
    ours = spaced_timesteps(1000, steps, spacing, steps_offset=offset)
    np.testing.assert_array_equal(ours, sched.timesteps.numpy())


def test_karras_grid_and_stride_quirk():
    s = Schedule.scaled_linear()
    sig = karras_sigmas(0.03, 14.6, 10, rho=7.0)
    assert sig[0].item() == pytest.approx(14.6) and sig[-1].item() == pytest.approx(0.03)
    g = make_grid(s, 10, sigmas="karras")
    torch.testing.assert_close(g.sigma, karras_sigmas(s.sigma_min, s.sigma_max, 10), rtol=1e-9, atol=1e-12)
    assert g.abar_to[-1].item() == 1.0
    # diffusers' DDIM under trailing spacing steps 999 -> 987 but 987 -> 975 while 974 is listed next
    g = make_grid(s, 80, spacing="trailing", stride_prev=True)
    assert g.t[0].item() == 999 and g.t[1].item() == 987 and g.t[2].item() == 974
    assert g.abar_to[1].item() == s.alphas_cumprod[975].item()


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="num_train_timesteps"):
        Schedule.linear(0)
    with pytest.raises(ValueError, match="betas"):
        Schedule.from_betas([0.1, 1.5])
    with pytest.raises(ValueError, match="unknown schedule 'quadratic'; allowed: cosine, linear, scaled_linear, sigmoid"):
        Schedule.named("quadratic")
    with pytest.raises(ValueError, match="unknown spacing"):
        spaced_timesteps(1000, 10, "middle")
