"""Sampler.from_diffusers computes what diffusers' own loop computes, scheduler by scheduler.

The model is the exact denoiser of Gaussian data N(MU, S^2) (deterministic, cheap), so any
difference is the sampler's. diffusers' loop is its documented one:
x = noise * init_noise_sigma; for t: scale_model_input -> model -> step.
Stochastic schedulers are checked twice: with diffusers' noise replaced by fastdiff's
counter-based noise (then the results must be equal), and by distribution over many draws.
"""
import itertools
import json
import math
import random

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fastdiff import Sampler, rng  # noqa: E402
from fastdiff.rng import STREAM_STEP  # noqa: E402
from conv_model import TinyConvNet  # noqa: E402
from gaussian_model import GaussianDenoiser  # noqa: E402

# diffusers' own deprecation noise (numpy __array__ copy=, deprecated algorithm types)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*",
                                        "ignore::FutureWarning:diffusers.*")
MU, S = 0.7, 0.5
RTOL = 2e-4
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def diffusers_loop(scheduler, model, noise: torch.Tensor, steps: int, **step_kw) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, **step_kw).prev_sample
    return x


def make(name: str, config: dict):
    scheduler = getattr(diffusers, name)(**config)
    return scheduler, GaussianDenoiser(scheduler.alphas_cumprod, MU, S, scheduler.config.prediction_type)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(want).all() and torch.isfinite(got).all()
    return float((got - want).abs().max() / want.abs().max())


def fastdiff_noise(monkeypatch, module: str, seeds):
    """Replace diffusers' per-step torch noise in `module` by fastdiff's (seed, step) noise."""
    step = [0]

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        z = rng.randn(torch.as_tensor(seeds), step[0], STREAM_STEP, tuple(shape[1:]))
        step[0] += 1
        return z.to(dtype or torch.float32)

    monkeypatch.setattr(f"diffusers.schedulers.{module}.randn_tensor", randn_tensor)


