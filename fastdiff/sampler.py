"""The Sampler: a model, a schedule and a solver, compiled once into a coefficient table.

    sampler = Sampler(model, Schedule.linear(), solver="dpmpp_2m", steps=20)
    x0 = sampler.sample(shape=(8, 3, 32, 32), seeds=range(8))

`model(x, t, **kwargs)` gets x_t (variance-preserving units; flow units x_s = (1 - s) x_0 +
s eps for a Schedule.flow_matching one, with t = s * T) and a float tensor t [B] of training
timesteps and returns epsilon, v or x0 (`prediction`; the velocity eps - x_0 for "flow").
The returned sample is in data units (x_t / alpha_t when the grid ends above the data). A
sample's result depends only on its seed, never on the batch around it.
"""
from __future__ import annotations

import inspect
import math
import sys
import warnings
from collections import OrderedDict

import torch

from . import conditioning, rng, runners
from .checks import check_finite_tensor, check_number, is_number
from .devices import check_device, on_device
from .dtypes import MODEL_DTYPES
from .executors import EXECUTORS, resolve_backend
from .grids import SIGMA_GRIDS, SPACINGS, make_grid
from .guidance import Thresholding, check_guidance_interval, row_guidance
from .loop import Loop, LoopBuffers
from .noising import noise_to_level
from .rng import STREAM_INIT, STREAM_STEP
from .schedules import FlowSchedule, Schedule
from .seeds import as_seeds
from .solvers import (DEFAULT_SIGMAS, STRIDE_PREV, build_table, check_flow_solver, check_solver, langevin,
                      solver_options)
from .solvers.base import check_prediction, input_scale, process_coefficients
from .solvers.ddpm import VARIANCES
from .solvers.table import StepTable

CORRECTORS = (None, "langevin")
GRAPH_MODES = ("auto", True, False)
DTYPES = MODEL_DTYPES + (torch.float64,)  # the kernels' model dtypes, and a float64 model on the torch backend


def _default(name: str):
    """The default of the Sampler keyword `name` (one source: the signature)."""
    return inspect.signature(Sampler.__init__).parameters[name].default


def _solver_options(solver: str, spacing: str, schedule: Schedule, given: dict) -> dict:
    """The keywords for `solver`'s table builder; a non-default option it does not use is an error."""
    takes = solver_options(solver)
    for name, value in given.items():
        if name not in takes and value != _default(name):
            raise ValueError(f"{name}={value!r} is not an option of solver {solver!r}; "
                             f"its options: {', '.join(takes)}")
    options = {k: v for k, v in given.items() if k in takes and v is not None}  # None: the solver's default
    if "spacing" in takes:  # the grid's spacing, which the Euler family's initial sigma depends on
        options["spacing"] = spacing
    if "t_at" in takes:  # the model timestep at a level off the grid (churn's sigma_hat)
        options["t_at"] = schedule.t_at
    if "abar_at" in takes:  # the level at a timestep off the grid (PNDM's Runge-Kutta rows)
        options["abar_at"] = schedule.alphas_cumprod_at
    return options


def _stderr_is_terminal() -> bool:
    """Whether a progress bar would reach a person: stderr is a terminal (not a pipe, a log or a
    replaced stream without isatty)."""
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # None, a stream without isatty, a closed file
        return False


def _model_dtype_device(model):
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype, p.device
    return None, None


