"""Grids that end above the data: every solver takes them, and returns data units x_t / a_t.

Expectations are independent closed forms: the exact probability-flow ODE solution of Gaussian
data at the final level, the marginal of the process there, and k-diffusion's Heun loop.
"""
import math

import pytest
import torch

from fastdiff import SOLVERS, Sampler, Schedule
from fastdiff.grids import spaced_timesteps
from gaussian_model import FlowGaussianDenoiser, GaussianDenoiser, exact_endpoint

MU, S = 0.7, 0.5
VP = Schedule.linear()
DETERMINISTIC = ["ddim", "euler", "heun", "dpmpp_2m", "unipc"]
STOCHASTIC = ["ddpm", "euler_ancestral", "dpmpp_2m_sde"]
SIGMA_END = 1.0  # VE sigma of the final level: abar = 0.5, so x_t and x_t / alpha_t differ by 1.41x


def ve_sigmas(steps, end=SIGMA_END):
    """Karras sigmas from the schedule's sigma_max down to `end`, as explicit [N+1] sigmas."""
    return torch.cat([torch.linspace(VP.sigma_max ** (1 / 7), end ** (1 / 7), steps) ** 7, torch.tensor([end])])


def heun_textbook(model, sigmas, x):
    """k-diffusion's sample_heun (no churn) on the eps-model, VE state x = x_t / alpha_t."""
    def denoise(x, s):
        alpha = 1 / math.sqrt(1 + s * s)
        t = VP.t_at(torch.tensor(s)).expand(x.shape[0])
        return x - s * model(alpha * x, t).double()

    for s, s_to in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        d = (x - denoise(x, s)) / s
        y = x + (s_to - s) * d
        x = y if s_to == 0 else x + (s_to - s) * (d + (y - denoise(y, s_to)) / s_to) / 2
    return x


def test_heun_on_explicit_sigmas_ending_above_zero_is_k_diffusions():
    # the peer sweep's reproducer (IndexError in build_heun): the last step is a normal Heun step
    model = GaussianDenoiser(VP).double()
    sigmas = torch.tensor([10.0, 1.0, 0.1], dtype=torch.float64)
    noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sampler = Sampler(model, VP, solver="heun", sigmas=sigmas, dtype=torch.float64)
    got = sampler.sample(noise=noise)
    torch.testing.assert_close(got.double(), heun_textbook(model, sigmas, noise * 10.0), rtol=1e-5, atol=1e-5)
    assert sampler.num_model_evals == 4


@pytest.mark.parametrize("grid", [dict(final_alpha_cumprod=0.99), dict(sigmas="karras", final_alpha_cumprod=0.99995),
                                  dict(sigmas=torch.tensor([10.0, 1.0, 0.1]))],
                         ids=["final-abar", "karras", "explicit"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_every_solver_takes_a_grid_ending_above_zero(solver, grid):
    steps = {} if "sigmas" in grid and not isinstance(grid["sigmas"], str) else dict(steps=6)
    x = Sampler(GaussianDenoiser(VP), VP, solver=solver, **steps, **grid).sample(shape=(2, 3), seeds=[0, 1])
    assert torch.isfinite(x).all()


def test_a_final_level_noisier_than_the_last_step_is_refused():
    # a karras grid ends at sigma_min (alphas_cumprod 0.9999 here): 0.99 would make the last step add noise
    with pytest.raises(ValueError, match="final_alpha_cumprod=0.99 is noisier"):
        Sampler(GaussianDenoiser(VP), VP, solver="heun", steps=6, sigmas="karras", final_alpha_cumprod=0.99)


@pytest.mark.parametrize("solver", DETERMINISTIC)
def test_deterministic_solvers_end_in_data_units(solver):
    steps = 60
    sampler = Sampler(GaussianDenoiser(VP, MU, S), VP, solver=solver, sigmas=ve_sigmas(steps), dtype=torch.float64)
    noise = torch.randn(256, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = sampler.sample(noise=noise)
    abar0, abar_end = float(sampler.grid.abar[0]), 1 / (1 + SIGMA_END**2)
    x_T = noise * sampler.init_noise_sigma * (math.sqrt(abar0) if sampler.table.space == "ve" else 1.0)
    # exact ODE solution at the final level (VP x_t), then in data units
    u = (x_T - math.sqrt(abar0) * MU) / math.sqrt(abar0 * S * S + 1 - abar0)
    x_end = math.sqrt(abar_end) * MU + math.sqrt(abar_end * S * S + 1 - abar_end) * u
    torch.testing.assert_close(x.double(), x_end / math.sqrt(abar_end), rtol=0, atol=0.03)
    # final_units="model": the VP state x_t itself (what diffusers' DDIM/DPM/UniPC return)
    model_units = Sampler(GaussianDenoiser(VP, MU, S), VP, solver=solver, sigmas=ve_sigmas(steps),
                          dtype=torch.float64, final_units="model").sample(noise=noise)
    torch.testing.assert_close(model_units.double(), x.double() * math.sqrt(abar_end), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("solver", STOCHASTIC)
def test_stochastic_solvers_end_in_data_units(solver):
    # data units at VE sigma 1: x_t / alpha = x0 + 1 * eps ~ N(0.7, 0.25 + 1); VP units would have mean 0.49
    sampler = Sampler(GaussianDenoiser(VP, MU, S), VP, solver=solver, sigmas=ve_sigmas(100))
    x = sampler.sample(shape=(400, 16), seeds=range(400)).double()
    assert abs(x.mean().item() - MU) < 0.04 and abs(x.std().item() - math.sqrt(S * S + SIGMA_END**2)) < 0.05, (
        x.mean(), x.std())


@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp_2m", "unipc", "ddim"])
def test_flow_solvers_end_in_data_units(solver):
    s_end, steps = 0.5, 60
    sigmas = torch.cat([torch.linspace(1.0, s_end, steps + 1)])
    model = FlowGaussianDenoiser(mu=MU, s=S)
    noise = torch.randn(256, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = Sampler(model, Schedule.flow_matching(), solver=solver, prediction="flow", sigmas=sigmas,
                dtype=torch.float64).sample(noise=noise)
    x_end = (1 - s_end) * MU + math.sqrt((1 - s_end) ** 2 * S * S + s_end**2) * noise  # u = x_1 at s = 1
    torch.testing.assert_close(x.double(), x_end / (1 - s_end), rtol=0, atol=0.02)


@pytest.mark.parametrize("T,steps,fix", [(1000, 61, 60), (1000, 103, 102), (100, 29, 28), (100, 97, 96)])
def test_trailing_overshoot_names_spacing_steps_and_a_count_that_works(T, steps, fix):
    with pytest.raises(ValueError, match=rf"spacing='trailing' with steps={steps} .* use steps={fix}"):
        spaced_timesteps(T, steps, "trailing")
    assert len(spaced_timesteps(T, fix, "trailing")) == fix


@pytest.mark.parametrize("name", ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_from_diffusers_names_the_trailing_overshoot(name):
    diffusers = pytest.importorskip("diffusers")
    scheduler = getattr(diffusers, name)(num_train_timesteps=100, timestep_spacing="trailing")
    with pytest.raises(ValueError, match=r"spacing='trailing' with steps=29 .* use steps=28"):
        Sampler.from_diffusers(scheduler, lambda x, t: x, steps=29)
