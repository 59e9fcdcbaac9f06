"""Sampler.invert: sample(noise=invert(x0)) returns x0 for every deterministic solver."""
import math

import pytest
import torch
from gaussian_model import GaussianDenoiser

import fastdiff

SOLVERS = ["ddim", "euler", "heun", "dpmpp_2m", "unipc"]
SCHEDULE = fastdiff.Schedule.linear()


class ConvNet(torch.nn.Module):
    """A small random epsilon-network: two convolutions over the image and a timestep channel."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a = torch.nn.Conv2d(2, 16, 3, padding=1)
        self.b = torch.nn.Conv2d(16, 1, 3, padding=1)

    def forward(self, x, t):
        tt = (t.float() / 1000).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        return x + self.b(torch.nn.functional.silu(self.a(torch.cat([x, tt], 1))))


def rel(a, b):
    return float((a - b).norm() / b.norm())


def gaussian_data(B=3):
    return 0.7 + 0.5 * torch.randn(B, 1, 4, 4, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("steps", [20, 50, 100])
@pytest.mark.parametrize("solver", SOLVERS)
def test_exact_inversion_round_trips(solver, steps):
    x_gauss = gaussian_data()
    x_digits = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(1)) * 2 - 1
    for model, x0 in ((GaussianDenoiser(SCHEDULE), x_gauss), (ConvNet(), x_digits)):
        sampler = fastdiff.Sampler(model, SCHEDULE, solver=solver, steps=steps)
        x_T = sampler.invert(x0)
        assert x_T.shape == x0.shape and x_T.dtype == torch.float32
        assert rel(sampler.sample(noise=x_T), x0) < 1e-5


@pytest.mark.parametrize("solver", SOLVERS)
def test_naive_inversion_error_falls_with_steps(solver):
    model, x0 = GaussianDenoiser(SCHEDULE), gaussian_data()
    errors = []
    for steps in (10, 20, 40):
        sampler = fastdiff.Sampler(model, SCHEDULE, solver=solver, steps=steps)
        errors.append(rel(sampler.sample(noise=sampler.invert(x0, mode="naive")), x0))
    assert errors[0] > errors[1] > errors[2] > 1e-3, errors  # first order: roughly halves per doubling


@pytest.mark.parametrize("solver", ["ddim", "heun"])
def test_inversion_approaches_the_exact_encoder(solver):
    """For Gaussian data the probability-flow ODE maps x0 to alpha mu + sqrt(alpha^2 s^2 + sigma^2) (x0 - mu) / s
    at the grid's first level: the inverse of a finer solve lands closer to it."""
    x0 = gaussian_data()
    errors = []
    for steps in (10, 40):
        sampler = fastdiff.Sampler(GaussianDenoiser(SCHEDULE), SCHEDULE, solver=solver, steps=steps)
        abar = float(sampler.grid.abar[0])
        a = math.sqrt(abar)
        x_t = a * 0.7 + math.sqrt(abar * 0.25 + 1 - abar) * (x0 - 0.7) / 0.5
        if sampler.table.space == "ve":
            x_t = x_t / a / sampler.init_noise_sigma
        errors.append(rel(sampler.invert(x0), x_t))
    assert errors[1] < errors[0] / 3, errors


def test_guided_inversion_round_trips_and_is_per_sample():
    model = GaussianDenoiser(SCHEDULE)
    x0 = gaussian_data(4)
    labels = torch.tensor([0, 1, 2, 1])
    sampler = fastdiff.Sampler(model, SCHEDULE, solver="dpmpp_2m", steps=20)
    kw = dict(cond={"class_labels": labels}, uncond={"class_labels": torch.zeros(4)},
              guidance_scale=torch.tensor([1.5, 2.0, 2.5, 3.0]))
    x_T = sampler.invert(x0, **kw)
    assert rel(sampler.sample(noise=x_T, **kw), x0) < 1e-5
    one = sampler.invert(x0[2:3], cond={"class_labels": labels[2:3]}, uncond={"class_labels": torch.zeros(1)},
                         guidance_scale=2.5)
    torch.testing.assert_close(one[0], x_T[2], rtol=1e-6, atol=1e-6)


def test_steps_option_inverts_on_another_grid():
    model, x0 = GaussianDenoiser(SCHEDULE), gaussian_data()
    x_T = fastdiff.Sampler(model, SCHEDULE, solver="unipc", steps=20).invert(x0, steps=30)
    assert rel(fastdiff.Sampler(model, SCHEDULE, solver="unipc", steps=30).sample(noise=x_T), x0) < 1e-5


def test_refusals():
    model, x0 = GaussianDenoiser(SCHEDULE), gaussian_data(1)
    for solver in ("ddpm", "euler_ancestral", "dpmpp_2m_sde"):
        with pytest.raises(ValueError, match=f"deterministic solver, got '{solver}'"):
            fastdiff.Sampler(model, SCHEDULE, solver=solver, steps=10).invert(x0)
    with pytest.raises(ValueError, match="ddim with eta=0.5"):
        fastdiff.Sampler(model, SCHEDULE, solver="ddim", eta=0.5, steps=10).invert(x0)
    with pytest.raises(ValueError, match="clip_sample"):
        fastdiff.Sampler(model, SCHEDULE, solver="ddim", clip_sample=True, steps=10).invert(x0)
    with pytest.raises(ValueError, match="prediction 'sample'"):
        fastdiff.Sampler(GaussianDenoiser(SCHEDULE, prediction="sample"), SCHEDULE, solver="ddim", steps=10,
                         prediction="sample").invert(x0)
    sampler = fastdiff.Sampler(model, SCHEDULE, solver="ddim", steps=10)
    for kw, msg in ((dict(mode="fast"), "mode"), (dict(iterations=0), "iterations"), (dict(sweeps=0), "sweeps"),
                    (dict(tol=-1.0), "tol"), (dict(steps=0), "steps")):
        with pytest.raises(ValueError, match=msg):
            sampler.invert(x0, **kw)
    with pytest.raises(FloatingPointError, match="non-finite model output at step"):
        fastdiff.Sampler(lambda x, t: x * float("nan"), SCHEDULE, solver="ddim", steps=5).invert(x0)


@pytest.mark.parametrize("solver", ["ddim", "unipc"])
def test_v_prediction_with_zero_terminal_snr_round_trips(solver):
    schedule = SCHEDULE.rescale_zero_terminal_snr()  # the first level is pure noise (alpha = 0)
    model = GaussianDenoiser(schedule, prediction="v_prediction")
    sampler = fastdiff.Sampler(model, schedule, solver=solver, steps=20, prediction="v_prediction")
    x0 = gaussian_data()
    assert rel(sampler.sample(noise=sampler.invert(x0)), x0) < 1e-5