class Sampler:
    """Sample a diffusion model with any solver; see the module docstring.

    Sampler.from_diffusers(scheduler_or_config, model, steps, **overrides), a Sampler
    equivalent to a diffusers scheduler, is attached by fastdiff.integrations.diffusers
    (imported with the package): the sampling layer does not import the integrations above it.
    """

    def __init__(self, model, schedule: Schedule | FlowSchedule, solver: str = "dpmpp_2m", steps: int = 20,
                 prediction: str = "epsilon", spacing: str | None = None, eta: float = 0.0,
                 guidance_scale: float | None = None, *, steps_offset: int = 0, sigmas=None,
                 rho: float = 7.0, timesteps=None, variance: str = "fixed_small", solver_order: int | None = None,
                 lower_order_final: bool = True, warmup: str | None = None, final_alpha_cumprod: float = 1.0,
                 clip_sample: bool = False,
                 clip_range: float = 1.0, thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 sample_max_value: float = 1.0, use_clipped_model_output: bool = False,
                 guidance_rescale: float = 0.0, guidance_interval=None, classifier=None,
                 classifier_scale: float = 1.0, corrector: str | None = None, corrector_steps: int = 1,
                 snr: float = 0.16, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
                 s_noise: float = 1.0, churn_variant: str = "edm", backend: str = "auto", graph="auto",
                 compile: bool = False, max_graphs: int = 4, device=None, dtype: torch.dtype | None = None,
                 final_units: str = "data"):
        if not isinstance(schedule, (Schedule, FlowSchedule)):
            raise ValueError(f"schedule must be a fastdiff.Schedule (or Schedule.flow_matching), "
                             f"got {type(schedule).__name__}")
        if not callable(model):
            raise ValueError("model must be callable as model(x, t, **kwargs)")
        self.solver = check_solver(solver)
        self.prediction = check_prediction(prediction, schedule.process)
        flow = schedule.process == "flow"
        if flow:
            check_flow_solver(solver)
            for name, value, default in (("spacing", spacing, None), ("steps_offset", steps_offset, 0),
                                         ("corrector", corrector, None), ("classifier", classifier, None)):
                if value is not default and value != default:
                    raise ValueError(f"{name}={value!r} is not available on a flow-matching schedule (its grid is "
                                     "set by shift/mu, sigmas or timesteps; the Langevin corrector and classifier "
                                     "guidance are written for VP processes)")
        elif spacing is None and sigmas is None and timesteps is None and math.isfinite(schedule.sigma_max):
            sigmas = DEFAULT_SIGMAS.get(self.solver)  # no grid named: the solver's default (zero terminal SNR: trailing)
        spacing = "trailing" if spacing is None else spacing
        T = schedule.num_train_timesteps
        explicit_sigmas = sigmas is not None and not isinstance(sigmas, str)  # VE sigmas [N+1], see grids
        max_steps = None if flow else T
        if timesteps is None and not explicit_sigmas and (
                not isinstance(steps, int) or isinstance(steps, bool) or steps < 1
                or (max_steps is not None and steps > max_steps)):
            raise ValueError(f"steps must be an integer in [1, {'...' if flow else f'num_train_timesteps={T}'}], "
                             f"got {steps!r}")
        if spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {spacing!r}; allowed: {', '.join(SPACINGS)}")
        if isinstance(sigmas, str) and sigmas not in SIGMA_GRIDS:
            raise ValueError(f"unknown sigmas {sigmas!r}; allowed: None, {', '.join(SIGMA_GRIDS)} or explicit values")
        check_number("eta", eta, 0, math.inf, lo_open=False, hi_open=True)
        if variance not in VARIANCES:
            raise ValueError(f"unknown variance {variance!r}; allowed: {', '.join(VARIANCES)}")
        if corrector not in CORRECTORS:
            raise ValueError(f"unknown corrector {corrector!r}; allowed: None, 'langevin'")
        if graph not in GRAPH_MODES:
            raise ValueError(f"graph must be 'auto', True or False, got {graph!r}")
        check_number("guidance_rescale", guidance_rescale, 0, 1, lo_open=False)
        if not isinstance(compile, bool):
            raise ValueError(f"compile must be True or False, got {compile!r}")
        if not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be a positive integer, got {max_graphs!r}")
        self._check_guidance_scale(guidance_scale)
        self.guidance_interval = check_guidance_interval(guidance_interval)  # for every guided sample() call
        check_number("final_alpha_cumprod", final_alpha_cumprod, 0, 1)
        if classifier is not None and not callable(classifier):
            raise ValueError("classifier must be callable as classifier(x, t, **kwargs) -> log p(y|x_t) [B]")
        if not (is_number(classifier_scale) and math.isfinite(classifier_scale)):
            raise ValueError(f"classifier_scale must be a finite number, got {classifier_scale!r}")
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(map(str, DTYPES))} (the model's input and "
                             f"output dtype) or None (the model's), got {dtype!r}")
        self.model, self.schedule = model, schedule
        self.guidance_scale = guidance_scale
        self.threshold = Thresholding(
            clip=clip_range if clip_sample else None,
            dynamic_ratio=dynamic_thresholding_ratio if thresholding else None, max_value=sample_max_value)
        self.guidance_rescale, self.classifier, self.classifier_scale = guidance_rescale, classifier, classifier_scale
        self.eta, self.spacing = float(eta), spacing
        self._grid_options = dict(spacing=spacing, steps_offset=steps_offset, sigmas=sigmas, rho=rho,
                                  final_abar=final_alpha_cumprod, stride_prev=solver in STRIDE_PREV and sigmas is None,
                                  timesteps=timesteps)
        self.grid = make_grid(schedule, steps if timesteps is None else len(timesteps), **self._grid_options)
        self.steps = self.grid.steps
        self._options = _solver_options(solver, spacing, schedule, dict(
            eta=eta, variance=variance, solver_order=solver_order, lower_order_final=lower_order_final, warmup=warmup,
            use_clipped_model_output=use_clipped_model_output, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
            s_noise=s_noise, churn_variant=churn_variant))
        if corrector is None and (corrector_steps, snr) != (_default("corrector_steps"), _default("snr")):
            raise ValueError(f"corrector_steps={corrector_steps!r} and snr={snr!r} set the corrector; "
                             "they need corrector='langevin'")
        self.corrector = langevin.Corrector(corrector_steps, snr) if corrector == "langevin" else None
        self.final_units = final_units
        self.table = self._table(0)
        mdtype, mdevice = _model_dtype_device(model)
        self.device = check_device(device) if device is not None else (mdevice or torch.device("cpu"))
        self.dtype = dtype or mdtype or torch.float32
        self.backend = resolve_backend(backend, self.device, self.dtype)
        self.graph_mode, self.compile, self.max_graphs = graph, compile, max_graphs
        if graph is True and self.device.type != "cuda":
            raise ValueError("graph=True needs a CUDA device; use graph='auto' (eager on the CPU) or graph=False")
        self._runners: OrderedDict = OrderedDict()
        self._newest = None  # the most recently created runner (see `timings`)
        self._capture_failure: str | None = None  # why graph="auto" fell back to eager, if it did
        self._tables: dict[int, StepTable] = {0: self.table}
        self._compiled_model = None

    # ---- what the sampler will do ---------------------------------------------------
    def _table(self, start: int) -> StepTable:
        table = build_table(self.solver, self.grid[start:], self.prediction, final_units=self.final_units,
                            **self._options)
        if self.corrector is not None:
            table = langevin.attach(table, self.schedule, self.corrector)
        return table

    @property
    def timesteps(self) -> torch.Tensor:
        """The model timesteps, one per model evaluation, in order (float64)."""
        return self.table.t_model.clone()

    @property
    def num_model_evals(self) -> int:
        extra = int(self.table.corrector_steps.sum()) if self.table.corrector_steps is not None else 0
        return self.table.rows + extra

    @property
    def init_noise_sigma(self) -> float:
        return self.table.init_noise_sigma

    # ---- sampling -------------------------------------------------------------------
    @staticmethod
    def _check_guidance_scale(w):
        if w is None or callable(w):  # a schedule f(sigma): its values are checked per row (row_guidance)
            return
        if torch.is_tensor(w):
            if not bool(torch.isfinite(w).all()):
                raise ValueError("guidance_scale must be finite")
            return
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
            raise ValueError(f"guidance_scale must be a finite number, a [B] tensor or a callable f(sigma) -> "
                             f"float, got {w!r}")

    def _guidance(self, given):
        """(schedule, scale) from the Sampler's and sample()'s guidance_scale: a callable is a
        schedule, a number or [B] tensor a scale; they multiply, and a sample() value replaces
        the Sampler's of its kind. A schedule alone has scale 1."""
        self._check_guidance_scale(given)
        values = [self.guidance_scale, given]
        schedule = next((w for w in reversed(values) if callable(w)), None)
        scale = next((w for w in reversed(values) if w is not None and not callable(w)), None)
        return schedule, (1.0 if scale is None and schedule is not None else scale)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor | None = None, *, shape=None, seeds=None, cond: dict | None = None,
               uncond: dict | None = None, guidance_scale=None, guidance_interval=None,
               init: torch.Tensor | None = None, strength: float | None = None,
               progress: bool | str | dict | None = None) -> torch.Tensor:
        """Draw samples; returns float32 [B, *S] in data units (see the class docstring).

        noise: x_T ~ N(0, I) (scaled by init_noise_sigma here); or shape + seeds, from which
        noise is drawn per sample.  cond/uncond: model keyword arguments, tensors batched along
        dim 0, nested in dicts/lists/tuples at any depth (fastdiff/conditioning.py); with uncond
        and a guidance scale, one batched [uncond; cond] call per step.
        guidance_scale: a number, a [B] tensor (per sample) or a callable f(sigma) -> float (a
        schedule over the model-call VE sigma, evaluated once per row on the host); a schedule
        and a scale multiply (the Sampler's schedule times sample()'s scale, or the reverse).
        guidance_interval=(lo, hi): guide only rows whose model-call sigma lies in [lo, hi];
        elsewhere the weight is 1 and the model sees the conditional half only ([B], not [2B]).
        Rows whose weight the host knows to be exactly 1 (a schedule's value times a number
        scale) skip the unconditional half too; a [B] tensor scale keeps its rows [2B].
        init + strength: img2img/SDEdit, starting from init noised to the strength's level.
        progress: a tqdm bar per model evaluation; None or 'auto' (the default): on for a CPU
        sampler when stderr is a terminal, off otherwise (pipes, logs, notebooks' captured
        output, CUDA). On CUDA a captured graph replays the whole loop at once, so its bar
        counts calls, not steps. A dict of tqdm options (a pipeline's progress bar config) shows
        a bar with those options.
        Raises FloatingPointError naming the step where a model output, the classifier's
        gradient or the sample itself became non-finite (noise and init are checked here).
        """
        if not (progress is None or isinstance(progress, (bool, dict)) or isinstance(progress, str)
                and progress == "auto"):
            raise ValueError(f"progress must be True, False, None, 'auto' or a dict of tqdm options, got {progress!r}")
        if progress is None or progress == "auto":
            progress = self.device.type == "cpu" and _stderr_is_terminal()
        x_T, seeds = self._initial_noise(noise, shape, seeds)
        B = x_T.shape[0]
        schedule, scale = self._guidance(guidance_scale)
        cfg = self._check_conditioning(cond, uncond, scale, B)
        if guidance_interval is not None and not cfg:
            raise ValueError("guidance_interval needs classifier-free guidance (a guidance_scale and uncond=)")
        interval = self.guidance_interval if guidance_interval is None else check_guidance_interval(guidance_interval)
        start = self._start_step(init, strength, x_T)
        table = self._tables.get(start) or self._tables.setdefault(start, self._table(start))
        if init is None:
            x0 = x_T * table.init_noise_sigma
        else:
            # forward-noise init to the first step's level with x_T as the noise (SDEdit)
            abar = float(self.grid.abar[start])
            x0 = noise_to_level(init.to(self.device, torch.float32), abar, noise=x_T)  # VP x_t
            a, b = process_coefficients(self.grid.process, abar)  # the model's units: sqrt(a^2+b^2) x_t
            x0 = x0 * (math.sqrt(a * a + b * b) / input_scale(table.space, self.grid.process, abar))
        if table.init_churn:  # the first step's re-heating, before the first model call (StepTable.noise_ahead)
            x0 = x0 + table.init_churn * rng.randn(seeds, 0, STREAM_STEP, x0.shape[1:], device=self.device)
        kwargs = conditioning.batched(cond, uncond, cfg, self.device)
        cfg_w, guided = None, (False,) * table.rows
        if cfg:
            s_b = self._guidance_weights(scale if torch.is_tensor(scale) else 1.0, B)
            rows = row_guidance(table.sigma.tolist(), schedule, scale, interval)
            guided = tuple(f is not None for f in rows)
            f_r = torch.tensor([1.0 if f is None else f for f in rows], dtype=torch.float32, device=self.device)
            cfg_w = f_r[:, None] * s_b[None]  # [R, B]; unguided rows' weights are never read
        runner = self._runner(table, start, B, tuple(x_T.shape[1:]), cfg, kwargs, guided)
        with on_device(self.device):  # streams, capture and launches go to the current GPU
            return runner.run(x0, seeds, cfg_w, kwargs, progress)

    def _guidance_weights(self, w, B: int) -> torch.Tensor:
        """The guidance scale per sample, [B] float32 on the device."""
        w_t = torch.as_tensor(w, dtype=torch.float32, device=self.device).reshape(-1)
        if w_t.numel() not in (1, B):
            raise ValueError(f"guidance_scale must be a number or have {B} entries, got {w_t.numel()}")
        return w_t.expand(B)

    @torch.no_grad()
    def invert(self, x0: torch.Tensor, cond: dict | None = None, uncond: dict | None = None, guidance_scale=None,
               steps: int | None = None, *, mode: str = "exact", iterations: int = 10, sweeps: int = 10,
               tol: float = 1e-7) -> torch.Tensor:
        """x_T such that sample(noise=x_T, cond=cond, ...) returns x0: the probability-flow ODE from
        data to noise on this sampler's grid (fastdiff.inversion). mode 'exact' (every row's model
        call consistent with its point, by backward sweeps: up to `iterations` calls per row for its
        own fixed point, up to `sweeps` sweeps, until points and x_T move by less than `tol`) or
        'naive' (one sweep, each row's model at its known point). Deterministic
        solvers only (ddim with eta=0, euler, heun, dpmpp_2m, unipc). steps: another step count
        on the same grid options (a Sampler of that many steps then samples it back)."""
        from .inversion import check_invertible, invert_table, table_for_steps

        check_invertible(self)
        if not torch.is_tensor(x0) or x0.ndim < 2:
            raise ValueError("x0 must be a tensor [B, ...]")
        table = self.table if steps is None or steps == self.steps else table_for_steps(self, steps)
        B = x0.shape[0]
        w = self.guidance_scale if guidance_scale is None else guidance_scale
        self._check_guidance_scale(w)
        if callable(w):
            raise ValueError("invert() takes a number or [B] tensor guidance_scale, not a schedule f(sigma)")
        cfg = self._check_conditioning(cond, uncond, w, B)
        x_s = invert_table(self._model(), table, x0.to(self.device, torch.float32),
                           kwargs=conditioning.batched(cond, uncond, cfg, self.device),
                           cfg_w=self._guidance_weights(w, B) if cfg else None, mode=mode, iterations=iterations,
                           sweeps=sweeps, tol=tol, dtype=self.dtype)
        return x_s / table.init_noise_sigma  # sample() starts from x_T * init_noise_sigma

    def _initial_noise(self, noise, shape, seeds):
        if noise is not None:
            if not torch.is_tensor(noise) or noise.ndim < 1:
                raise ValueError("noise must be a tensor [B, ...]")
            if shape is not None and tuple(shape) != tuple(noise.shape):
                raise ValueError(f"noise shape {tuple(noise.shape)} does not match shape {tuple(shape)}")
            check_finite_tensor("noise", noise)
            B = noise.shape[0]
            seeds = as_seeds(seeds if seeds is not None else range(B), B, self.device)
            return noise.to(self.device, torch.float32), seeds
        if shape is None:
            raise ValueError("sample() needs noise=x_T or shape=(B, ...)")
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2 or any(s < 1 for s in shape):
            raise ValueError(f"shape must be (B, ...) with positive sizes, got {shape}")
        if seeds is None:
            seeds = torch.randint(0, 2**62, (shape[0],)).tolist()
        seeds = as_seeds(seeds, shape[0], self.device)
        return rng.randn(seeds, 0, STREAM_INIT, shape[1:], device=self.device), seeds

    def _check_conditioning(self, cond, uncond, w, B) -> bool:
        conditioning.check(cond, uncond, B)
        if w is not None and uncond is None:
            raise ValueError("guidance_scale needs uncond= (the unconditional model keyword arguments)")
        if uncond is not None and w is None:
            raise ValueError("uncond given without a guidance_scale")
        return uncond is not None

    def _start_step(self, init, strength, x_T) -> int:
        if init is None:
            if strength is not None:
                raise ValueError("strength needs init= (the image to start from)")
            return 0
        if not torch.is_tensor(init) or init.shape != x_T.shape:
            raise ValueError(f"init must be a tensor of shape {tuple(x_T.shape)}")
        check_finite_tensor("init", init)
        check_number("strength", strength, 0, 1)
        n = min(int(self.steps * strength), self.steps)
        if n < 1:
            raise ValueError(f"strength={strength} with steps={self.steps} leaves no step to run")
        return self.steps - n

    # ---- runners: static buffers, an executor, and (on CUDA) a captured graph -------
    def _model(self):
        if self.compile and self._compiled_model is None:
            self._compiled_model = runners.compile_model(self.model)
        return self.model if self._compiled_model is None else self._compiled_model  # no truth test: an
        # OptimizedModule forwards len() to the model, which raises for most nn.Modules

    def _runner(self, table, start, B, sample_shape, cfg, kwargs, guided):
        key = (start, B, sample_shape, self.dtype, cfg, guided, conditioning.signature(kwargs))
        if key in self._runners:
            self._runners.move_to_end(key)
            return self._runners[key]
        bufs = LoopBuffers(table, B, sample_shape, self.dtype, self.device, cfg, guided)
        executor = EXECUTORS[self.backend](table, bufs, self.threshold, self.guidance_rescale)
        loop = Loop(self._model(), table, bufs, executor, classifier=self.classifier,
                    classifier_scale=self.classifier_scale)
        use_graph = self.graph_mode is True or (self.graph_mode == "auto" and self.device.type == "cuda"
                                                and self.classifier is None)
        use_graph = use_graph and self._capture_failure is None  # graph="auto" stays eager after one failure
        if use_graph:
            runner = runners.GraphRunner(loop, table, None if self.graph_mode is True else self._capture_failed)
        else:
            runner = runners.EagerRunner(loop, table)
        self._runners[key] = runner
        self._newest = runner
        while len(self._runners) > self.max_graphs:
            self._runners.popitem(last=False)[1].release()
        return runner

    def _capture_failed(self, error: Exception) -> None:
        self._capture_failure = f"{type(error).__name__}: {error}"
        warnings.warn(f"graph='auto': the sampling loop could not be captured as a CUDA graph "
                      f"({self._capture_failure.splitlines()[0]}); running it eagerly (graph=False "
                      "skips the attempt; graph=True raises instead)", RuntimeWarning, stacklevel=4)

    @property
    def timings(self) -> dict[str, float]:
        """One-time costs in seconds of the most recently created runner, filled by its first
        call: warmup_s and capture_s for a captured CUDA graph; empty for an eager loop."""
        return dict(self._newest.timings) if self._newest is not None else {}

    def clear_graphs(self) -> None:
        """Release every cached runner (captured graphs and their static buffers)."""
        for runner in self._runners.values():
            runner.release()
        self._runners.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def num_cached_graphs(self) -> int:
        return sum(1 for r in self._runners.values() if getattr(r, "graph", None) is not None)

