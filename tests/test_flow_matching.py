"""Flow matching (x_s = (1 - s) x_0 + s eps, velocity prediction) as one more affine process.

Against independent answers: diffusers' FlowMatchEulerDiscreteScheduler grid, and the exact
velocity of Gaussian data, whose probability-flow ODE endpoint is closed form.
"""
import math

import pytest
import torch

import fastdiff
from fastdiff import Sampler, Schedule
from gaussian_model import FlowGaussianDenoiser, flow_exact_endpoint
from reference_loop import plain_loop

X_T = torch.randn(256, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def endpoint_error(solver, steps, prediction="flow", **schedule_kw):
    schedule = Schedule.flow_matching(**schedule_kw)
    sampler = Sampler(FlowGaussianDenoiser(prediction=prediction), schedule, solver=solver, steps=steps,
                      prediction=prediction, dtype=torch.float64)
    x = sampler.sample(noise=X_T)
    s0 = float(sampler.grid.flow_sigma[0])
    return (x.double() - flow_exact_endpoint(X_T, s0)).abs().max().item()


# (expected global order, step counts it is measured at, bound on the error at the second) on the
# default (shifted linear) grid. heun's last Euler step to s = 0 costs O(s^2), so heun keeps its
# order until the grid's fixed last level (diffusers' twice-shifted sigma_min) floors the error;
# the multistep solvers reach theirs from ~40 steps: the first steps span large log-SNR
# intervals (lambda = -inf at s = 1).
ORDERS = {"euler": (1, 10, 20, 0.25), "ddim": (1, 10, 20, 0.25), "heun": (2, 10, 20, 0.01),
          "dpmpp_2m": (2, 40, 80, 0.04), "unipc": (2, 40, 80, 0.04),
          "lms": (2, 10, 20, 0.02)}  # lms (order 4) is held to 2: the floor above caps what 20 steps show


@pytest.mark.parametrize("schedule_kw", [dict(shift=1.0), dict(shift=3.0), dict(mu=0.8)], ids=["s1", "s3", "mu"])
@pytest.mark.parametrize("prediction", ["flow", "sample"])
@pytest.mark.parametrize("solver", ORDERS)
def test_deterministic_solvers_converge_at_their_order(solver, prediction, schedule_kw):
    expected, n1, n2, bound = ORDERS[solver]
    e1, e2 = (endpoint_error(solver, n, prediction, **schedule_kw) for n in (n1, n2))
    order = math.log2(e1 / e2)
    assert order > expected - 0.25, (e1, e2, order)
    assert e2 < bound, e2


# ancestral samplers carry a finite-step bias (the std is 0.47 at 100 steps for both): hence the counts
@pytest.mark.parametrize("solver,steps", [("euler_ancestral", 300), ("dpmpp_2m_sde", 150)])
def test_stochastic_solvers_reproduce_the_data_distribution(solver, steps):
    schedule = Schedule.flow_matching(shift=3.0)
    sampler = Sampler(FlowGaussianDenoiser(), schedule, solver=solver, steps=steps, prediction="flow")
    x = sampler.sample(shape=(500, 64), seeds=range(500)).double()
    assert abs(x.mean().item() - 0.7) < 0.02 and abs(x.std().item() - 0.5) < 0.03, (x.mean(), x.std())


diffusers = pytest.importorskip("diffusers")

GRIDS = [dict(), dict(shift=3.0), dict(use_dynamic_shifting=True, mu=0.7),
         dict(use_dynamic_shifting=True, mu=1.3, time_shift_type="linear"), dict(shift=3.0, shift_terminal=0.1),
         dict(shift=2.0, use_karras_sigmas=True), dict(use_exponential_sigmas=True, num_train_timesteps=500)]


@pytest.mark.parametrize("steps", [1, 7, 28])
@pytest.mark.parametrize("config", GRIDS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_default_grid_is_flow_match_eulers(config, steps):
    if steps == 1 and "shift_terminal" in config:
        with pytest.raises(ValueError, match="shift_terminal needs steps >= 2"):  # diffusers lists NaN
            Sampler(lambda x, t: x, Schedule.flow_matching(shift_terminal=0.1), solver="euler", steps=1,
                    prediction="flow")
        return
    config = dict(config)
    mu = config.pop("mu", None)
    sch = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    sch.set_timesteps(steps, mu=mu)
    kw = dict(num_train_timesteps=config.get("num_train_timesteps", 1000), shift=config.get("shift", 1.0), mu=mu,
              time_shift_type=config.get("time_shift_type", "exponential"),
              shift_terminal=config.get("shift_terminal"))
    sigmas = "karras" if config.get("use_karras_sigmas") else "exponential" if config.get("use_exponential_sigmas") \
        else None
    sampler = Sampler(lambda x, t: x, Schedule.flow_matching(**kw), solver="euler", steps=steps, prediction="flow",
                      sigmas=sigmas)
    torch.testing.assert_close(sampler.timesteps.float(), sch.timesteps, rtol=1e-6, atol=1e-4)
    levels = torch.cat([sampler.grid.flow_sigma, sampler.grid.flow_sigma_to[-1:]])
    torch.testing.assert_close(levels.float(), sch.sigmas, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp_2m", "unipc", "euler_ancestral", "dpmpp_2m_sde",
                                    "renoise", "lms"])
def test_triton_backend_equals_torch_on_flow_tables(solver, kernel_device):
    schedule = Schedule.flow_matching(shift=3.0)
    model = FlowGaussianDenoiser()
    outs = [Sampler(model, schedule, solver=solver, steps=5, prediction="flow", backend=b, device=kernel_device)
            .sample(shape=(3, 5, 7), seeds=[1, 2, 3]).cpu() for b in ("triton", "torch")]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    # and both equal the plain reference loop over the same table (float64)
    sampler = Sampler(model, schedule, solver=solver, steps=5, prediction="flow")
    ref = plain_loop(model.double(), sampler.table, [1, 2, 3], (5, 7), dtype=torch.float64)
    torch.testing.assert_close(outs[1].double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw,match", [
    (dict(solver="ddpm"), "ddpm"), (dict(solver="plms"), "plms"), (dict(spacing="leading"), "spacing"),
    (dict(corrector="langevin"), "corrector"),
    (dict(prediction="v_prediction"), "v_prediction"), (dict(prediction="epsilon"), "zero SNR"),
])
def test_flow_refusals_name_the_option(kw, match):
    kw = {"solver": "euler", "prediction": "flow", **kw}
    with pytest.raises(ValueError, match=match):
        Sampler(lambda x, t: x, Schedule.flow_matching(), steps=4, **kw)


