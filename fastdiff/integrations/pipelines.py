"""accelerate(pipe): a diffusers pipeline whose denoising loop is fastdiff's, with the same images.

    from fastdiff.integrations.pipelines import accelerate
    pipe = accelerate(StableDiffusionXLPipeline.from_pretrained(...))

Everything outside the loop stays the pipeline's own: prompt encoding, latent and image
preparation (the generator is consumed exactly as the pipeline consumes it), the VAE, the
safety checker, the watermark and postprocessing. The loop becomes one `Sampler.sample`
call (on CUDA one captured graph): its conditioning is the denoiser's keyword arguments as
nested cond/uncond structures (fastdiff/conditioning.py), and where the pipeline computes
something per step around the denoiser (an inpainting U-Net's extra input channels, a
ControlNet's residuals, a transformer's timestep scale and position ids) a model callable
below does it inside the model call, so a graph holds it.

    pipeline                            accelerated                     refused (NotImplementedError)
    DDPMPipeline, DDIMPipeline          the loop
    StableDiffusionPipeline             the loop, CFG, guidance_rescale
    StableDiffusionImg2ImgPipeline      strength -> init/strength       strength < 1 with PNDM's Runge-Kutta warm-up
    StableDiffusionInpaintPipeline      9-channel U-Net, strength       4-channel U-Nets, padding_mask_crop,
                                                                        latents with strength < 1
    StableDiffusionControlNetPipeline   ControlNet + U-Net per call,    MultiControlNetModel, guess_mode
                                        conditioning scale, start/end
    StableDiffusionXLPipeline           added_cond_kwargs, CFG, rescale denoising_end
    StableDiffusionXLImg2ImgPipeline    strength, aesthetic scores      denoising_start/end, latents
    StableDiffusion3Pipeline            flow matching, CFG, mu          skip_guidance_layers
    FluxPipeline                        packed latents and ids, the     negative IP-adapter images
                                        guidance embedding, true CFG

Refused by every pipeline: custom timesteps/sigmas, IP-adapters, cross_attention_kwargs and
joint_attention_kwargs, per-step callbacks (`callback_on_step_end`, `callback`/`callback_steps`:
fastdiff does not return to Python between steps), U-Nets with time_cond_proj_dim, and
schedulers fastdiff has no solver for. `pipe.interrupt` is not checked inside the loop, for
the same reason.

Stochastic schedulers (DDPM, Euler ancestral, SDE-DPM++, DDIM eta > 0) draw their per-step
noise from fastdiff's counter-based generator, keyed by seeds drawn from `generator` after
the pipeline's own draws: the same distribution as diffusers', not the same draws.

Offloading: with accelerate hooks on the U-Net, ControlNet or transformer
(enable_model_cpu_offload, enable_sequential_cpu_offload), weights move between calls, so a
captured graph would replay against memory that no longer holds them: the loop then runs
without a graph (graph=False), said once in a warning; graph=True raises.
"""
from __future__ import annotations

import inspect
import json
import warnings
from contextlib import contextmanager

import torch
from torch import nn

from ..sampler import Sampler
from .diffusers import sampler_from_diffusers

STABLE_DIFFUSION = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
                    "StableDiffusionControlNetPipeline")
STABLE_DIFFUSION_XL = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
FLOW = ("StableDiffusion3Pipeline", "FluxPipeline")  # transformers on flow-matching schedulers
PIPELINES = ("DDPMPipeline", "DDIMPipeline", *STABLE_DIFFUSION, *STABLE_DIFFUSION_XL, *FLOW)
IMG2IMG = ("StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline", "StableDiffusionXLImg2ImgPipeline")
# __call__ arguments no accelerated pipeline honours; refused when set (see the module docstring)
REFUSED = ("timesteps", "sigmas", "ip_adapter_image", "ip_adapter_image_embeds", "cross_attention_kwargs",
           "joint_attention_kwargs", "callback_on_step_end")
# ... and per pipeline
REFUSED_BY = {"StableDiffusionInpaintPipeline": ("padding_mask_crop",),
              "StableDiffusionControlNetPipeline": ("guess_mode",),
              "StableDiffusionXLPipeline": ("denoising_end",),
              "StableDiffusionXLImg2ImgPipeline": ("denoising_start", "denoising_end", "latents"),
              "StableDiffusion3Pipeline": ("skip_guidance_layers",),
              "FluxPipeline": ("negative_ip_adapter_image", "negative_ip_adapter_image_embeds")}
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


