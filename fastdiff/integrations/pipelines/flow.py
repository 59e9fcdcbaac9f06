"""StableDiffusion3Pipeline and FluxPipeline: transformers on flow-matching schedulers. The
transformer's timestep scale and Flux's position ids are applied inside the model call
(FlowTransformer), so a captured graph holds them."""
from __future__ import annotations

import torch
from torch import nn

from .accelerated import AcceleratedPipeline, check_inputs


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


class AcceleratedFlow(AcceleratedPipeline):
    KINDS = ("StableDiffusion3Pipeline", "FluxPipeline")
    REFUSED_BY = {"StableDiffusion3Pipeline": ("skip_guidance_layers",),
                  "FluxPipeline": ("negative_ip_adapter_image", "negative_ip_adapter_image_embeds")}

    def _model(self) -> nn.Module:
        return FlowTransformer(self.pipe.transformer, flux=self.kind == "FluxPipeline")

    def _call(self, a: dict):
        """StableDiffusion3Pipeline and FluxPipeline: the velocity model on a flow schedule
        (fastdiff's prediction='flow'); SD3's CFG and Flux's true CFG as one batched call."""
        pipe, flux = self.pipe, self.kind == "FluxPipeline"
        self._refuse_unsupported(a)
        default = pipe.default_sample_size * pipe.vae_scale_factor
        height, width = a["height"] or default, a["width"] or default
        check = dict(a, height=height, width=width, callback_on_step_end_tensor_inputs=list(
            a["callback_on_step_end_tensor_inputs"]))
        check_inputs(pipe, check)
        pipe._guidance_scale, pipe._joint_attention_kwargs, pipe._interrupt = a["guidance_scale"], None, False
        pipe._clip_skip, pipe._current_timestep = a.get("clip_skip"), None
        prompts = self._prompt_count(a)
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
