"""What every accelerated pipeline shares: AcceleratedPipeline, the loop adapter (the cached
Sampler per scheduler and options, the graph mode under offload hooks, seeds from the pipeline's
generator, the initial latents and the one sample() call), and the checks of the pipeline's
arguments. Each family (unconditional.py, stable_diffusion.py, stable_diffusion_xl.py, flow.py)
subclasses it with its kinds, its model callable and its __call__ body."""
from __future__ import annotations

import inspect
import json
import warnings
from abc import ABC, abstractmethod
from contextlib import contextmanager

import torch
from torch import nn

from ...sampler import Sampler
from ..diffusers import sampler_from_diffusers

# __call__ arguments no accelerated pipeline honours; refused when set (see fastdiff.integrations.pipelines)
REFUSED = ("timesteps", "sigmas", "ip_adapter_image", "ip_adapter_image_embeds", "cross_attention_kwargs",
           "joint_attention_kwargs", "callback_on_step_end")
DENOISERS = ("unet", "controlnet", "transformer")  # the components the loop calls


def seeds_from_generator(generator, batch: int) -> list[int]:
    """Per-sample seeds for fastdiff's counter-based noise, drawn from the pipeline's generator(s)."""
    if generator is None:
        return torch.randint(0, 2**62, (batch,)).tolist()
    if isinstance(generator, list):
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch}")
        return [int(torch.randint(0, 2**62, (1,), generator=g, device=g.device)) for g in generator]
    return torch.randint(0, 2**62, (batch,), generator=generator, device=generator.device).tolist()


def offload_hooks(pipe) -> list[str]:
    """The loop's components that carry accelerate hooks (CPU offload moves their weights)."""
    found = []
    for name in DENOISERS:
        component = getattr(pipe, name, None)
        if isinstance(component, nn.Module) and any(hasattr(m, "_hf_hook") for m in component.modules()):
            found.append(name)
    return found


def refuse_guidance_embedding(unet: nn.Module) -> None:
    """U-Nets with time_cond_proj_dim take a guidance embedding the loop does not pass."""
    if unet.config.time_cond_proj_dim is not None:
        raise NotImplementedError("accelerate: U-Nets with time_cond_proj_dim (guidance embeddings) are "
                                  "not supported")


@contextmanager
def _recorded_add_noise(scheduler):
    """Record the (original, noise) that the pipeline's latent preparation passes to
    scheduler.add_noise (its result is unchanged): fastdiff noises `original` itself."""
    seen = {}
    add_noise = scheduler.add_noise

    def recording(original_samples, noise, timesteps):
        seen["init"], seen["noise"] = original_samples, noise
        return add_noise(original_samples, noise, timesteps)

    scheduler.add_noise = recording
    try:
        yield seen
    finally:
        del scheduler.add_noise  # the class's method again


def check_inputs(pipe, values: dict) -> None:
    """The pipeline's own check_inputs, its parameters taken by name from `values`."""
    params = list(inspect.signature(pipe.check_inputs).parameters.values())
    pipe.check_inputs(**{p.name: values.get(p.name, None if p.default is inspect.Parameter.empty else p.default)
                         for p in params})


