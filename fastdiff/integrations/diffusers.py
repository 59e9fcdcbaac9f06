"""diffusers interop: a Sampler equivalent to a diffusers scheduler.

    sampler = fastdiff.Sampler.from_diffusers(pipe.scheduler, pipe.unet, steps=25)

(Accelerated pipelines, `accelerate(pipe)`, live in fastdiff.integrations.pipelines.)

A scheduler maps to a solver (checked against diffusers 0.42.1):

    DDPMScheduler                     ddpm             DDIMScheduler          ddim (eta from step())
    EulerDiscreteScheduler            euler            HeunDiscreteScheduler  heun
    EulerAncestralDiscreteScheduler   euler_ancestral  UniPCMultistepScheduler  unipc (bh2)
    DPMSolverMultistepScheduler       dpmpp_2m (dpmsolver++) / dpmpp_2m_sde (sde-dpmsolver++)
    FlowMatchEulerDiscreteScheduler   euler (flow; stochastic_sampling: renoise)
    FlowMatchHeunDiscreteScheduler    heun (flow)
    PNDMScheduler                     plms (warmup from skip_prk_steps)  LMSDiscreteScheduler  lms (order from step())
DPMSolverMultistep and UniPCMultistep with use_flow_sigmas run on a flow-matching schedule too.

The grid is the scheduler's own: a fresh copy of it runs set_timesteps(N) and fastdiff walks
its timesteps (and, for sigma-based schedulers, its sigmas), so every spacing and sigma
option diffusers has (karras, exponential, beta, lu lambdas, final_sigmas_type, steps_offset,
lambda_min_clipped...) is reproduced exactly; DDIM keeps its t - T//N stride natively.
The math options map to Sampler options; any option fastdiff cannot reproduce raises
NotImplementedError naming it; we never silently give different images. The schedule is the
scheduler's own alphas_cumprod (float32, as its step() reads it), held in float64. diffusers is
imported lazily: the core never needs it.
"""
from __future__ import annotations

import inspect
import math

import torch

from ..grids import spaced_timesteps
from ..sampler import Sampler
from ..schedules import Schedule
from ..solvers.dpmpp import final_step_first_order
from ..solvers.plms import RUNGE_KUTTA_MIN_STEPS

# Sampler options that do not change what a scheduler computes; they pass through.
RUNTIME_OPTIONS = ("guidance_scale", "guidance_rescale", "guidance_interval", "classifier", "classifier_scale", "corrector",
                   "corrector_steps", "snr", "backend", "graph", "compile", "max_graphs", "device", "dtype")
# Keywords of diffusers' scheduler.step() that a caller may pass (as pipelines do).
STEP_OPTIONS = ("eta", "use_clipped_model_output", "s_churn", "s_tmin", "s_tmax", "s_noise", "order")
# Config fields that only shape set_timesteps' grid, which fastdiff takes from diffusers as is.
GRID_FIELDS = ("timestep_spacing", "steps_offset", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
               "sigma_min", "sigma_max", "interpolation_type", "final_sigmas_type", "lambda_min_clipped",
               "use_lu_lambdas")
SCHEDULE_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                   "rescale_betas_zero_snr")
# Keywords of set_timesteps() a caller may pass: the resolution-dependent shift of flow schedulers.
SET_TIMESTEPS_OPTIONS = ("mu", "sigmas")  # `sigmas`: a pipeline's own grid (FluxPipeline's linspace)
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")


def _from_diffusers(cls, scheduler_or_config, model, steps: int, **overrides) -> Sampler:
    """A Sampler equivalent to a diffusers scheduler (see fastdiff.integrations.diffusers)."""
    return sampler_from_diffusers(scheduler_or_config, model, steps=steps, **overrides)


