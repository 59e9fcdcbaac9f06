"""DDPMPipeline and DDIMPipeline: an unconditional U-Net, x_T drawn as the pipeline draws it."""
from __future__ import annotations

from .accelerated import AcceleratedPipeline


class AcceleratedUnconditional(AcceleratedPipeline):
    KINDS = ("DDPMPipeline", "DDIMPipeline")

    def _call(self, a: dict):
        return self._call_unconditional(**a)

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