class AcceleratedPipeline(ABC):
    """A diffusers pipeline whose loop is fastdiff's; attributes are the pipeline's (see accelerate).
    A family subclass names its KINDS (pipeline class names) and REFUSED_BY (__call__ arguments
    refused per kind, beyond REFUSED), checks the pipeline's components in _check_pipeline and
    runs the pipeline's __call__ in _call."""

    KINDS: tuple[str, ...] = ()
    REFUSED_BY: dict[str, tuple[str, ...]] = {}

    def __init__(self, pipe, graph="auto", compile: bool = False):
        kind = type(pipe).__name__
        if kind not in self.KINDS:
            raise NotImplementedError(f"{type(self).__name__} accelerates {', '.join(self.KINDS)}, not {kind}")
        self._check_pipeline(pipe, kind)
        self.__dict__.update(pipe=pipe, kind=kind, graph=graph, compile=compile, _samplers={}, _offload_warned=False)
        defaults = inspect.signature(type(pipe).__call__).parameters
        # fail early on an unsupported scheduler (a dynamically shifted one needs some shift mu to list its grid)
        shifted = pipe.scheduler.config.get("use_dynamic_shifting", False)
        self.sampler(defaults["num_inference_steps"].default,
                     **(dict(mu=pipe.scheduler.config.get("base_shift", 0.5)) if shifted else {}))

    def __getattr__(self, name):
        if "pipe" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["pipe"], name)

    def __setattr__(self, name, value):  # e.g. `apipe.scheduler = ...` swaps the pipeline's scheduler
        setattr(self.pipe, name, value)

    def __repr__(self) -> str:
        return f"accelerate({self.kind}, graph={self.graph!r}, compile={self.compile})"

    def to(self, *args, **kwargs) -> "AcceleratedPipeline":
        self.pipe.to(*args, **kwargs)
        self._samplers.clear()  # their buffers and graphs live on the old device
        return self

    def _graph_mode(self):
        """self.graph, or False while offload hooks move the denoiser's weights (warned once)."""
        hooked = offload_hooks(self.pipe)
        if not hooked or self.graph is False:
            return self.graph
        if self.graph is True:
            raise ValueError(f"accelerate: graph=True cannot hold a model whose weights move: {', '.join(hooked)} "
                             "carries accelerate offload hooks; use graph='auto' or graph=False")
        if not self._offload_warned:
            self.__dict__["_offload_warned"] = True
            warnings.warn(f"accelerate: {', '.join(hooked)} carries accelerate offload hooks (CPU offload moves its "
                          "weights between calls), so the loop runs without a CUDA graph (graph=False)",
                          RuntimeWarning, stacklevel=4)
        return False

    @staticmethod
    def _check_pipeline(pipe, kind: str) -> None:
        """Refuse (NotImplementedError) components the family cannot run; by default none."""

    def _model(self) -> nn.Module:
        """The model callable the Sampler calls as model(x, t, **cond); by default the U-Net itself."""
        return self.pipe.unet

    def sampler(self, steps: int, device=None, **options) -> Sampler:
        """The cached Sampler (and its graphs) for the current scheduler, denoiser, `steps` and options
        (device: the pipeline's execution device, which costs a walk over its components to find)."""
        sched = self.pipe.scheduler
        denoiser = getattr(self.pipe, "transformer", None) or self.pipe.unet
        device = device or self.pipe._execution_device
        graph = self._graph_mode()
        config = json.dumps(dict(sched.config), sort_keys=True,
                            default=lambda v: v.tolist() if hasattr(v, "tolist") else repr(v))
        key = (type(sched).__name__, config, steps, tuple(sorted(options.items())),
               tuple(id(getattr(self.pipe, n, None)) for n in DENOISERS), str(denoiser.dtype), str(device), graph)
        if key not in self._samplers:
            self._samplers[key] = sampler_from_diffusers(sched, self._model(), steps=steps, graph=graph,
                                                         compile=self.compile, device=device, **options)
        return self._samplers[key]

    def _progress(self) -> dict:
        """tqdm options: the pipeline's set_progress_bar_config (a bar unless it says disable)."""
        return dict(getattr(self.pipe, "_progress_bar_config", {}))

    def _seeds(self, sampler: Sampler, generator, batch: int):
        # deterministic solvers draw nothing, leaving the generator as diffusers would
        return seeds_from_generator(generator, batch) if bool(sampler.table.uses_noise().any()) else None

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        bound = inspect.signature(type(self.pipe).__call__).bind(self.pipe, *args, **kwargs)
        bound.apply_defaults()
        a = dict(bound.arguments)
        a.pop("self", None)
        return self._call(a)

    @abstractmethod
    def _call(self, a: dict):
        """The pipeline's __call__ with fastdiff's loop; `a`: its arguments by name, defaults applied."""

    def _refuse_unsupported(self, a: dict) -> None:
        """NotImplementedError for an argument that is set and that no pipeline or this kind honours."""
        for name in REFUSED + self.REFUSED_BY.get(self.kind, ()):
            value = a.get(name)
            if value is not None and value is not False:  # never `in (None, False)`: a tensor has no truth value
                raise NotImplementedError(f"accelerate: {name} is not supported (see fastdiff.integrations.pipelines)")
        for name, value in (a.get("kwargs") or {}).items():  # callback, callback_steps, ...
            if value is not None:
                raise NotImplementedError(f"accelerate: {name} is not supported (see fastdiff.integrations.pipelines)")

    # ---- shared by the Stable Diffusion families --------------------------------------
    def _begin(self, a: dict) -> tuple[bool, int]:
        """Refusals, the pipeline state its properties read; (CFG?, prompts in the batch)."""
        self._refuse_unsupported(a)
        pipe = self.pipe
        pipe._guidance_scale, pipe._clip_skip = a["guidance_scale"], a.get("clip_skip")
        pipe._guidance_rescale = a.get("guidance_rescale", 0.0)
        pipe._cross_attention_kwargs, pipe._interrupt = None, False
        pipe._denoising_start = pipe._denoising_end = None
        return pipe.do_classifier_free_guidance, self._prompt_count(a)

    @staticmethod
    def _prompt_count(a: dict) -> int:
        """Prompts in the batch: one string, a list of them, or the rows of prompt_embeds."""
        prompt = a.get("prompt")
        return (1 if isinstance(prompt, str) else len(prompt)) if prompt is not None else a["prompt_embeds"].shape[0]

    def _loop_sampler(self, a: dict, cfg: bool, device) -> Sampler:
        pipe = self.pipe
        options = dict(guidance_rescale=float(a.get("guidance_rescale", 0.0)) if cfg else 0.0)
        if "eta" in inspect.signature(pipe.scheduler.step).parameters:  # as the pipeline's prepare_extra_step_kwargs
            options["eta"] = float(a["eta"])
        sampler = self.sampler(a["num_inference_steps"], device, **options)
        pipe.scheduler.set_timesteps(a["num_inference_steps"], device=device)  # as diffusers
        return sampler

    def _start(self, a: dict, prepare, batch: int, device) -> dict:
        """The initial latents as sample() keywords: text-to-image `noise` (x_T), or for img2img
        the noise and the clean latents that the pipeline's prepare_latents passes to add_noise."""
        pipe = self.pipe
        strength = a.get("strength")
        if strength is None or (self.kind == "StableDiffusionInpaintPipeline" and strength == 1.0):
            return dict(noise=prepare() / pipe.scheduler.init_noise_sigma)  # fastdiff applies the scale itself
        if a.get("latents") is not None:
            raise NotImplementedError("accelerate: latents with strength < 1 is not supported")
        timesteps, _ = pipe.get_timesteps(a["num_inference_steps"], strength, device)
        if (type(pipe.scheduler).__name__ == "PNDMScheduler" and not pipe.scheduler.config.skip_prk_steps
                and len(timesteps) < len(pipe.scheduler.timesteps)):
            # diffusers cuts its N + 9 timesteps at step t_start, and its step() still takes the first 12 as
            # Runge-Kutta sub-steps from the top level: no sampler on a grid computes that
            raise NotImplementedError("accelerate: strength < 1 with PNDMScheduler(skip_prk_steps=False) is not "
                                      "supported: diffusers slices the Runge-Kutta warm-up's timesteps by step "
                                      "count and steps them from the grid's top level; use skip_prk_steps=True")
        with _recorded_add_noise(pipe.scheduler) as seen:
            prepare(timesteps[:1].repeat(batch))
        return dict(noise=seen["noise"], init=seen["init"], strength=strength)

    def _sample(self, a, sampler, start, cond, uncond, cfg, batch):
        x = sampler.sample(**start, seeds=self._seeds(sampler, a["generator"], batch), cond=cond,
                           uncond=uncond if cfg else None, guidance_scale=a["guidance_scale"] if cfg else None,
                           progress=self._progress())
        self.pipe._num_timesteps = sampler.num_model_evals
        return x