def sampler_from_diffusers(scheduler_or_config, model, steps: int, **overrides) -> Sampler:
    """A Sampler that computes what `scheduler` does in diffusers' loop with `steps` steps.

    scheduler_or_config: a diffusers scheduler, or its config (with `_class_name`).
    overrides: scheduler config fields (as diffusers' from_config(**kwargs)), step() keywords
    (eta, use_clipped_model_output, s_churn...), set_timesteps() keywords (`sigmas` as a pipeline passes them; `mu`, the dynamic
    shift of flow schedulers) and Sampler runtime options (RUNTIME_OPTIONS).
    """
    scheduler = _fresh_scheduler(scheduler_or_config, overrides)
    step_kw = {k: overrides.pop(k) for k in STEP_OPTIONS if k in overrides}
    grid_kw = {k: overrides.pop(k) for k in SET_TIMESTEPS_OPTIONS if k in overrides}
    unknown = [k for k in overrides if k not in RUNTIME_OPTIONS]
    if unknown:
        raise ValueError(f"from_diffusers: {', '.join(unknown)} is neither a {type(scheduler).__name__} config "
                         f"field, a step() keyword nor a runtime option ({', '.join(RUNTIME_OPTIONS)})")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    name = type(scheduler).__name__
    if name not in TRANSLATORS:
        raise NotImplementedError(f"fastdiff cannot run {name}; supported: {', '.join(TRANSLATORS)}")
    takes = inspect.signature(scheduler.set_timesteps).parameters
    for k in grid_kw:
        if k not in takes:
            raise ValueError(f"{name}.set_timesteps() takes no {k!r}")
    if name == "PNDMScheduler" and not scheduler.config.skip_prk_steps and steps < RUNGE_KUTTA_MIN_STEPS:
        # diffusers' own set_timesteps fails inside numpy (a broadcast of the 4 largest timesteps)
        raise ValueError(f"PNDMScheduler with skip_prk_steps=False needs num_inference_steps >= "
                         f"{RUNGE_KUTTA_MIN_STEPS} (its Runge-Kutta warm-up takes the 4 largest timesteps), "
                         f"got steps={steps}")
    scheduler.set_timesteps(steps, **grid_kw)
    if scheduler.config.get("timestep_spacing") == "trailing" and float(scheduler.timesteps.min()) < 0:
        # diffusers' float arange overshoots for some N and lists t = -1: refuse, naming a count that works
        spaced_timesteps(scheduler.config.num_train_timesteps, steps, "trailing")
    schedule = schedule_from_config(scheduler)
    options, handled = TRANSLATORS[name](scheduler, scheduler.config, steps, step_kw, schedule)
    _refuse_other_fields(scheduler, handled)
    sampler = Sampler(model, schedule, steps=steps, **options, **overrides)
    _check_grid(sampler, scheduler)
    return sampler


# ---- the scheduler and its schedule ----------------------------------------------------
def _fresh_scheduler(scheduler_or_config, overrides: dict):
    """A new scheduler of the same class and config (plus config overrides): never the caller's."""
    import diffusers

    if isinstance(scheduler_or_config, diffusers.SchedulerMixin):
        # its config as it is now: from_config would reset the fields listed in `_use_default_values`,
        # which pipelines overwrite in place (StableDiffusionPipeline sets steps_offset=1, clip_sample=False)
        cls = type(scheduler_or_config)
        config = {k: v for k, v in scheduler_or_config.config.items() if k != "_use_default_values"}
    elif isinstance(scheduler_or_config, dict):
        config = scheduler_or_config
        name = config.get("_class_name")
        cls = getattr(diffusers, name, None) if isinstance(name, str) else None
        if cls is None:
            raise ValueError(f"a scheduler config needs `_class_name` naming a diffusers scheduler, got {name!r}")
    else:
        raise ValueError(f"expected a diffusers scheduler or its config, got {type(scheduler_or_config).__name__}")
    fields = set(inspect.signature(cls.__init__).parameters) - {"self"}
    config_kw = {k: overrides.pop(k) for k in list(overrides) if k in fields}
    T = config_kw.get("num_train_timesteps", config.get("num_train_timesteps"))  # else diffusers fails inside torch
    if T is not None and (not isinstance(T, int) or isinstance(T, bool) or T < 1):
        raise ValueError(f"num_train_timesteps must be a positive integer, got {T!r}")
    return cls.from_config(config, **config_kw)