# (scheduler, config, steps, step() keywords)
DETERMINISTIC = {
    "ddim-default-clip-leading": ("DDIMScheduler", {}, 10, {}),
    "ddim-trailing-stride-v": ("DDIMScheduler", dict(timestep_spacing="trailing", prediction_type="v_prediction",
                                                      clip_sample=False), 7, {}),
    "ddim-linspace-sample-alpha": ("DDIMScheduler", dict(timestep_spacing="linspace", prediction_type="sample",
                                                          set_alpha_to_one=False), 9, {}),
    "ddim-sd-offset": ("DDIMScheduler", dict(SD_BETAS, steps_offset=1, clip_sample=False,
                                             set_alpha_to_one=False), 12, {}),
    "ddim-cosine-threshold": ("DDIMScheduler", dict(beta_schedule="squaredcos_cap_v2", thresholding=True,
                                                    dynamic_thresholding_ratio=0.9, sample_max_value=1.5), 8, {}),
    "ddim-zero-snr-v": ("DDIMScheduler", dict(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                              timestep_spacing="trailing", clip_sample=False), 8, {}),
    "ddim-trained-betas": ("DDIMScheduler", dict(num_train_timesteps=200, clip_sample_range=1.2,
                                                 trained_betas=torch.linspace(1e-4, 0.05, 200).tolist()), 6, {}),
    "ddim-clipped-output-noclip": ("DDIMScheduler", dict(clip_sample=False), 6, dict(use_clipped_model_output=True)),
    "ddim-clipped-output-clip": ("DDIMScheduler", dict(clip_sample=True, clip_sample_range=0.8), 6,
                                 dict(use_clipped_model_output=True)),
    "ddim-clipped-output-threshold": ("DDIMScheduler", dict(clip_sample=False, thresholding=True,
                                                            dynamic_thresholding_ratio=0.9, sample_max_value=1.2),
                                      8, dict(use_clipped_model_output=True)),
    "euler-linspace-fractional": ("EulerDiscreteScheduler", {}, 9, {}),
    "euler-sd-leading-v": ("EulerDiscreteScheduler", dict(SD_BETAS, timestep_spacing="leading", steps_offset=1,
                                                          prediction_type="v_prediction"), 12, {}),
    "euler-karras-trailing": ("EulerDiscreteScheduler", dict(use_karras_sigmas=True, timestep_spacing="trailing"),
                              10, {}),
    "euler-exponential-sample": ("EulerDiscreteScheduler", dict(use_exponential_sigmas=True,
                                                                prediction_type="sample"), 8, {}),
    "euler-loglinear-sigma-min": ("EulerDiscreteScheduler", dict(interpolation_type="log_linear",
                                                                 final_sigmas_type="sigma_min"), 10, {}),
    "euler-zero-snr-v": ("EulerDiscreteScheduler", dict(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                                        timestep_spacing="trailing"), 10, {}),
    "euler-beta-sigmas": ("EulerDiscreteScheduler", dict(use_beta_sigmas=True), 8, {}),
    "heun-default": ("HeunDiscreteScheduler", {}, 8, {}),
    "heun-exp-betas": ("HeunDiscreteScheduler", dict(beta_schedule="exp"), 6, {}),
    "heun-karras-v-clip": ("HeunDiscreteScheduler", dict(use_karras_sigmas=True, prediction_type="v_prediction",
                                                         clip_sample=True), 8, {}),
    "heun-leading-sample": ("HeunDiscreteScheduler", dict(timestep_spacing="leading", steps_offset=1,
                                                          prediction_type="sample"), 6, {}),
    "dpm-default": ("DPMSolverMultistepScheduler", {}, 10, {}),
    "dpm-sd-karras-20": ("DPMSolverMultistepScheduler", dict(SD_BETAS, use_karras_sigmas=True), 20, {}),
    "dpm-order1": ("DPMSolverMultistepScheduler", dict(solver_order=1), 10, {}),
    "dpm-no-lof-sigma-min": ("DPMSolverMultistepScheduler", dict(lower_order_final=False,
                                                                 final_sigmas_type="sigma_min"), 8, {}),
    "dpm-lof-sigma-min-16": ("DPMSolverMultistepScheduler", dict(final_sigmas_type="sigma_min"), 16, {}),
    "dpm-zero-snr-v-trailing": ("DPMSolverMultistepScheduler", dict(rescale_betas_zero_snr=True,
                                                                    prediction_type="v_prediction",
                                                                    timestep_spacing="trailing"), 10, {}),
    "dpm-threshold-sample": ("DPMSolverMultistepScheduler", dict(thresholding=True, prediction_type="sample",
                                                                 dynamic_thresholding_ratio=0.9,
                                                                 sample_max_value=1.5), 10, {}),
    "dpm-karras-sigma-min-zero-step": ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True,
                                                                           final_sigmas_type="sigma_min"), 20, {}),
    "dpm-lu-lambdas": ("DPMSolverMultistepScheduler", dict(use_lu_lambdas=True), 12, {}),
    "dpm-lambda-min-clipped": ("DPMSolverMultistepScheduler", dict(SD_BETAS, lambda_min_clipped=-3.0,
                                                                   final_sigmas_type="sigma_min"), 10, {}),
    "unipc-default": ("UniPCMultistepScheduler", {}, 10, {}),
    "unipc-karras-v-20": ("UniPCMultistepScheduler", dict(use_karras_sigmas=True, prediction_type="v_prediction"),
                          20, {}),
    "unipc-order1": ("UniPCMultistepScheduler", dict(solver_order=1), 10, {}),
    "unipc-no-lof-sigma-min": ("UniPCMultistepScheduler", dict(lower_order_final=False,
                                                               final_sigmas_type="sigma_min"), 10, {}),
    "unipc-leading-threshold": ("UniPCMultistepScheduler", dict(timestep_spacing="leading", steps_offset=1,
                                                                thresholding=True, sample_max_value=1.5), 9, {}),
    # PLMS (skip_prk_steps) and LMS: history pushes of raw outputs / derivatives, not of D
    "pndm-sd-plms-25": ("PNDMScheduler", dict(SD_BETAS, skip_prk_steps=True, steps_offset=1), 25, {}),
    "pndm-plms-1": ("PNDMScheduler", dict(skip_prk_steps=True), 1, {}),
    "pndm-plms-2": ("PNDMScheduler", dict(skip_prk_steps=True), 2, {}),
    "pndm-plms-3-v": ("PNDMScheduler", dict(skip_prk_steps=True, prediction_type="v_prediction"), 3, {}),
    "pndm-plms-trailing-alpha-one-60": ("PNDMScheduler", dict(skip_prk_steps=True, timestep_spacing="trailing",
                                                              set_alpha_to_one=True), 50, {}),
    "pndm-plms-trailing-v-cosine": ("PNDMScheduler", dict(skip_prk_steps=True, beta_schedule="squaredcos_cap_v2",
                                                          prediction_type="v_prediction", timestep_spacing="trailing"),
                                    10, {}),
    "lms-default": ("LMSDiscreteScheduler", {}, 10, {}),
    "lms-sd-leading-v-60": ("LMSDiscreteScheduler", dict(SD_BETAS, timestep_spacing="leading", steps_offset=1,
                                                         prediction_type="v_prediction"), 60, {}),
    "lms-karras-sample": ("LMSDiscreteScheduler", dict(use_karras_sigmas=True, prediction_type="sample"), 12, {}),
    "lms-exponential-order2": ("LMSDiscreteScheduler", dict(use_exponential_sigmas=True), 9, dict(order=2)),
    "lms-trailing-order3-1": ("LMSDiscreteScheduler", dict(timestep_spacing="trailing"), 1, dict(order=3)),
    "lms-beta-order1": ("LMSDiscreteScheduler", dict(use_beta_sigmas=True), 7, dict(order=1)),
}


