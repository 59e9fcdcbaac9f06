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

Modules: accelerated.py (AcceleratedPipeline, what every family shares: the sampler cache,
offload detection, seeds, the initial latents, refusals), unconditional.py (DDPM, DDIM),
stable_diffusion.py (SD 1.x/2.x text-to-image, img2img, inpainting, ControlNet),
stable_diffusion_xl.py (SDXL text-to-image, img2img), flow.py (SD3, Flux).
"""
from __future__ import annotations

from .accelerated import AcceleratedPipeline, offload_hooks, seeds_from_generator
from .flow import AcceleratedFlow, FlowTransformer
from .stable_diffusion import AcceleratedStableDiffusion, ControlledUNet, InpaintingUNet
from .stable_diffusion_xl import AcceleratedStableDiffusionXL
from .unconditional import AcceleratedUnconditional

FAMILIES = (AcceleratedUnconditional, AcceleratedStableDiffusion, AcceleratedStableDiffusionXL, AcceleratedFlow)
PIPELINES = tuple(kind for family in FAMILIES for kind in family.KINDS)

__all__ = ["accelerate", "AcceleratedPipeline", "PIPELINES", "seeds_from_generator", "offload_hooks",
           "InpaintingUNet", "ControlledUNet", "FlowTransformer"]


def accelerate(pipe, graph="auto", compile: bool = False) -> AcceleratedPipeline:
    """`pipe` with its denoising loop run by fastdiff; see the module docstring for what is
    accelerated and what is refused. graph: "auto" (a CUDA graph on CUDA), True or False;
    compile: torch.compile the denoiser."""
    kind = type(pipe).__name__
    for family in FAMILIES:
        if kind in family.KINDS:
            return family(pipe, graph=graph, compile=compile)
    raise NotImplementedError(f"accelerate supports {', '.join(PIPELINES)}, not {kind}")