def schedule_from_config(scheduler) -> Schedule:
    """The scheduler's own alphas_cumprod as a float64 Schedule: exactly the float32 values its
    step() reads (betas, trained betas and the zero-terminal-SNR rescale all computed as diffusers
    does; rebuilding them in float64 differs by up to 3e-4 at T = 100)."""
    c = scheduler.config
    if is_flow(scheduler):  # its grid (flow levels s, model timesteps) is taken as listed
        return Schedule.flow_matching(c.num_train_timesteps)
    name = "trained" if c.get("trained_betas") is not None else c.beta_schedule
    abar = scheduler.alphas_cumprod.double().cpu().clone()
    if c.get("rescale_betas_zero_snr", False):
        # the rescale ends at exactly 0; sigma-based schedulers then floor it at 2^-24 (sigma_max =
        # 4096), which lives in the sigmas they list and fastdiff walks as given
        abar[-1] = 0.0
    return Schedule.from_alphas_cumprod(abar, name=name)


def is_flow(scheduler) -> bool:
    """A flow-matching scheduler (x_s = (1 - s) x_0 + s eps): FlowMatch*, or use_flow_sigmas."""
    return type(scheduler).__name__ in FLOW_SCHEDULERS or bool(scheduler.config.get("use_flow_sigmas", False))


def _unsupported(scheduler, field: str, value, why: str = ""):
    raise NotImplementedError(f"{type(scheduler).__name__} with {field}={value!r} is not supported by fastdiff"
                              + (f": {why}" if why else ""))


def _refuse_other_fields(scheduler, handled: tuple) -> None:
    """Any config field we do not translate must hold its default (guards future diffusers options)."""
    defaults = {p.name: p.default for p in inspect.signature(type(scheduler).__init__).parameters.values()}
    for k, v in scheduler.config.items():
        if k.startswith("_") or k in handled or k in SCHEDULE_FIELDS or k in GRID_FIELDS:
            continue
        if k in defaults and _same(v, defaults[k]):
            continue
        _unsupported(scheduler, k, v)


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # array-valued
        return False


def _step_kw(scheduler, step_kw: dict, allowed: dict) -> dict:
    """step() keywords this scheduler takes, with defaults; others are refused."""
    for k, v in step_kw.items():
        if k not in allowed:
            raise ValueError(f"{type(scheduler).__name__}.step() takes no {k!r}")
    return {**allowed, **step_kw}


def _thresholds(c) -> dict:
    return dict(thresholding=bool(c.get("thresholding", False)),
                dynamic_thresholding_ratio=c.get("dynamic_thresholding_ratio", 0.995),
                sample_max_value=c.get("sample_max_value", 1.0),
                clip_sample=bool(c.get("clip_sample", False)), clip_range=c.get("clip_sample_range", 1.0))


def _explicit_grid(timesteps, sigmas) -> dict:
    """Pass diffusers' own grid: model timesteps [N] and VE sigmas [N+1]."""
    return dict(timesteps=timesteps.double(), sigmas=sigmas.double())


# ---- one translator per scheduler: (Sampler options, config fields handled) ---------------
# translate(scheduler after set_timesteps(N), its config, N, step() keywords, float64 Schedule)
def _ddpm(s, c, N, step_kw, schedule):
    _step_kw(s, step_kw, {})
    variance = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large"}
    if c.variance_type not in variance:  # fixed_small_log draws the same std as fixed_small
        _unsupported(s, "variance_type", c.variance_type, "learned variances need the model's variance output")
    # diffusers' DDPM steps to the next listed timestep, so the grid is its timesteps as listed
    return dict(solver="ddpm", prediction=c.prediction_type, timesteps=s.timesteps.double(), final_units="model",
                variance=variance[c.variance_type], **_thresholds(c)), (
        "variance_type", "prediction_type", "clip_sample", "clip_sample_range", "thresholding",
        "dynamic_thresholding_ratio", "sample_max_value")


