"""The Stable Diffusion 1.x/2.x pipelines: text-to-image, img2img, 9-channel inpainting and
ControlNet. Inpainting's extra input channels and the ControlNet's residuals are computed inside
the model call (InpaintingUNet, ControlledUNet), so a captured graph holds them."""
from __future__ import annotations

import torch
from torch import nn

from ...sampler import Sampler
from .accelerated import AcceleratedPipeline, check_inputs, refuse_guidance_embedding


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


class AcceleratedStableDiffusion(AcceleratedPipeline):
    KINDS = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
             "StableDiffusionControlNetPipeline")
    REFUSED_BY = {"StableDiffusionInpaintPipeline": ("padding_mask_crop",),
                  "StableDiffusionControlNetPipeline": ("guess_mode",)}

    @staticmethod
    def _check_pipeline(pipe, kind: str) -> None:
        unet = pipe.unet
        refuse_guidance_embedding(unet)
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

    def _model(self) -> nn.Module:
        if self.kind == "StableDiffusionInpaintPipeline":
            return InpaintingUNet(self.pipe.unet)
        if self.kind == "StableDiffusionControlNetPipeline":
            return ControlledUNet(self.pipe.unet, self.pipe.controlnet)
        return self.pipe.unet

    def _call(self, a: dict):
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
        check_inputs(pipe, check)
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