@pytest.mark.parametrize("case", DETERMINISTIC)
def test_matches_diffusers_loop(case):
    name, config, steps, step_kw = DETERMINISTIC[case]
    scheduler, model = make(name, config)
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    before = None if scheduler.timesteps is None else scheduler.timesteps.clone()  # PNDM: None before set_timesteps
    sampler = Sampler.from_diffusers(scheduler, model, steps=steps, **step_kw)
    assert (before is None and scheduler.timesteps is None) or torch.equal(scheduler.timesteps, before)  # left alone
    want = diffusers_loop(scheduler, model, noise, steps, **step_kw)
    assert rel_err(sampler.sample(noise=noise), want) < RTOL
    assert torch.equal(sampler.timesteps.float(), scheduler.timesteps.float())  # what the model saw


# (scheduler, config, steps, step() keywords, diffusers module that draws the step noise)
STOCHASTIC = {
    "ddpm-default-clip": ("DDPMScheduler", {}, 20, {}, "scheduling_ddpm"),
    "ddpm-trailing-v-large": ("DDPMScheduler", dict(timestep_spacing="trailing", prediction_type="v_prediction",
                                                    variance_type="fixed_large", clip_sample=False), 13, {},
                              "scheduling_ddpm"),
    "ddpm-linspace-threshold": ("DDPMScheduler", dict(timestep_spacing="linspace", thresholding=True,
                                                      sample_max_value=1.5), 13, {}, "scheduling_ddpm"),
    "ddpm-small-log-sigmoid": ("DDPMScheduler", dict(variance_type="fixed_small_log", beta_schedule="sigmoid",
                                                     clip_sample=False), 10, {}, "scheduling_ddpm"),
    "ddim-eta": ("DDIMScheduler", {}, 10, dict(eta=0.7), "scheduling_ddim"),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}, 10, {}, "scheduling_euler_ancestral_discrete"),
    "euler-ancestral-sd-leading-v": ("EulerAncestralDiscreteScheduler", dict(SD_BETAS, timestep_spacing="leading",
                                                                             steps_offset=1,
                                                                             prediction_type="v_prediction"),
                                     10, {}, "scheduling_euler_ancestral_discrete"),
    # diffusers' churn (model before the re-heating; see fastdiff/solvers/euler.py): every step re-heats
    "euler-churn": ("EulerDiscreteScheduler", {}, 10, dict(s_churn=3.0, s_noise=1.003), "scheduling_euler_discrete"),
    "euler-churn-karras-v": ("EulerDiscreteScheduler", dict(use_karras_sigmas=True, prediction_type="v_prediction"),
                             8, dict(s_churn=20.0), "scheduling_euler_discrete"),
    "euler-churn-loglinear-sample": ("EulerDiscreteScheduler", dict(interpolation_type="log_linear",
                                                                    prediction_type="sample"),
                                     9, dict(s_churn=1.0), "scheduling_euler_discrete"),
    "sde-dpm-karras": ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True),
                       10, {}, "scheduling_dpmsolver_multistep"),
    "sde-dpm-order1": ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", solver_order=1), 10, {},
                       "scheduling_dpmsolver_multistep"),
}