def _ddim(s, c, N, step_kw, schedule):
    kw = _step_kw(s, step_kw, {"eta": 0.0, "use_clipped_model_output": False})
    th = _thresholds(c)
    final = 1.0 if c.set_alpha_to_one else float(schedule.alphas_cumprod[0])
    # native grid: fastdiff reproduces DDIM's t - T//N stride; _check_grid compares timesteps
    return dict(solver="ddim", prediction=c.prediction_type, spacing=c.timestep_spacing, final_units="model",
                steps_offset=c.steps_offset, final_alpha_cumprod=final, eta=float(kw["eta"]),
                use_clipped_model_output=bool(kw["use_clipped_model_output"]), **th), (
        "set_alpha_to_one", "prediction_type", "clip_sample", "clip_sample_range", "thresholding",
        "dynamic_thresholding_ratio", "sample_max_value")


def _euler_family(solver):
    def translate(s, c, N, step_kw, schedule):
        if solver == "euler":
            kw = _step_kw(s, step_kw, {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0})
            # diffusers' variant of EDM's churn: the model sees x before the re-heating (see solvers/euler.py);
            # its gamma divides by len(sigmas) - 1 (N + 1 under log_linear), fastdiff's by N
            churn = dict(s_churn=float(kw["s_churn"]) * N / (len(s.sigmas) - 1), s_tmin=float(kw["s_tmin"]),
                         s_tmax=float(kw["s_tmax"]), s_noise=float(kw["s_noise"]), churn_variant="diffusers")
            if c.timestep_type == "continuous" and c.prediction_type == "v_prediction":
                _unsupported(s, "timestep_type", "continuous", "the model would see 0.25 log(sigma), not a timestep")
        else:
            _step_kw(s, step_kw, {})
        if solver == "euler_ancestral" and c.prediction_type == "sample":
            _unsupported(s, "prediction_type", "sample", "diffusers does not implement it either")
        if solver == "heun":  # timesteps [t0, t1, t1, ...], sigmas [s0, s1, s1, ..., 0]: one of each pair
            grid = _explicit_grid(s.timesteps[0::2], torch.cat([s.sigmas[0:-1:2], s.sigmas[-1:]]))
        else:
            grid = _explicit_grid(s.timesteps, s.sigmas[: N + 1])  # log_linear lists N+2; the loop uses N+1
        extra = _thresholds(c) if solver == "heun" else churn if solver == "euler" else {}
        return dict(solver=solver, prediction=c.prediction_type, spacing=c.timestep_spacing, **grid, **extra), (
            "prediction_type", "timestep_type", "clip_sample", "clip_sample_range")
    return translate


def _dpm(s, c, N, step_kw, schedule):
    _step_kw(s, step_kw, {})
    solvers = {"dpmsolver++": "dpmpp_2m", "sde-dpmsolver++": "dpmpp_2m_sde"}
    if c.algorithm_type not in solvers:
        _unsupported(s, "algorithm_type", c.algorithm_type, "only dpmsolver++ and sde-dpmsolver++ (data prediction)")
    if c.solver_order not in (1, 2):
        _unsupported(s, "solver_order", c.solver_order, "orders 1 and 2 only")
    if c.solver_order == 2 and c.solver_type != "midpoint":
        _unsupported(s, "solver_type", c.solver_type, "the second-order update is the midpoint one")
    if c.variance_type is not None:
        _unsupported(s, "variance_type", c.variance_type)
    prediction = _prediction(s, c)
    last_first_order = (c.final_sigmas_type == "zero" or final_step_first_order(N, c.lower_order_final)
                        or c.solver_order == 1)
    if c.euler_at_final and not last_first_order:
        _unsupported(s, "euler_at_final", True)
    return dict(solver=solvers[c.algorithm_type], prediction=prediction, solver_order=c.solver_order,
                final_units="model",
                lower_order_final=c.lower_order_final, **_explicit_grid(s.timesteps, s.sigmas), **_thresholds(c)), (
        "algorithm_type", "solver_order", "solver_type", "variance_type", "use_flow_sigmas", "prediction_type",
        "lower_order_final", "euler_at_final", "thresholding", "dynamic_thresholding_ratio", "sample_max_value",
        "use_dynamic_shifting", "flow_shift", "time_shift_type")


