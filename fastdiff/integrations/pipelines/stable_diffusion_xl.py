"""The Stable Diffusion XL pipelines: text-to-image and img2img, with SDXL's added conditioning
(pooled text embeddings and micro-conditioning time ids) and its VAE decode."""
from __future__ import annotations

import torch

from .accelerated import AcceleratedPipeline, check_inputs, refuse_guidance_embedding


class AcceleratedStableDiffusionXL(AcceleratedPipeline):
    KINDS = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
    REFUSED_BY = {"StableDiffusionXLPipeline": ("denoising_end",),
                  "StableDiffusionXLImg2ImgPipeline": ("denoising_start", "denoising_end", "latents")}

    @staticmethod
    def _check_pipeline(pipe, kind: str) -> None:
        refuse_guidance_embedding(pipe.unet)

    def _call(self, a: dict):
        from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput

        pipe, img2img = self.pipe, self.kind == "StableDiffusionXLImg2ImgPipeline"
        cfg, prompts = self._begin(a)
        height = width = None  # img2img: from the image's latents
        if not img2img:
            default = pipe.default_sample_size * pipe.vae_scale_factor
            height, width = a["height"] or default, a["width"] or default
        check = dict(a, height=height, width=width, callback_steps=None,
                     callback_on_step_end_tensor_inputs=list(a["callback_on_step_end_tensor_inputs"]))
        check_inputs(pipe, check)
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