def test_flow_prediction_needs_a_flow_schedule_and_schedule_options_are_checked():
    with pytest.raises(ValueError, match="flow"):
        Sampler(lambda x, t: x, Schedule.linear(), steps=4, prediction="flow")
    for kw, match in [(dict(shift=0.0), "shift"), (dict(shift=2.0, mu=0.5), "mu"),
                      (dict(time_shift_type="cubic"), "time_shift_type"), (dict(shift_terminal=1.5), "shift_terminal")]:
        with pytest.raises(ValueError, match=match):
            Schedule.flow_matching(**kw)


def test_add_noise_and_img2img_use_flow_units():
    schedule = Schedule.flow_matching(shift=3.0)
    g = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    t = torch.tensor([0.0, 250.0, 900.0])
    s = (t / 1000).reshape(-1, 1, 1)
    x_t = fastdiff.add_noise(x0, t, schedule, noise=noise, backend="torch")
    torch.testing.assert_close(x_t, (1 - s) * x0 + s * noise, rtol=1e-6, atol=1e-6)

    class FirstInput(torch.nn.Module):  # records what the model sees first; predicts v = 0
        def forward(self, x, t):
            self.__dict__.setdefault("seen", (x.clone(), t.clone()))
            return torch.zeros_like(x)

    model = FirstInput()
    sampler = Sampler(model, schedule, solver="dpmpp_2m", steps=10, prediction="flow")
    sampler.sample(noise=noise, init=x0, strength=0.5)
    x_in, t_in = model.seen
    s0 = float(t_in[0]) / 1000
    assert math.isclose(s0, float(sampler.grid.flow_sigma[5]), rel_tol=1e-6)
    torch.testing.assert_close(x_in, (1 - s0) * x0 + s0 * noise, rtol=1e-5, atol=1e-5)
