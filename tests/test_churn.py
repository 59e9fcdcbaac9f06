"""EDM's stochastic sampler (Karras et al. 2022, Algorithm 2: "churn") for euler and heun.

The reference below is written from the paper (as k-diffusion's sample_euler / sample_heun
do it) with the noise fastdiff draws: the re-heating of step i uses z(seed, r_i, STREAM_STEP),
r_i the table row of step i's first model call (StepTable.noise_ahead), i.e. i for euler and
2i for heun (two rows per step but the last).
"""
import math

import pytest
import torch

from fastdiff import Sampler, Schedule, rng
from fastdiff.rng import STREAM_INIT, STREAM_STEP
from gaussian_model import GaussianDenoiser

SCHEDULE = Schedule.linear()
SHAPE, SEEDS = (2, 3, 5), [4, 11, 2**45 + 1]


def edm_reference(model, prediction, sigmas, seeds, shape, solver, s_churn, s_tmin, s_tmax, s_noise):
    """Karras et al. 2022, Algorithm 2, in float64: heat to s_hat, then an Euler or Heun step from it."""
    def denoise(x, s):  # D(x; s) from a VP model at the timestep of VE level s
        a = 1 / math.sqrt(1 + s * s)
        out = model(a * x, torch.full((x.shape[0],), float(SCHEDULE.t_at(s)))).double()
        if prediction == "epsilon":
            return x - s * out
        return a * a * x - s * a * out  # v: D = alpha x_t - sigma v, x_t = alpha x

    N = len(sigmas) - 1
    x = rng.randn(seeds, 0, STREAM_INIT, shape).double() * sigmas[0]
    for i in range(N):
        s, s_to = sigmas[i], sigmas[i + 1]
        gamma = min(s_churn / N, math.sqrt(2) - 1) if s_tmin <= s <= s_tmax else 0.0
        s_hat = s * (gamma + 1)
        if gamma > 0:
            z = rng.randn(seeds, i if solver == "euler" else 2 * i, STREAM_STEP, shape).double()
            x = x + math.sqrt(s_hat**2 - s**2) * s_noise * z
        d = (x - denoise(x, s_hat)) / s_hat
        if solver == "euler" or s_to == 0:
            x = x + (s_to - s_hat) * d
        else:
            y = x + (s_to - s_hat) * d
            d_y = (y - denoise(y, s_to)) / s_to
            x = x + (s_to - s_hat) * (d + d_y) / 2
    return x


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


CASES = {
    "euler-karras": ("euler", "epsilon", dict(s_churn=4.0)),
    "euler-window-v": ("euler", "v_prediction", dict(s_churn=40.0, s_tmin=0.2, s_tmax=5.0, s_noise=1.007)),
    "heun-karras": ("heun", "epsilon", dict(s_churn=3.0)),
    "heun-window-v": ("heun", "v_prediction", dict(s_churn=30.0, s_tmin=0.5, s_tmax=10.0, s_noise=0.95)),
}


@pytest.mark.parametrize("case", CASES)
def test_churn_equals_edm_algorithm_2_with_the_same_noise(case):
    solver, prediction, churn = CASES[case]
    model = GaussianDenoiser(SCHEDULE, prediction=prediction)
    sampler = Sampler(model, SCHEDULE, solver=solver, steps=7, sigmas="karras", prediction=prediction, **churn)
    got = sampler.sample(shape=(len(SEEDS), *SHAPE), seeds=SEEDS)
    sigmas = torch.cat([sampler.grid.sigma, sampler.grid.sigma_to[-1:]]).tolist()
    options = {**dict(s_tmin=0.0, s_tmax=math.inf, s_noise=1.0), **churn}  # the Sampler's defaults
    want = edm_reference(model, prediction, sigmas, SEEDS, SHAPE, solver, **options)
    assert rel_err(got, want) < 1e-5
    plain = Sampler(model, SCHEDULE, solver=solver, steps=7, sigmas="karras", prediction=prediction)
    assert rel_err(got, plain.sample(shape=(len(SEEDS), *SHAPE), seeds=SEEDS)) > 1e-3  # churn did something
    if "s_tmin" in churn:  # the window leaves some steps unheated, at the grid's own timesteps
        heated = [churn["s_tmin"] <= s <= churn["s_tmax"] for s in sigmas[:-1]]
        assert any(heated) and not all(heated)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_fused_kernel_equals_torch_with_churn(solver, kernel_device):
    outs = []
    for backend in ("triton", "torch"):
        sampler = Sampler(GaussianDenoiser(SCHEDULE).to(kernel_device), SCHEDULE, solver=solver, steps=5,
                          s_churn=10.0, s_tmin=0.1, s_tmax=20.0, backend=backend, device=kernel_device)
        outs.append(sampler.sample(shape=(3, 4, 9), seeds=[1, 2, 3]).cpu())
    assert rel_err(*outs) < 1e-5


@pytest.mark.parametrize("kwargs,match", [
    (dict(s_churn=-1.0), "s_churn"), (dict(s_churn=math.nan), "s_churn"), (dict(s_churn=math.inf), "s_churn"),
    (dict(s_churn=1.0, s_tmin=2.0, s_tmax=1.0), "s_tmin and s_tmax"), (dict(s_churn=1.0, s_tmin=-1.0), "s_tmin"),
    (dict(s_churn=1.0, s_noise=-0.5), "s_noise"), (dict(s_churn=1.0, churn_variant="k"), "churn_variant"),
    (dict(solver="dpmpp_2m", s_churn=1.0), "s_churn=1.0 is not an option of solver 'dpmpp_2m'"),
    (dict(solver="heun", s_churn=1.0, churn_variant="diffusers"), "churn_variant='diffusers' is not an option"),
])
def test_bad_churn_options_are_refused_by_name(kwargs, match):
    kwargs = {"solver": "euler", **kwargs}
    with pytest.raises(ValueError, match=match):
        Sampler(GaussianDenoiser(SCHEDULE), SCHEDULE, steps=5, **kwargs)


def test_churn_on_a_flow_schedule_is_refused():
    with pytest.raises(ValueError, match="s_churn re-heats in VE sigma units.*flow-matching"):
        Sampler(lambda x, t: x, Schedule.flow_matching(), solver="euler", prediction="flow", steps=5, s_churn=1.0)