def accelerate(pipe, graph="auto", compile: bool = False) -> "AcceleratedPipeline":
    """`pipe` with its denoising loop run by fastdiff; see the module docstring for what is
    accelerated and what is refused. graph: "auto" (a CUDA graph on CUDA), True or False;
    compile: torch.compile the denoiser."""
    return AcceleratedPipeline(pipe, graph=graph, compile=compile)


def offload_hooks(pipe) -> list[str]:
    """The loop's components that carry accelerate hooks (CPU offload moves their weights)."""
    found = []
    for name in DENOISERS:
        component = getattr(pipe, name, None)
        if isinstance(component, nn.Module) and any(hasattr(m, "_hf_hook") for m in component.modules()):
            found.append(name)
    return found


class InpaintingUNet(nn.Module):
    """A 9-channel inpainting U-Net as model(x, t, mask, masked_image_latents, **cond): the mask
    and the masked image's latents join the model input along channels inside the call (as
    the pipeline does after scale_model_input), so a captured graph holds the concatenation."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, *, mask, masked_image_latents, **cond):
        # x: [B, 4, h, w]; mask: [B, 1, h, w]; masked_image_latents: [B, 4, h, w]
        return self.unet(torch.cat([x, mask, masked_image_latents], dim=1), t, return_dict=False, **cond)[0]


class FlowTransformer(nn.Module):
    """SD3's and Flux's transformers as model(x, t, **cond): t is the flow level times T (the
    scheduler's timesteps); Flux's transformer takes t / 1000 in the latents' dtype, and its
    position ids (one [L, 3] table for the whole batch) arrive as batched conditioning
    (`txt_ids`/`img_ids` [B, L, 3], row 0 used) so the static buffers hold them."""

    def __init__(self, transformer: nn.Module, flux: bool):
        super().__init__()
        self.transformer, self.flux = transformer, flux

    def forward(self, x, t, **cond):
        if self.flux:
            t = t.to(x.dtype) / 1000
            cond["txt_ids"], cond["img_ids"] = cond["txt_ids"][0], cond["img_ids"][0]
        return self.transformer(hidden_states=x, timestep=t, return_dict=False, **cond)[0]


class ControlledUNet(nn.Module):
    """A ControlNet and its U-Net as one model: the ControlNet's residuals, times this step's
    conditioning scale, feed the U-Net in the same call.

    The per-step scale (controlnet_conditioning_scale times the control_guidance_start/end
    window) arrives as conditioning: control_scales [B, R] and control_timesteps [B, R], and
    the call picks the column whose timestep is t on the device, without a host read.
    """

    def __init__(self, unet: nn.Module, controlnet: nn.Module):
        super().__init__()
        self.unet, self.controlnet = unet, controlnet

    def forward(self, x, t, *, encoder_hidden_states, controlnet_cond, control_scales, control_timesteps, **cond):
        at_t = (control_timesteps == t[:, None]).to(control_scales.dtype)  # [G*B, R]: this step's column
        scale = (control_scales * at_t).sum(1) / at_t.sum(1)  # equal scales where a timestep repeats
        down, mid = self.controlnet(x, t, encoder_hidden_states=encoder_hidden_states, controlnet_cond=controlnet_cond,
                                    conditioning_scale=scale.to(self.controlnet.dtype)[:, None, None, None],
                                    guess_mode=False, return_dict=False)
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False, **cond)[0]


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


def _refuse(a: dict, names) -> None:
    for name in names:
        value = a.get(name)
        if value is not None and value is not False:  # never `in (None, False)`: a tensor has no truth value
            raise NotImplementedError(f"accelerate: {name} is not supported (see fastdiff.integrations.pipelines)")
    for name, value in (a.get("kwargs") or {}).items():  # callback, callback_steps, ...
        if value is not None:
            raise NotImplementedError(f"accelerate: {name} is not supported (see fastdiff.integrations.pipelines)")


def _check_inputs(pipe, values: dict) -> None:
    """The pipeline's own check_inputs, its parameters taken by name from `values`."""
    params = list(inspect.signature(pipe.check_inputs).parameters.values())
    pipe.check_inputs(**{p.name: values.get(p.name, None if p.default is inspect.Parameter.empty else p.default)
                         for p in params})


class AcceleratedPipeline:
    """A diffusers pipeline whose loop is fastdiff's; attributes are the pipeline's (see accelerate)."""

    def __init__(self, pipe, graph="auto", compile: bool = False):
        kind = type(pipe).__name__
        if kind not in PIPELINES:
            raise NotImplementedError(f"accelerate supports {', '.join(PIPELINES)}, not {kind}")
        unet = getattr(pipe, "unet", None)
        if kind in STABLE_DIFFUSION + STABLE_DIFFUSION_XL:
            if unet.config.time_cond_proj_dim is not None:
                raise NotImplementedError("accelerate: U-Nets with time_cond_proj_dim (guidance embeddings) are "
                                          "not supported")
        if kind == "StableDiffusionInpaintPipeline":
            if unet.config.in_channels != 9:
                raise NotImplementedError(
                    f"accelerate: StableDiffusionInpaintPipeline with a {unet.config.in_channels}-channel U-Net is not "
                    "supported: the pipeline blends the noised original into the latents between steps; use a "
                    "9-channel inpainting U-Net")
            if type(pipe.vae).__name__ != "AutoencoderKL":
                raise NotImplementedError(f"accelerate: inpainting with a {type(pipe.vae).__name__} is not supported")
        if kind == "StableDiffusionControlNetPipeline" and type(pipe.controlnet).__name__ != "ControlNetModel":
            raise NotImplementedError(f"accelerate: {type(pipe.controlnet).__name__} is not supported (one "
                                      "ControlNetModel only)")
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

    def _model(self) -> nn.Module:
        kind = self.kind
        if kind == "StableDiffusionInpaintPipeline":
            return InpaintingUNet(self.pipe.unet)
        if kind == "StableDiffusionControlNetPipeline":
            return ControlledUNet(self.pipe.unet, self.pipe.controlnet)
        if kind in FLOW:
            return FlowTransformer(self.pipe.transformer, flux=kind == "FluxPipeline")
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
        if self.kind in STABLE_DIFFUSION:
            return self._call_stable_diffusion(a)
        if self.kind in STABLE_DIFFUSION_XL:
            return self._call_stable_diffusion_xl(a)
        if self.kind in FLOW:
            return self._call_flow(a)
        return self._call_unconditional(**a)

    # ---- DDPM / DDIM ----------------------------------------------------------------
    def _call_unconditional(self, batch_size=1, generator=None, num_inference_steps=1000, output_type="pil",
                            return_dict=True, eta=0.0, use_clipped_model_output=None):
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
        from diffusers.utils.torch_utils import randn_tensor

        pipe, unet = self.pipe, self.pipe.unet
        size = unet.config.sample_size
        shape = (batch_size, unet.config.in_channels, *((size, size) if isinstance(size, int) else size))
        options = {}
        if self.kind == "DDIMPipeline":
            options = dict(eta=float(eta), use_clipped_model_output=bool(use_clipped_model_output))
        device = pipe._execution_device
        sampler = self.sampler(num_inference_steps, device, **options)
        # x_T exactly as the pipeline draws it
        image = randn_tensor(shape, generator=generator, device=device, dtype=unet.dtype)
        pipe.scheduler.set_timesteps(num_inference_steps)
        x = sampler.sample(noise=image, seeds=self._seeds(sampler, generator, batch_size), progress=self._progress())
        image = (x.to(unet.dtype) / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = pipe.numpy_to_pil(image)
        pipe.maybe_free_model_hooks()
        return ImagePipelineOutput(images=image) if return_dict else (image,)

    # ---- shared by the Stable Diffusion families --------------------------------------
    def _begin(self, a: dict) -> tuple[bool, int]:
        """Refusals, the pipeline state its properties read; (CFG?, prompts in the batch)."""
        _refuse(a, REFUSED + REFUSED_BY.get(self.kind, ()))
        pipe = self.pipe
        pipe._guidance_scale, pipe._clip_skip = a["guidance_scale"], a.get("clip_skip")
        pipe._guidance_rescale = a.get("guidance_rescale", 0.0)
        pipe._cross_attention_kwargs, pipe._interrupt = None, False
        pipe._denoising_start = pipe._denoising_end = None
        prompt = a.get("prompt")
        batch = (1 if isinstance(prompt, str) else len(prompt)) if prompt is not None else a["prompt_embeds"].shape[0]
        return pipe.do_classifier_free_guidance, batch

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

    # ---- SD 1.x/2.x: text-to-image, img2img, inpainting, ControlNet --------------------
    def _call_stable_diffusion(self, a: dict):
        from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

        pipe, kind = self.pipe, self.kind
        cfg, prompts = self._begin(a)
        default = pipe.unet.config.sample_size * pipe.vae_scale_factor
        height, width = a.get("height") or default, a.get("width") or default
        check = dict(a, height=height, width=width, callback_steps=None,
                     callback_on_step_end_tensor_inputs=list(a["callback_on_step_end_tensor_inputs"]))
        if kind == "StableDiffusionControlNetPipeline":
            check.update({k: a[k] if isinstance(a[k], list) else [a[k]]  # as the pipeline makes them lists
                          for k in ("control_guidance_start", "control_guidance_end")})
        _check_inputs(pipe, check)
        device, n = pipe._execution_device, a["num_images_per_prompt"]
        embeds, negative = pipe.encode_prompt(
            a["prompt"], device, n, cfg, a["negative_prompt"], prompt_embeds=a["prompt_embeds"],
            negative_prompt_embeds=a["negative_prompt_embeds"], lora_scale=None, clip_skip=a["clip_skip"])
        B, dtype = prompts * n, embeds.dtype
        shared = {}  # model inputs the pipeline gives both CFG halves
        if kind == "StableDiffusionControlNetPipeline":
            image = pipe.prepare_image(image=a["image"], width=a["width"], height=a["height"], batch_size=B,
                                       num_images_per_prompt=n, device=device, dtype=pipe.controlnet.dtype,
                                       do_classifier_free_guidance=cfg, guess_mode=False)
            height, width = image.shape[-2:]
            shared["controlnet_cond"] = image[-B:]
        elif kind == "StableDiffusionImg2ImgPipeline":
            image = pipe.image_processor.preprocess(a["image"])
        elif kind == "StableDiffusionInpaintPipeline":
            image = pipe.image_processor.preprocess(a["image"], height=height, width=width).to(torch.float32)
        sampler = self._loop_sampler(a, cfg, device)
        if kind == "StableDiffusionImg2ImgPipeline":
            def prepare(timestep):
                return pipe.prepare_latents(image, timestep, prompts, n, dtype, device, a["generator"])
        elif kind == "StableDiffusionInpaintPipeline":
            def prepare(timestep=None):
                return pipe.prepare_latents(B, pipe.vae.config.latent_channels, height, width, dtype, device,
                                            a["generator"], a["latents"], image=image, timestep=timestep,
                                            is_strength_max=timestep is None, return_noise=True)[0]
        else:
            def prepare():
                return pipe.prepare_latents(B, pipe.unet.config.in_channels, height, width, dtype, device,
                                            a["generator"], a["latents"])
        start = self._start(a, prepare, B, device)
        if kind == "StableDiffusionInpaintPipeline":
            mask_condition = pipe.mask_processor.preprocess(a["mask_image"], height=height, width=width)
            masked = a["masked_image_latents"]
            masked = image * (mask_condition < 0.5) if masked is None else masked
            mask, masked = pipe.prepare_mask_latents(mask_condition, masked, B, height, width, dtype, device,
                                                     a["generator"], cfg)
            shared.update(mask=mask[-B:], masked_image_latents=masked[-B:])
        if kind == "StableDiffusionControlNetPipeline":
            shared.update(self._control_scales(a, sampler, B, device))
        cond = {"encoder_hidden_states": embeds, **shared}
        uncond = {"encoder_hidden_states": negative, **shared} if cfg else None
        latents = self._sample(a, sampler, start, cond, uncond, cfg, B).to(dtype)

        if a["output_type"] != "latent":
            image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False,
                                    generator=a["generator"])[0]
            image, nsfw = pipe.run_safety_checker(image, device, dtype)
        else:
            image, nsfw = latents, None
        denormalize = [True] * image.shape[0] if nsfw is None else [not x for x in nsfw]
        image = pipe.image_processor.postprocess(image, output_type=a["output_type"], do_denormalize=denormalize)
        pipe.maybe_free_model_hooks()
        if not a["return_dict"]:
            return image, nsfw
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=nsfw)

    def _control_scales(self, a: dict, sampler: Sampler, batch: int, device) -> dict:
        """controlnet_conditioning_scale times the control_guidance_start/end window, per model call
        (the pipeline's controlnet_keep), as ControlledUNet's control_scales/control_timesteps."""
        scale, start, end = (a[k] for k in ("controlnet_conditioning_scale", "control_guidance_start",
                                            "control_guidance_end"))
        for name, v in (("controlnet_conditioning_scale", scale), ("control_guidance_start", start),
                        ("control_guidance_end", end)):
            if isinstance(v, list):
                if len(v) != 1:
                    raise ValueError(f"{name} must be one value for one ControlNet, got {v!r}")
        scale, start, end = (v[0] if isinstance(v, list) else v for v in (scale, start, end))
        ts = sampler.timesteps
        R = len(ts)
        keep = [1.0 - float(i / R < start or (i + 1) / R > end) for i in range(R)]
        if len(set(keep)) > 1 and len(set(ts.tolist())) < R:
            raise NotImplementedError("accelerate: control_guidance_start/end with a scheduler that evaluates the "
                                      "model twice at one timestep is not supported")
        scales = torch.tensor([float(scale) * k for k in keep], dtype=torch.float32, device=device)
        return dict(control_scales=scales.expand(batch, R).contiguous(),
                    control_timesteps=ts.to(device, torch.float32).expand(batch, R).contiguous())

    # ---- SDXL: text-to-image and img2img ------------------------------------------------
    def _call_stable_diffusion_xl(self, a: dict):
        from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput

        pipe, img2img = self.pipe, self.kind == "StableDiffusionXLImg2ImgPipeline"
        cfg, prompts = self._begin(a)
        height = width = None  # img2img: from the image's latents
        if not img2img:
            default = pipe.default_sample_size * pipe.vae_scale_factor
            height, width = a["height"] or default, a["width"] or default
        check = dict(a, height=height, width=width, callback_steps=None,
                     callback_on_step_end_tensor_inputs=list(a["callback_on_step_end_tensor_inputs"]))
        _check_inputs(pipe, check)
        device, n = pipe._execution_device, a["num_images_per_prompt"]
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=a["prompt"], prompt_2=a["prompt_2"], device=device, num_images_per_prompt=n,
            do_classifier_free_guidance=cfg, negative_prompt=a["negative_prompt"],
            negative_prompt_2=a["negative_prompt_2"], prompt_embeds=a["prompt_embeds"],
            negative_prompt_embeds=a["negative_prompt_embeds"], pooled_prompt_embeds=a["pooled_prompt_embeds"],
            negative_pooled_prompt_embeds=a["negative_pooled_prompt_embeds"], lora_scale=None,
            clip_skip=a["clip_skip"])
        B, dtype = prompts * n, embeds.dtype
        if img2img:
            image = pipe.image_processor.preprocess(a["image"])
        sampler = self._loop_sampler(a, cfg, device)
        if img2img:
            def prepare(timestep):
                return pipe.prepare_latents(image, timestep, prompts, n, dtype, device, a["generator"], True)
        else:
            def prepare():
                return pipe.prepare_latents(B, pipe.unet.config.in_channels, height, width, dtype, device,
                                            a["generator"], a["latents"])
        start = self._start(a, prepare, B, device)
        if img2img:
            height, width = (s * pipe.vae_scale_factor for s in start["noise"].shape[-2:])
        time_ids, negative_time_ids = self._time_ids(a, height, width, pooled, dtype, B, cfg)
        cond = {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        uncond = {"encoder_hidden_states": negative,
                  "added_cond_kwargs": {"text_embeds": negative_pooled, "time_ids": negative_time_ids}}
        latents = self._sample(a, sampler, start, cond, uncond, cfg, B).to(dtype)
        if a["output_type"] != "latent":
            image = pipe.image_processor.postprocess(self._decode_xl(latents), output_type=a["output_type"])
        else:
            image = latents
        pipe.maybe_free_model_hooks()
        return StableDiffusionXLPipelineOutput(images=image) if a["return_dict"] else (image,)

    def _time_ids(self, a, height, width, pooled, dtype, B, cfg):
        """SDXL's micro-conditioning rows for the cond and the uncond half, laid out as the pipeline lays them."""
        pipe = self.pipe
        original, target = a["original_size"] or (height, width), a["target_size"] or (height, width)
        projection = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None
                      else pipe.text_encoder_2.config.projection_dim)
        if self.kind == "StableDiffusionXLImg2ImgPipeline":
            ids, negative = pipe._get_add_time_ids(
                original, a["crops_coords_top_left"], target, a["aesthetic_score"], a["negative_aesthetic_score"],
                a["negative_original_size"] or original, a["negative_crops_coords_top_left"],
                a["negative_target_size"] or target, dtype=dtype, text_encoder_projection_dim=projection)
            return ids.repeat(B, 1), negative.repeat(B, 1)
        ids = pipe._get_add_time_ids(original, a["crops_coords_top_left"], target, dtype=dtype,
                                     text_encoder_projection_dim=projection)
        negative = ids
        if a["negative_original_size"] is not None and a["negative_target_size"] is not None:
            negative = pipe._get_add_time_ids(a["negative_original_size"], a["negative_crops_coords_top_left"],
                                              a["negative_target_size"], dtype=dtype,
                                              text_encoder_projection_dim=projection)
        if not cfg:
            return ids.repeat(B, 1), None
        # the pipeline repeats [negative; ids] B times: rows alternate, and its uncond half is the first B rows
        rows = torch.cat([negative, ids]).repeat(B, 1)
        return rows[B:], rows[:B]

    def _decode_xl(self, latents: torch.Tensor) -> torch.Tensor:
        """The SDXL pipelines' VAE decode: fp16 VAEs upcast, latents_mean/std, the watermark."""
        pipe = self.pipe
        upcast = pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast
        if upcast:
            pipe.upcast_vae()
            latents = latents.to(next(iter(pipe.vae.post_quant_conv.parameters())).dtype)
        config = pipe.vae.config
        if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
            mean = torch.tensor(config.latents_mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(config.latents_std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        image = pipe.vae.decode(latents, return_dict=False)[0]
        if upcast:
            pipe.vae.to(dtype=torch.float16)
        if pipe.watermark is not None:
            image = pipe.watermark.apply_watermark(image)
        return image

    # ---- SD3 and Flux: transformers on flow-matching schedulers --------------------------
    def _call_flow(self, a: dict):
        """StableDiffusion3Pipeline and FluxPipeline: the velocity model on a flow schedule
        (fastdiff's prediction='flow'); SD3's CFG and Flux's true CFG as one batched call."""
        pipe, flux = self.pipe, self.kind == "FluxPipeline"
        _refuse(a, REFUSED + REFUSED_BY[self.kind])
        default = pipe.default_sample_size * pipe.vae_scale_factor
        height, width = a["height"] or default, a["width"] or default
        check = dict(a, height=height, width=width, callback_on_step_end_tensor_inputs=list(
            a["callback_on_step_end_tensor_inputs"]))
        _check_inputs(pipe, check)
        pipe._guidance_scale, pipe._joint_attention_kwargs, pipe._interrupt = a["guidance_scale"], None, False
        pipe._clip_skip, pipe._current_timestep = a.get("clip_skip"), None
        prompt = a["prompt"]
        prompts = (1 if isinstance(prompt, str) else len(prompt)) if prompt is not None else a["prompt_embeds"].shape[0]
        device, n = pipe._execution_device, a["num_images_per_prompt"]
        B = prompts * n
        if flux:
            cond, uncond, w = self._flux_conditioning(a, device, n)
            latents, image_ids = pipe.prepare_latents(B, pipe.transformer.config.in_channels // 4, height, width,
                                                      cond["encoder_hidden_states"].dtype, device, a["generator"],
                                                      a["latents"])
            ids = dict(img_ids=image_ids.expand(B, *image_ids.shape))
            cond.update(ids)
            if uncond is not None:
                uncond.update(ids)
            if pipe.transformer.config.guidance_embeds:  # the guidance embedding, both halves alike
                guidance = torch.full([B], a["guidance_scale"], device=device, dtype=torch.float32)
                cond["guidance"] = guidance
                if uncond is not None:
                    uncond["guidance"] = guidance
            options = dict(mu=self._flux_mu(latents.shape[1]))
            N = a["num_inference_steps"]
            if not pipe.scheduler.config.get("use_flow_sigmas", False):  # the pipeline's own grid
                options["sigmas"] = tuple(float(v) for v in torch.linspace(1.0, 1 / N, N, dtype=torch.float64))
        else:
            cond, uncond, w = self._sd3_conditioning(a, device, n)
            latents = pipe.prepare_latents(B, pipe.transformer.config.in_channels, height, width,
                                           cond["encoder_hidden_states"].dtype, device, a["generator"], a["latents"])
            options = {} if a["mu"] is None and not pipe.scheduler.config.get("use_dynamic_shifting", False) else dict(
                mu=a["mu"] if a["mu"] is not None else self._sd3_mu(latents))
        sampler = self.sampler(a["num_inference_steps"], device, **options)
        dtype = latents.dtype
        x = sampler.sample(noise=latents / sampler.init_noise_sigma, seeds=self._seeds(sampler, a["generator"], B),
                           cond=cond, uncond=uncond, guidance_scale=w, progress=self._progress())
        pipe._num_timesteps = sampler.num_model_evals
        latents = x.to(dtype)
        if a["output_type"] == "latent":
            image = latents
        else:
            if flux:
                latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
            latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            image = pipe.vae.decode(latents, return_dict=False)[0]
            image = pipe.image_processor.postprocess(image, output_type=a["output_type"])
        pipe.maybe_free_model_hooks()
        if flux:
            from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput as Output
        else:
            from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput as Output
        return Output(images=image) if a["return_dict"] else (image,)

    def _sd3_conditioning(self, a, device, n):
        pipe = self.pipe
        cfg = pipe.do_classifier_free_guidance
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=a["prompt"], prompt_2=a["prompt_2"], prompt_3=a["prompt_3"], negative_prompt=a["negative_prompt"],
            negative_prompt_2=a["negative_prompt_2"], negative_prompt_3=a["negative_prompt_3"],
            do_classifier_free_guidance=cfg, prompt_embeds=a["prompt_embeds"],
            negative_prompt_embeds=a["negative_prompt_embeds"], pooled_prompt_embeds=a["pooled_prompt_embeds"],
            negative_pooled_prompt_embeds=a["negative_pooled_prompt_embeds"], device=device,
            clip_skip=a["clip_skip"], num_images_per_prompt=n, max_sequence_length=a["max_sequence_length"],
            lora_scale=None)
        cond = dict(encoder_hidden_states=embeds, pooled_projections=pooled)
        if not cfg:
            return cond, None, None
        return cond, dict(encoder_hidden_states=negative, pooled_projections=negative_pooled), a["guidance_scale"]

    def _sd3_mu(self, latents) -> float:
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        c, patch = self.pipe.scheduler.config, self.pipe.transformer.config.patch_size
        seq = (latents.shape[-2] // patch) * (latents.shape[-1] // patch)
        return calculate_shift(seq, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                               c.get("base_shift", 0.5), c.get("max_shift", 1.16))

    def _flux_mu(self, seq: int) -> float:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = self.pipe.scheduler.config
        return calculate_shift(seq, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                               c.get("base_shift", 0.5), c.get("max_shift", 1.15))

    def _flux_conditioning(self, a, device, n):
        """Flux's prompt (and, with true CFG, negative prompt) conditioning; its text ids batched."""
        pipe = self.pipe
        has_negative = a["negative_prompt"] is not None or (
            a["negative_prompt_embeds"] is not None and a["negative_pooled_prompt_embeds"] is not None)
        true_cfg = a["true_cfg_scale"] > 1 and has_negative

        def encode(prompt, prompt_2, embeds, pooled):
            embeds, pooled, text_ids = pipe.encode_prompt(
                prompt=prompt, prompt_2=prompt_2, prompt_embeds=embeds, pooled_prompt_embeds=pooled, device=device,
                num_images_per_prompt=n, max_sequence_length=a["max_sequence_length"], lora_scale=None)
            return dict(encoder_hidden_states=embeds, pooled_projections=pooled,
                        txt_ids=text_ids.expand(embeds.shape[0], *text_ids.shape))

        cond = encode(a["prompt"], a["prompt_2"], a["prompt_embeds"], a["pooled_prompt_embeds"])
        if not true_cfg:
            return cond, None, None
        uncond = encode(a["negative_prompt"], a["negative_prompt_2"], a["negative_prompt_embeds"],
                        a["negative_pooled_prompt_embeds"])
        return cond, uncond, a["true_cfg_scale"]