@pytest.mark.parametrize("case", STOCHASTIC)
def test_stochastic_matches_diffusers_given_the_same_noise(case, monkeypatch):
    name, config, steps, step_kw, module = STOCHASTIC[case]
    scheduler, model = make(name, config)
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    seeds = [5, 17, 2**40 + 3]
    fastdiff_noise(monkeypatch, module, seeds)
    want = diffusers_loop(scheduler, model, noise, steps, **step_kw)
    got = Sampler.from_diffusers(scheduler, model, steps=steps, **step_kw).sample(noise=noise, seeds=seeds)
    assert rel_err(got, want) < RTOL


def test_euler_churn_inside_a_sigma_window_matches_diffusers(monkeypatch):
    """s_tmin/s_tmax leave some steps unheated: diffusers draws no noise there, fastdiff's row
    z of step i is keyed by i (diffusers' variant: the row's own counter)."""
    scheduler, model = make("EulerDiscreteScheduler", dict(timestep_spacing="trailing"))
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    seeds = [3, 99, 2**50]

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        return rng.randn(torch.as_tensor(seeds), scheduler.step_index, STREAM_STEP, tuple(shape[1:])).to(dtype)

    monkeypatch.setattr("diffusers.schedulers.scheduling_euler_discrete.randn_tensor", randn_tensor)
    kw = dict(s_churn=5.0, s_tmin=0.3, s_tmax=4.0, s_noise=0.9)
    want = diffusers_loop(scheduler, model, noise, 12, **kw)
    got = Sampler.from_diffusers(scheduler, model, steps=12, **kw).sample(noise=noise, seeds=seeds)
    assert rel_err(got, want) < RTOL
    plain = diffusers_loop(scheduler, model, noise, 12)
    assert rel_err(got, plain) > 1e-2  # the churn changed the result: the check can fail


# (scheduler, config, steps, step() keywords): draws of 1-D samples, diffusers' noise vs fastdiff's
DISTRIBUTIONS = {
    "ddpm": ("DDPMScheduler", dict(clip_sample=False), 50, {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}, 30, {}),
    "sde-dpm": ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++"), 20, {}),
    "ddim-eta1": ("DDIMScheduler", dict(clip_sample=False), 20, dict(eta=1.0)),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", DISTRIBUTIONS)
def test_stochastic_sample_distribution_matches_diffusers(case):
    from scipy.stats import ks_2samp

    name, config, steps, step_kw = DISTRIBUTIONS[case]
    scheduler, model = make(name, config)
    n = 4000
    g = torch.Generator().manual_seed(2)
    want = diffusers_loop(scheduler, model, torch.randn(n, 1, generator=g), steps, generator=g, **step_kw).flatten()
    sampler = Sampler.from_diffusers(scheduler, model, steps=steps, **step_kw)
    got = sampler.sample(noise=torch.randn(n, 1, generator=g), seeds=range(10**6, 10**6 + n)).flatten()
    se_mean = math.sqrt((want.var() + got.var()) / n)
    se_std = math.sqrt((want.var() + got.var()) / (2 * n))  # sd of a sample std ~ sigma / sqrt(2n)
    assert abs(float(got.mean() - want.mean())) < 4 * se_mean
    assert abs(float(got.std() - want.std())) < 4 * se_std
    assert ks_2samp(got.numpy(), want.numpy()).pvalue > 1e-4


UNSUPPORTED = [
    ("DDPMScheduler", dict(variance_type="learned_range"), {}, "variance_type"),
    ("EulerDiscreteScheduler", dict(timestep_type="continuous", prediction_type="v_prediction"), {}, "timestep_type"),
    ("EulerAncestralDiscreteScheduler", dict(prediction_type="sample"), {}, "prediction_type"),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), {},
     "algorithm_type"),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"), {},
     "algorithm_type"),
    ("DPMSolverMultistepScheduler", dict(solver_order=3), {}, "solver_order"),
    ("DPMSolverMultistepScheduler", dict(solver_type="heun"), {}, "solver_type"),
    ("DPMSolverMultistepScheduler", dict(variance_type="learned_range"), {}, "variance_type"),
    ("DPMSolverMultistepScheduler", dict(euler_at_final=True, final_sigmas_type="sigma_min"), {}, "euler_at_final"),
    ("UniPCMultistepScheduler", dict(solver_type="bh1"), {}, "solver_type"),
    ("UniPCMultistepScheduler", dict(solver_order=3), {}, "solver_order"),
    ("UniPCMultistepScheduler", dict(predict_x0=False), {}, "predict_x0"),
    ("UniPCMultistepScheduler", dict(disable_corrector=[0]), {}, "disable_corrector"),
    ("UniPCMultistepScheduler", dict(lower_order_final=False), {}, "lower_order_final"),
    ("PNDMScheduler", dict(skip_prk_steps=True, timestep_spacing="linspace"), {}, "timestep_spacing"),
    ("DEISMultistepScheduler", {}, {}, "DEISMultistepScheduler"),
]