def _unipc(s, c, N, step_kw, schedule):
    _step_kw(s, step_kw, {})
    if c.solver_type != "bh2":
        _unsupported(s, "solver_type", c.solver_type, "UniPC bh2 only")
    if c.solver_order not in (1, 2):
        _unsupported(s, "solver_order", c.solver_order, "orders 1 and 2 only")
    if not c.predict_x0:
        _unsupported(s, "predict_x0", False, "UniPC with data prediction only")
    if c.disable_corrector:
        _unsupported(s, "disable_corrector", c.disable_corrector)
    if c.solver_p is not None:
        _unsupported(s, "solver_p", c.solver_p)
    prediction = _prediction(s, c)
    if not c.lower_order_final and c.solver_order == 2 and float(s.sigmas[-1]) == 0:
        # diffusers' second-order predictor onto sigma = 0 divides by h = inf and returns non-finite values
        _unsupported(s, "lower_order_final", False, "with final_sigmas_type='zero' diffusers' last step is undefined")
    return dict(solver="unipc", prediction=prediction, solver_order=c.solver_order, final_units="model",
                lower_order_final=c.lower_order_final, **_explicit_grid(s.timesteps, s.sigmas), **_thresholds(c)), (
        "solver_type", "solver_order", "predict_x0", "disable_corrector", "solver_p", "use_flow_sigmas",
        "prediction_type", "lower_order_final", "thresholding", "dynamic_thresholding_ratio", "sample_max_value",
        "use_dynamic_shifting", "time_shift_type", "flow_shift", "shift_terminal")


def _prediction(s, c) -> str:
    """The fastdiff prediction of a multistep scheduler that may run on flow sigmas."""
    flow = bool(c.use_flow_sigmas)
    if c.prediction_type == "flow_prediction":
        if not flow:
            _unsupported(s, "prediction_type", "flow_prediction", "it needs use_flow_sigmas=True (a flow process)")
        return "flow"
    if flow and c.prediction_type == "v_prediction":
        # diffusers then takes alpha x - sigma v with (alpha, sigma) = (1 - s, s): not v of any process
        _unsupported(s, "prediction_type", "v_prediction", "v is defined for VP processes, not with use_flow_sigmas")
    return c.prediction_type


def _pndm(s, c, N, step_kw, schedule):
    _step_kw(s, step_kw, {})
    if c.prediction_type not in ("epsilon", "v_prediction"):
        _unsupported(s, "prediction_type", c.prediction_type)
    stride = c.num_train_timesteps // N
    ts = s.timesteps.tolist()
    if c.skip_prk_steps and N >= 2 and ts[1] + stride != ts[0]:
        # diffusers' second evaluation re-steps x0 from t1 + T//N, not from t0 where x0 lies
        _unsupported(s, "timestep_spacing", c.timestep_spacing, f"with {N} steps its first PLMS step starts at "
                     f"t = {ts[1] + stride} while the sample is at t = {ts[0]}; 'leading' always works")
    final = 1.0 if c.set_alpha_to_one else float(schedule.alphas_cumprod[0])
    # native grid with DDIM's t - T//N stride (STRIDE_PREV); _check_grid compares the N + 1 timesteps
    # skip_prk_steps=False: 3 Runge-Kutta steps of 4 evaluations first (its timesteps list 12 of them)
    warmup = "pseudo_improved_euler" if c.skip_prk_steps else "pseudo_runge_kutta"
    return dict(solver="plms", prediction=c.prediction_type, spacing=c.timestep_spacing, steps_offset=c.steps_offset,
                final_alpha_cumprod=final, final_units="model", warmup=warmup), (
        "skip_prk_steps", "set_alpha_to_one", "prediction_type")


