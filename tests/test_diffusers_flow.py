"""Sampler.from_diffusers on flow-matching schedulers equals diffusers' own loop (float32, 2e-4).

FlowMatchEuler (shift, dynamic shifting with mu, shift_terminal, karras/exponential/beta
sigmas, stochastic_sampling), FlowMatchHeun, DPMSolverMultistep and UniPCMultistep with
use_flow_sigmas, on the exact Gaussian velocity and on a small random conv net; the stochastic
one with diffusers' noise replaced by fastdiff's for the same seeds.
"""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fastdiff import Sampler  # noqa: E402
from conv_model import TinyConvNet  # noqa: E402
from gaussian_model import FlowGaussianDenoiser  # noqa: E402
from test_diffusers_equivalence import fastdiff_noise, rel_err  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*", "ignore::FutureWarning:diffusers.*")
RTOL = 2e-4


def diffusers_loop(scheduler, model, noise, steps, mu=None):
    kw = {} if mu is None else {"mu": mu}
    scheduler.set_timesteps(steps, **kw)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)
    for t in scheduler.timesteps:
        x = scheduler.step(model(scale(x, t), t), t, x).prev_sample
    return x


def model_for(name, prediction):
    if name == "conv":
        return TinyConvNet()
    return FlowGaussianDenoiser(prediction={"flow_prediction": "flow"}.get(prediction, prediction))


E, H = "FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"
D, U = "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"
FLOW_DPM = dict(use_flow_sigmas=True, prediction_type="flow_prediction")
# (scheduler, config, steps, mu)
CASES = {
    "euler-default-1": (E, {}, 1, None),
    "euler-default-28": (E, {}, 28, None),
    "euler-shift3-7": (E, dict(shift=3.0), 7, None),
    "euler-dynamic-exp": (E, dict(use_dynamic_shifting=True), 20, 0.9),
    "euler-dynamic-linear": (E, dict(use_dynamic_shifting=True, time_shift_type="linear"), 12, 1.4),
    "euler-terminal": (E, dict(shift=3.0, shift_terminal=0.05), 15, None),
    "euler-karras": (E, dict(shift=2.0, use_karras_sigmas=True), 10, None),
    "euler-exponential-60": (E, dict(use_exponential_sigmas=True), 60, None),
    "euler-beta": (E, dict(shift=3.0, use_beta_sigmas=True), 9, None),
    "euler-T500": (E, dict(num_train_timesteps=500, shift=1.5), 33, None),
    "euler-stochastic": (E, dict(shift=3.0, stochastic_sampling=True), 8, None),
    "euler-stochastic-dynamic-1": (E, dict(use_dynamic_shifting=True, stochastic_sampling=True), 1, 0.5),
    "heun-default-2": (H, {}, 2, None),
    "heun-shift3-10": (H, dict(shift=3.0), 10, None),
    "heun-30": (H, dict(shift=1.7), 30, None),
    "dpm-flow-10": (D, FLOW_DPM, 10, None),
    "dpm-flow-shift-20": (D, dict(FLOW_DPM, flow_shift=3.0), 20, None),
    "dpm-flow-dynamic": (D, dict(FLOW_DPM, use_dynamic_shifting=True), 12, 0.7),
    "dpm-flow-order1": (D, dict(FLOW_DPM, solver_order=1), 8, None),
    "dpm-flow-epsilon": (D, dict(use_flow_sigmas=True, flow_shift=2.0), 10, None),
    "dpm-flow-sample-sigma-min": (D, dict(use_flow_sigmas=True, prediction_type="sample",
                                          final_sigmas_type="sigma_min"), 10, None),
    "dpm-flow-sde": (D, dict(FLOW_DPM, algorithm_type="sde-dpmsolver++"), 10, None),
    "unipc-flow-10": (U, FLOW_DPM, 10, None),
    "unipc-flow-shift-25": (U, dict(FLOW_DPM, flow_shift=3.0), 25, None),
    "unipc-flow-dynamic-terminal": (U, dict(FLOW_DPM, use_dynamic_shifting=True, shift_terminal=0.1), 12, 0.6),
    "unipc-flow-order1-1": (U, dict(FLOW_DPM, solver_order=1), 1, None),
    "unipc-flow-epsilon-40": (U, dict(use_flow_sigmas=True, flow_shift=3.0), 40, None),
    "unipc-flow-sample-sigma-min": (U, dict(use_flow_sigmas=True, prediction_type="sample",
                                            final_sigmas_type="sigma_min"), 9, None),
}


@pytest.mark.parametrize("net", ["gaussian", "conv"])
@pytest.mark.parametrize("case", CASES)
def test_matches_diffusers_loop(case, net, monkeypatch):
    name, config, steps, mu = CASES[case]
    scheduler = getattr(diffusers, name)(**config)
    model = model_for(net, scheduler.config.get("prediction_type", "flow_prediction"))
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    seeds = [11, 2**33 + 5]
    if config.get("algorithm_type", "").startswith("sde"):
        fastdiff_noise(monkeypatch, "scheduling_dpmsolver_multistep", seeds)
    if config.get("stochastic_sampling"):
        fastdiff_noise(monkeypatch, "scheduling_flow_match_euler_discrete", seeds)
    kw = {} if mu is None else {"mu": mu}
    with torch.no_grad():
        sampler = Sampler.from_diffusers(scheduler, model, steps=steps, **kw)
        want = diffusers_loop(scheduler, model, noise, steps, mu)
        got = sampler.sample(noise=noise, seeds=seeds)
    assert rel_err(got, want) < RTOL
    assert torch.equal(sampler.timesteps.float(), scheduler.timesteps.float())  # what the model saw


UNSUPPORTED = [
    (E, dict(invert_sigmas=True), {}, "invert_sigmas"),
    (D, dict(use_flow_sigmas=True, prediction_type="v_prediction"), {}, "v_prediction"),
    (D, dict(prediction_type="flow_prediction"), {}, "use_flow_sigmas"),
    (U, dict(prediction_type="flow_prediction"), {}, "use_flow_sigmas"),
]


@pytest.mark.parametrize("name,config,kw,option", UNSUPPORTED, ids=[u[3] + "-" + u[0] for u in UNSUPPORTED])
def test_unsupported_flow_options_raise_naming_the_option(name, config, kw, option):
    with pytest.raises(NotImplementedError, match=option):
        Sampler.from_diffusers(getattr(diffusers, name)(**config), lambda x, t: x, steps=10, **kw)


def test_mu_is_a_set_timesteps_keyword():
    with pytest.raises(ValueError, match="mu"):  # diffusers: mu must be passed with use_dynamic_shifting
        Sampler.from_diffusers(diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
                               lambda x, t: x, steps=10)
    with pytest.raises(ValueError, match="takes no 'mu'"):
        Sampler.from_diffusers(diffusers.DDIMScheduler(), lambda x, t: x, steps=10, mu=0.5)