@pytest.mark.parametrize("name,config,step_kw,option", UNSUPPORTED, ids=[u[3] + "-" + u[0] for u in UNSUPPORTED])
def test_unsupported_options_raise_naming_the_option(name, config, step_kw, option):
    scheduler = getattr(diffusers, name)(**config)
    with pytest.raises(NotImplementedError, match=option):
        Sampler.from_diffusers(scheduler, lambda x, t: x, steps=20, **step_kw)


def prk_sweep(count: int, seed: int = 12) -> list[tuple[dict, int, str]]:
    """PNDMScheduler(skip_prk_steps=False) configurations (config, steps, net): every combination
    of spacing x steps_offset x set_alpha_to_one x prediction once, each with a random step count
    in 4..60 (4, 5 and 60 included), T = 1000 or 100, linear or scaled_linear betas, and the net."""
    rnd = random.Random(seed)
    combos = list(itertools.product(("leading", "linspace", "trailing"), (0, 1), (False, True),
                                    ("epsilon", "v_prediction")))
    rnd.shuffle(combos)
    steps = [4, 5, 60] + [rnd.randint(4, 60) for _ in range(count)]
    cases = []
    for i, (spacing, offset, alpha_one, prediction) in enumerate(combos[:count]):
        T = rnd.choice((1000, 100))
        N = steps[i]
        while spacing == "trailing" and np_trailing_overshoots(T, N):  # refused by name (tested elsewhere)
            N += 1
        config = dict(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset, set_alpha_to_one=alpha_one,
                      prediction_type=prediction, beta_schedule=rnd.choice(("linear", "scaled_linear")))
        cases.append((config, N, "gaussian" if i % 2 == 0 else "conv"))
    return cases


def np_trailing_overshoots(T: int, N: int) -> bool:
    import numpy as np

    return np.arange(T, 0, -T / N).size != N


# The cosine schedule (squaredcos_cap_v2) is left out of the sweep: from a grid that starts at
# t = T - 1 (abar = 2.4e-9 at T = 1000, 2.4e-7 at T = 100) each Runge-Kutta sub-step multiplies
# float32 rounding by sqrt(a'/a) ~ 30, and diffusers' own float32 loop then differs from its
# float64 loop by up to 26% (fastdiff's float32 by up to 58%); "leading" spacing stays below T - 1.
PRK_FIXED = [(dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"), 9, "gaussian"),
             (dict(SD_BETAS, steps_offset=1), 50, "gaussian"), ({}, 4, "conv")]


@pytest.mark.parametrize("config,steps,net", prk_sweep(24) + PRK_FIXED,
                         ids=lambda v: "-".join(f"{x}" for x in v.values()) if isinstance(v, dict) else str(v))
def test_pndm_runge_kutta_warmup_matches_diffusers_loop(config, steps, net):
    """skip_prk_steps=False (PNDMScheduler's default): 3 Runge-Kutta steps of 4 evaluations, then PLMS."""
    scheduler = diffusers.PNDMScheduler(**config)
    model = TinyConvNet() if net == "conv" else GaussianDenoiser(scheduler.alphas_cumprod, MU, S,
                                                                 scheduler.config.prediction_type)
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(steps))
    with torch.no_grad():
        sampler = Sampler.from_diffusers(scheduler, model, steps=steps)
        got = sampler.sample(noise=noise)
        want = diffusers_loop(scheduler, model, noise, steps)
    assert rel_err(got, want) < RTOL
    assert torch.equal(sampler.timesteps.float(), scheduler.timesteps.float())  # what the model saw
    assert sampler.num_model_evals == steps + 9  # 3 steps of 4 evaluations


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_pndm_runge_kutta_warmup_needs_4_steps(steps):
    scheduler = diffusers.PNDMScheduler()
    with pytest.raises(ValueError):  # diffusers' own set_timesteps fails inside numpy
        scheduler.set_timesteps(steps)
    with pytest.raises(ValueError, match=f"skip_prk_steps=False needs num_inference_steps >= 4.*got steps={steps}"):
        Sampler.from_diffusers(scheduler, lambda x, t: x, steps=steps)