def _lms(s, c, N, step_kw, schedule):
    kw = _step_kw(s, step_kw, {"order": 4})
    if kw["order"] not in (1, 2, 3, 4):
        raise ValueError(f"LMSDiscreteScheduler.step() order must be 1-4 for fastdiff, got {kw['order']!r}")
    return dict(solver="lms", prediction=c.prediction_type, spacing=c.timestep_spacing, solver_order=kw["order"],
                **_explicit_grid(s.timesteps, s.sigmas)), ("prediction_type",)


FLOW_GRID_FIELDS = ("shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
                    "max_image_seq_len", "shift_terminal", "time_shift_type")  # shape the listed grid only


def _flow_match_euler(s, c, N, step_kw, schedule):
    _step_kw(s, step_kw, {})
    if c.invert_sigmas:
        _unsupported(s, "invert_sigmas", True, "it runs the process from data to noise")
    # stochastic_sampling: x' = (1 - s') x0 + s' z, the renoise table
    solver = "renoise" if c.stochastic_sampling else "euler"
    return dict(solver=solver, prediction="flow", final_units="model", **_explicit_grid(s.timesteps, s.sigmas)), (
        FLOW_GRID_FIELDS + ("invert_sigmas", "stochastic_sampling"))


def _flow_match_heun(s, c, N, step_kw, schedule):
    _step_kw(s, step_kw, {})
    # timesteps [t0, t1, t1, ...], sigmas [s0, s1, s1, ..., 0]: one of each pair, as HeunDiscrete
    grid = _explicit_grid(s.timesteps[0::2], torch.cat([s.sigmas[0:-1:2], s.sigmas[-1:]]))
    return dict(solver="heun", prediction="flow", final_units="model", **grid), FLOW_GRID_FIELDS


TRANSLATORS = {
    "DDPMScheduler": _ddpm,
    "DDIMScheduler": _ddim,
    "EulerDiscreteScheduler": _euler_family("euler"),
    "EulerAncestralDiscreteScheduler": _euler_family("euler_ancestral"),
    "HeunDiscreteScheduler": _euler_family("heun"),
    "DPMSolverMultistepScheduler": _dpm,
    "UniPCMultistepScheduler": _unipc,
    "FlowMatchEulerDiscreteScheduler": _flow_match_euler,
    "FlowMatchHeunDiscreteScheduler": _flow_match_heun,
    "PNDMScheduler": _pndm,
    "LMSDiscreteScheduler": _lms,
}


def _check_grid(sampler: Sampler, scheduler) -> None:
    """The last guard: the model must see diffusers' timesteps, levels and initial scale."""
    ours, theirs = sampler.timesteps.float(), scheduler.timesteps.float().cpu()
    if ours.shape != theirs.shape or not torch.equal(ours, theirs):
        raise NotImplementedError(f"fastdiff's grid differs from {type(scheduler).__name__}'s for this config: "
                                  f"timesteps {ours.tolist()} vs {theirs.tolist()}")
    init = float(getattr(scheduler, "init_noise_sigma", 1.0))  # FlowMatch schedulers start from the noise itself
    ours = sampler.init_noise_sigma
    if sampler.grid.process == "flow":  # diffusers' is in the model's (flow) units
        ours *= float(sampler.table.c_in[0])
    if not math.isclose(ours, init, rel_tol=1e-5):
        raise NotImplementedError(f"init_noise_sigma {ours} differs from diffusers' {init}")


Sampler.from_diffusers = classmethod(_from_diffusers)  # public; the sampler layer cannot import this one