# the same mappings on a random conv net (no closed form): scheduler, config, steps, step() keywords
CONV = {
    "pndm-sd-plms": ("PNDMScheduler", dict(SD_BETAS, skip_prk_steps=True, steps_offset=1), 20, {}),
    "pndm-plms-v-4": ("PNDMScheduler", dict(skip_prk_steps=True, prediction_type="v_prediction"), 4, {}),
    "lms-default": ("LMSDiscreteScheduler", {}, 15, {}),
    "lms-karras-v-order3": ("LMSDiscreteScheduler", dict(use_karras_sigmas=True, prediction_type="v_prediction"), 10,
                            dict(order=3)),
    "ddim-zero-snr-T100": ("DDIMScheduler", dict(num_train_timesteps=100, prediction_type="sample",
                                                 timestep_spacing="trailing", steps_offset=1, set_alpha_to_one=False,
                                                 rescale_betas_zero_snr=True, clip_sample=False), 48, {}),
}


@pytest.mark.parametrize("case", CONV)
def test_matches_diffusers_loop_on_a_conv_net(case):
    name, config, steps, step_kw = CONV[case]
    scheduler = getattr(diffusers, name)(**config)
    model = TinyConvNet()
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = Sampler.from_diffusers(scheduler, model, steps=steps, **step_kw).sample(noise=noise)
        want = diffusers_loop(scheduler, model, noise, steps, **step_kw)
    assert rel_err(got, want) < RTOL


def test_schedule_is_the_schedulers_own_float32_alphas_cumprod():
    # the peer sweep's reproducer: a float64 zero-terminal-SNR rescale differs from diffusers' float32 one
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=100, rescale_betas_zero_snr=True, set_alpha_to_one=False)
    sampler = Sampler.from_diffusers(scheduler, lambda x, t: x, steps=48, timestep_spacing="trailing", steps_offset=1,
                                     prediction_type="sample")
    torch.testing.assert_close(sampler.schedule.alphas_cumprod, scheduler.alphas_cumprod.double(), rtol=1e-12,
                               atol=1e-15)


def test_unknown_future_config_field_is_refused(monkeypatch):
    # a config field the adapter does not know must hold its default, or we refuse it
    from fastdiff.integrations import diffusers as adapter

    scheduler = diffusers.DDIMScheduler(clip_sample=False)  # not the default
    monkeypatch.setitem(adapter.TRANSLATORS, "DDIMScheduler", lambda *args: ({}, ()))  # handles nothing
    with pytest.raises(NotImplementedError, match="clip_sample"):
        Sampler.from_diffusers(scheduler, lambda x, t: x, steps=10)


def test_config_dict_and_overrides():
    scheduler, _ = make("DPMSolverMultistepScheduler", {})
    model = GaussianDenoiser(scheduler.alphas_cumprod, MU, S, "v_prediction")
    # a config dict plus a config override (as from_config(**kwargs)) plus runtime options
    config = json.loads(scheduler.to_json_string())  # as scheduler_config.json, with _class_name
    sampler = Sampler.from_diffusers(config, model, steps=8, prediction_type="v_prediction",
                                     backend="torch", graph=False)
    assert sampler.prediction == "v_prediction" and sampler.backend == "torch"
    noise = torch.randn(2, 1, 3, 3)
    want = diffusers_loop(diffusers.DPMSolverMultistepScheduler(prediction_type="v_prediction"), model, noise, 8)
    assert rel_err(sampler.sample(noise=noise), want) < RTOL
    with pytest.raises(ValueError, match="solver"):
        Sampler.from_diffusers(scheduler, model, steps=8, solver="ddim")  # the config decides the solver
    with pytest.raises(ValueError, match="eta"):
        Sampler.from_diffusers(scheduler, model, steps=8, eta=0.5)  # DPM's step() takes no eta
    with pytest.raises(ValueError, match="_class_name"):
        Sampler.from_diffusers({"num_train_timesteps": 1000}, model, steps=8)
    for T in (-1, 0, 2.5):  # diffusers itself would fail inside torch.linspace, naming nothing
        with pytest.raises(ValueError, match=f"num_train_timesteps must be a positive integer, got {T}"):
            Sampler.from_diffusers({**config, "num_train_timesteps": T}, model, steps=8)
        with pytest.raises(ValueError, match=f"num_train_timesteps must be a positive integer, got {T}"):
            Sampler.from_diffusers(scheduler, model, steps=8, num_train_timesteps=T)
