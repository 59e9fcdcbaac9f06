"""accelerate(pipe): a diffusers pipeline with fastdiff's loop gives the pipeline's images.

Tiny random components built from configs (no downloads): a UNet2DModel for DDPM/DDIM, and
for Stable Diffusion a UNet2DConditionModel, an AutoencoderKL, a CLIPTextModel and a
CLIPTokenizer over a generated vocabulary. Stochastic schedulers are compared with
diffusers' per-step noise replaced by fastdiff's counter-based noise for the same seeds.
"""
import json
import string

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from fastdiff import rng  # noqa: E402
from fastdiff.integrations.pipelines import accelerate, seeds_from_generator  # noqa: E402
from fastdiff.rng import STREAM_STEP  # noqa: E402

# diffusers' own deprecation noise (numpy __array__ copy=, deprecated algorithm types)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*",
                                        "ignore::FutureWarning:diffusers.*")
SD_SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def fastdiff_noise(monkeypatch, module: str, seeds):
    """Replace diffusers' per-step torch noise in `module` by fastdiff's (seed, step) noise."""
    step = [0]

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        z = rng.randn(torch.as_tensor(seeds), step[0], STREAM_STEP, tuple(shape[1:]), device=device)
        step[0] += 1
        return z.to(dtype or torch.float32)

    monkeypatch.setattr(f"diffusers.schedulers.{module}.randn_tensor", fake_randn)


def tiny_unet(device="cpu"):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D")).to(device).eval()


def tiny_sd(scheduler, tmp_path, device="cpu", cls=None, in_channels=4, **components):
    """A tiny SD-family pipeline (`cls`, default StableDiffusionPipeline) with a CLIP tokenizer over
    a generated vocabulary; in_channels=9 gives an inpainting U-Net; components adds e.g. a controlnet."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase:
            vocab[c + suffix] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"),
                                           model_max_length=16)
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
        num_hidden_layers=2, vocab_size=len(vocab), max_position_embeddings=16))
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    pipe = (cls or diffusers.StableDiffusionPipeline)(
        vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False, **components).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_vae():
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)


def test_ddpm_pipeline(monkeypatch):
    pipe = diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=diffusers.DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    apipe = accelerate(pipe)
    # the accelerated pipeline draws x_T as DDPMPipeline does, then its seeds from the same generator
    g = torch.Generator().manual_seed(0)
    randn_tensor((2, 3, 8, 8), generator=g, dtype=pipe.unet.dtype)
    fastdiff_noise(monkeypatch, "scheduling_ddpm", seeds_from_generator(g, 2))
    want = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=4, output_type="np")
    got = apipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=4, output_type="np")
    assert got.images.shape == want.images.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(got.images, want.images, atol=2e-5)
    assert not np.allclose(want.images[0], want.images[1])


@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_ddim_pipeline(eta, monkeypatch):
    pipe = diffusers.DDIMPipeline(unet=tiny_unet(), scheduler=diffusers.DDIMScheduler(timestep_spacing="trailing"))
    pipe.set_progress_bar_config(disable=True)
    apipe = accelerate(pipe, graph=False)
    if eta > 0:
        g = torch.Generator().manual_seed(1)
        randn_tensor((2, 3, 8, 8), generator=g, dtype=pipe.unet.dtype)
        fastdiff_noise(monkeypatch, "scheduling_ddim", seeds_from_generator(g, 2))
    kw = dict(batch_size=2, num_inference_steps=6, eta=eta, output_type="pt", return_dict=False)
    (want,) = pipe(generator=torch.Generator().manual_seed(1), **kw)
    (got,) = apipe(generator=torch.Generator().manual_seed(1), **kw)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    images = apipe(generator=torch.Generator().manual_seed(1), batch_size=2, num_inference_steps=6, eta=eta).images
    assert len(images) == 2 and images[0].size == (8, 8)  # PIL, as DDIMPipeline's default output


SD_SCHEDULERS = {
    "ddim": (diffusers.DDIMScheduler, dict(SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
             None),
    "euler": (diffusers.EulerDiscreteScheduler, dict(SD_SCHEDULE, timestep_spacing="leading", steps_offset=1), None),
    "dpmpp-karras": (diffusers.DPMSolverMultistepScheduler, dict(SD_SCHEDULE, use_karras_sigmas=True), None),
    "euler-ancestral": (diffusers.EulerAncestralDiscreteScheduler, dict(SD_SCHEDULE),
                        "scheduling_euler_ancestral_discrete"),
    # PNDMScheduler's default, skip_prk_steps=False: 3 Runge-Kutta steps of 4 U-Net calls, then PLMS
    "pndm-runge-kutta": (diffusers.PNDMScheduler, dict(SD_SCHEDULE, steps_offset=1), None),
}


@pytest.mark.parametrize("name", SD_SCHEDULERS)
def test_stable_diffusion_pipeline_with_cfg(name, tmp_path, monkeypatch):
    cls, config, noise_module = SD_SCHEDULERS[name]
    pipe = tiny_sd(cls(**config), tmp_path)
    apipe = accelerate(pipe)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    if noise_module:
        fastdiff_noise(monkeypatch, noise_module, seeds_from_generator(torch.Generator().manual_seed(3), 2))
    kw = dict(prompt=["a cat", "a dog on a hill"], negative_prompt=["blurry", "dark"], num_inference_steps=5,
              guidance_scale=7.5, latents=latents)
    want = pipe(generator=torch.Generator().manual_seed(3), output_type="latent", **kw).images
    got = apipe(generator=torch.Generator().manual_seed(3), output_type="latent", **kw).images
    torch.testing.assert_close(got, want, atol=1e-4 * float(want.abs().max()), rtol=0)
    if noise_module is None:  # decoded images too, through the pipeline's VAE and postprocessing
        want = pipe(output_type="np", **kw).images
        got = apipe(output_type="np", **kw).images
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_stable_diffusion_embeddings_rescale_and_no_cfg(tmp_path):
    pipe = tiny_sd(diffusers.UniPCMultistepScheduler(**SD_SCHEDULE), tmp_path)
    apipe = accelerate(pipe)
    g = torch.Generator().manual_seed(4)
    embeds, negative = torch.randn(1, 16, 16, generator=g), torch.randn(1, 16, 16, generator=g)
    kw = dict(prompt_embeds=embeds, num_inference_steps=6, output_type="latent")
    for extra in (dict(negative_prompt_embeds=negative, guidance_scale=5.0, guidance_rescale=0.7),
                  dict(guidance_scale=1.0)):  # rescaled CFG; no CFG at all
        want = pipe(generator=torch.Generator().manual_seed(5), **kw, **extra).images
        got = apipe(generator=torch.Generator().manual_seed(5), **kw, **extra).images
        torch.testing.assert_close(got, want, atol=1e-4 * float(want.abs().max()), rtol=0)
    assert len(apipe._samplers) == 3  # default steps (checked at accelerate), then one per guidance_rescale


def test_accelerate_refuses_what_it_cannot_honour(tmp_path):
    pipe = tiny_sd(diffusers.DDIMScheduler(**SD_SCHEDULE), tmp_path)
    apipe = accelerate(pipe)
    with pytest.raises(NotImplementedError, match="callback_on_step_end"):
        apipe("a cat", num_inference_steps=2, callback_on_step_end=lambda *a: {})
    with pytest.raises(NotImplementedError, match="callback"):
        apipe("a cat", num_inference_steps=2, callback=lambda *a: None, callback_steps=1)
    with pytest.raises(NotImplementedError, match="timesteps"):
        apipe("a cat", timesteps=[999, 500])
    pipe.scheduler = diffusers.DEISMultistepScheduler(**SD_SCHEDULE)
    with pytest.raises(NotImplementedError, match="DEISMultistepScheduler"):
        accelerate(pipe)
    with pytest.raises(NotImplementedError, match="accelerate supports"):
        accelerate(diffusers.PNDMPipeline(unet=tiny_unet(), scheduler=diffusers.PNDMScheduler()))


@pytest.mark.cuda
def test_stable_diffusion_graph_on_cuda(tmp_path):
    pipe = tiny_sd(diffusers.DPMSolverMultistepScheduler(**SD_SCHEDULE), tmp_path, device="cuda")
    apipe = accelerate(pipe, graph=True)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)).cuda()
    kw = dict(prompt=["a cat", "a dog"], num_inference_steps=8, latents=latents, output_type="latent")
    for w in (6.0, 3.0):  # the second call replays the captured graph with a new guidance scale
        want = pipe(guidance_scale=w, **kw).images
        got = apipe(guidance_scale=w, **kw).images
        torch.testing.assert_close(got, want, atol=1e-3 * float(want.abs().max()), rtol=0)
    assert max(s.num_cached_graphs for s in apipe._samplers.values()) == 1


@pytest.mark.cuda
def test_ddim_pipeline_graph_on_cuda():
    pipe = diffusers.DDIMPipeline(unet=tiny_unet("cuda"), scheduler=diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    kw = dict(batch_size=3, num_inference_steps=10, output_type="pt", return_dict=False)
    (want,) = pipe(generator=torch.Generator("cuda").manual_seed(0), **kw)
    (got,) = accelerate(pipe, graph=True)(generator=torch.Generator("cuda").manual_seed(0), **kw)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


# ---- SDXL, img2img, inpainting, ControlNet: tiny components, embeddings instead of text encoders ----
def tiny_sdxl(scheduler, cls=None):
    """A tiny SDXL pipeline without text encoders (callers pass prompt and pooled embeddings)."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    pipe = (cls or diffusers.StableDiffusionXLPipeline)(
        vae=tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet,
        scheduler=scheduler, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_embeddings(batch, seed):
    g = torch.Generator().manual_seed(seed)
    return dict(prompt_embeds=torch.randn(batch, 5, 16, generator=g),
                pooled_prompt_embeds=torch.randn(batch, 8, generator=g),
                negative_prompt_embeds=torch.randn(batch, 5, 16, generator=g),
                negative_pooled_prompt_embeds=torch.randn(batch, 8, generator=g))


def assert_same_latents(pipe, apipe, seed=3, **kw):
    want = pipe(generator=torch.Generator().manual_seed(seed), output_type="latent", **kw).images
    got = apipe(generator=torch.Generator().manual_seed(seed), output_type="latent", **kw).images
    torch.testing.assert_close(got, want, atol=2e-4 * float(want.abs().max()), rtol=0)
    return got


SDXL_SCHEDULERS = {  # class, config, the module whose per-step noise a stochastic one draws
    "euler": (diffusers.EulerDiscreteScheduler, dict(SD_SCHEDULE, timestep_spacing="leading", steps_offset=1), None),
    "dpmpp": (diffusers.DPMSolverMultistepScheduler, dict(SD_SCHEDULE, use_karras_sigmas=True), None),
    "euler-ancestral": (diffusers.EulerAncestralDiscreteScheduler, SD_SCHEDULE, "scheduling_euler_ancestral_discrete"),
}


@pytest.mark.parametrize("name", SDXL_SCHEDULERS)
def test_sdxl_pipeline(name, monkeypatch):
    cls, config, noise_module = SDXL_SCHEDULERS[name]
    pipe = tiny_sdxl(cls(**config))
    apipe = accelerate(pipe)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    if noise_module:  # given latents, the generator's first draws are fastdiff's seeds
        fastdiff_noise(monkeypatch, noise_module, seeds_from_generator(torch.Generator().manual_seed(3), 2))
        assert_same_latents(pipe, apipe, guidance_scale=5.0, num_inference_steps=4, latents=latents,
                            **sdxl_embeddings(2, 0))
        return
    kw = dict(num_inference_steps=4, latents=latents, **sdxl_embeddings(2, 0))
    # CFG, with negative micro-conditioning that differs (the pipeline's row layout is kept), and rescale
    got = assert_same_latents(pipe, apipe, guidance_scale=5.0, guidance_rescale=0.5, negative_original_size=(8, 8),
                              negative_target_size=(12, 16), **kw)
    assert_same_latents(pipe, apipe, guidance_scale=1.0, **kw)  # no CFG: cond rows only
    other = assert_same_latents(pipe, apipe, guidance_scale=5.0, original_size=(32, 32), **kw)
    assert not torch.allclose(got, other)  # the time ids reach the U-Net
    if name == "euler":  # decoded images through the pipeline's VAE and postprocessing
        want = pipe(output_type="np", guidance_scale=5.0, **kw).images
        np.testing.assert_allclose(apipe(output_type="np", guidance_scale=5.0, **kw).images, want, atol=1e-4)


def test_img2img_pipelines_start_from_the_noised_image(tmp_path):
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    sd = tiny_sd(diffusers.DDIMScheduler(**SD_SCHEDULE, set_alpha_to_one=False), tmp_path,
                 cls=diffusers.StableDiffusionImg2ImgPipeline)
    for strength, w in ((0.6, 6.0), (1.0, 6.0), (0.6, 1.0)):  # the VAE's sample, then the noise, from the generator
        assert_same_latents(sd, accelerate(sd), prompt=["a cat", "a dog"], image=image, strength=strength,
                            num_inference_steps=5, guidance_scale=w)
    sd.scheduler = diffusers.PNDMScheduler(**SD_SCHEDULE)  # diffusers slices its Runge-Kutta sub-steps by step count
    with pytest.raises(NotImplementedError, match="strength < 1 with PNDMScheduler\\(skip_prk_steps=False\\)"):
        accelerate(sd)(prompt="a cat", image=image[:1], strength=0.6, num_inference_steps=5)
    xl = tiny_sdxl(diffusers.EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="leading", steps_offset=1),
                   cls=diffusers.StableDiffusionXLImg2ImgPipeline)
    axl = accelerate(xl)
    for w in (5.0, 1.0):
        assert_same_latents(xl, axl, image=image, strength=0.5, num_inference_steps=6, guidance_scale=w,
                            **sdxl_embeddings(2, 1))
    with pytest.raises(NotImplementedError, match="denoising_start"):
        axl(image=image, denoising_start=0.5, **sdxl_embeddings(2, 1))
    with pytest.raises(NotImplementedError, match="latents"):
        axl(image=image, latents=torch.zeros(2, 4, 8, 8), **sdxl_embeddings(2, 1))


def test_inpainting_pipeline_with_a_9_channel_unet(tmp_path):
    g = torch.Generator().manual_seed(7)
    image, mask = torch.rand(1, 3, 16, 16, generator=g), (torch.rand(1, 1, 16, 16, generator=g) > 0.5).float()
    pipe = tiny_sd(diffusers.EulerDiscreteScheduler(**SD_SCHEDULE), tmp_path,
                   cls=diffusers.StableDiffusionInpaintPipeline, in_channels=9)
    apipe = accelerate(pipe)
    for strength, w in ((1.0, 7.0), (0.7, 7.0), (1.0, 1.0)):
        assert_same_latents(pipe, apipe, prompt="a cat", image=image, mask_image=mask, strength=strength,
                            num_inference_steps=4, guidance_scale=w)
    unet4 = tiny_sd(diffusers.EulerDiscreteScheduler(**SD_SCHEDULE), tmp_path,
                    cls=diffusers.StableDiffusionInpaintPipeline)
    with pytest.raises(NotImplementedError, match="4-channel U-Net"):
        accelerate(unet4)


def tiny_controlnet():
    torch.manual_seed(1)
    controlnet = diffusers.ControlNetModel(
        in_channels=4, layers_per_block=1, block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16,
        attention_head_dim=2, conditioning_embedding_out_channels=(4, 8),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"))
    with torch.no_grad():  # its output convolutions start at zero, which would hide the residuals
        for p in [*controlnet.controlnet_down_blocks.parameters(), *controlnet.controlnet_mid_block.parameters()]:
            p.normal_(0, 0.3)
    return controlnet


def test_controlnet_pipeline_with_per_step_scales(tmp_path):
    pipe = tiny_sd(diffusers.DPMSolverMultistepScheduler(**SD_SCHEDULE), tmp_path,
                   cls=diffusers.StableDiffusionControlNetPipeline, controlnet=tiny_controlnet())
    apipe = accelerate(pipe)
    control = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    kw = dict(prompt=["a cat", "a dog"], image=control, latents=latents, num_inference_steps=5)
    windowed = assert_same_latents(pipe, apipe, guidance_scale=6.0, controlnet_conditioning_scale=0.7,
                                   control_guidance_start=0.2, control_guidance_end=0.7, **kw)
    full = assert_same_latents(pipe, apipe, guidance_scale=6.0, controlnet_conditioning_scale=0.7,
                               control_guidance_end=[1.0], **kw)  # a list of one, as the pipeline allows
    assert_same_latents(pipe, apipe, guidance_scale=1.0, **kw)
    assert not torch.allclose(windowed, full)  # the per-step window reaches the ControlNet
    assert len({id(s) for s in apipe._samplers.values()}) == 1 + 1  # the default steps, then one for all scales
    with pytest.raises(NotImplementedError, match="guess_mode"):
        apipe(guess_mode=True, **kw)
    multi = diffusers.MultiControlNetModel([tiny_controlnet(), tiny_controlnet()])
    with pytest.raises(NotImplementedError, match="MultiControlNetModel"):
        accelerate(tiny_sd(diffusers.DDIMScheduler(**SD_SCHEDULE), tmp_path,
                           cls=diffusers.StableDiffusionControlNetPipeline, controlnet=multi))


class OffloadHook:
    """What accelerate's add_hook_to_module leaves on a module (`_hf_hook`), with a forward that
    counts calls; accelerate itself is not installed here."""

    def __init__(self, module):
        self.calls, self.forward = 0, module.forward
        module._hf_hook = self

        def hooked(*args, **kwargs):
            self.calls += 1  # accelerate would move the weights to the execution device here
            return self.forward(*args, **kwargs)

        module.forward = hooked


def test_offload_hooks_run_the_loop_without_a_graph(tmp_path):
    pipe = tiny_sd(diffusers.DDIMScheduler(**SD_SCHEDULE), tmp_path)
    apipe = accelerate(pipe)
    assert all(s.graph_mode == "auto" for s in apipe._samplers.values())
    hook = OffloadHook(pipe.unet)
    kw = dict(prompt="a cat", num_inference_steps=3, output_type="latent")
    with pytest.warns(RuntimeWarning, match="unet carries accelerate offload hooks.*graph=False") as caught:
        got = apipe(generator=torch.Generator().manual_seed(0), **kw).images
        apipe(generator=torch.Generator().manual_seed(0), **kw)  # said once
    assert len([w for w in caught if "offload" in str(w.message)]) == 1
    assert [s.graph_mode for s in apipe._samplers.values()].count(False) == 1 and hook.calls == 6
    want = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    torch.testing.assert_close(got, want, atol=1e-4 * float(want.abs().max()), rtol=0)
    with pytest.raises(ValueError, match="graph=True.*offload hooks"):
        accelerate(pipe, graph=True)


@pytest.mark.cuda
def test_model_cpu_offload_on_cuda_runs_without_a_graph(tmp_path):
    pytest.importorskip("accelerate")
    pipe = tiny_sd(diffusers.DPMSolverMultistepScheduler(**SD_SCHEDULE), tmp_path)
    pipe.enable_model_cpu_offload()
    with pytest.warns(RuntimeWarning, match="offload hooks"):  # said when accelerate first builds a sampler
        apipe = accelerate(pipe)
    kw = dict(prompt=["a cat", "a dog"], num_inference_steps=4, output_type="latent",
              latents=torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)).cuda())
    got = apipe(**kw).images
    want = pipe(**kw).images
    torch.testing.assert_close(got, want, atol=1e-3 * float(want.abs().max()), rtol=0)
    assert all(s.num_cached_graphs == 0 for s in apipe._samplers.values())


def test_progress_bar_follows_the_pipelines_config(tmp_path, capsys):
    pipe = tiny_sd(diffusers.DDIMScheduler(**SD_SCHEDULE), tmp_path)
    apipe = accelerate(pipe)
    pipe.set_progress_bar_config(desc="tiny-denoise", disable=False)
    apipe("a cat", num_inference_steps=2, output_type="latent")
    assert "tiny-denoise" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    apipe("a cat", num_inference_steps=2, output_type="latent")
    assert "tiny-denoise" not in capsys.readouterr().err


@pytest.mark.cuda
def test_sdxl_controlnet_and_inpainting_graphs_on_cuda(tmp_path):
    """One captured graph per pipeline; the second call replays it with new conditioning values."""
    sdxl = tiny_sdxl(diffusers.EulerDiscreteScheduler(**SD_SCHEDULE)).to("cuda")
    control = tiny_sd(diffusers.DDIMScheduler(**SD_SCHEDULE), tmp_path, device="cuda",
                      cls=diffusers.StableDiffusionControlNetPipeline, controlnet=tiny_controlnet().cuda())
    inpaint = tiny_sd(diffusers.EulerDiscreteScheduler(**SD_SCHEDULE), tmp_path, device="cuda",
                      cls=diffusers.StableDiffusionInpaintPipeline, in_channels=9)
    g = torch.Generator().manual_seed(10)
    image, mask = torch.rand(2, 3, 16, 16, generator=g).cuda(), (torch.rand(2, 1, 16, 16, generator=g) > 0.5).float()
    latents = torch.randn(2, 4, 8, 8, generator=g).cuda()
    cases = [(sdxl, [dict(guidance_scale=w, **{k: v.cuda() for k, v in sdxl_embeddings(2, s).items()})
                     for w, s in ((5.0, 0), (3.0, 1))]),
             (control, [dict(prompt=["a cat", "a dog"], image=image, guidance_scale=6.0,
                             controlnet_conditioning_scale=c, control_guidance_end=e)
                        for c, e in ((0.7, 0.6), (1.2, 1.0))]),
             (inpaint, [dict(prompt=["a cat", "a dog"], image=image, mask_image=m, guidance_scale=7.0)
                        for m in (mask.cuda(), 1 - mask.cuda())])]
    for pipe, calls in cases:
        apipe = accelerate(pipe, graph=True)
        for kw in calls:
            kw = dict(kw, num_inference_steps=4, output_type="latent")
            if pipe is not inpaint:
                kw["latents"] = latents
            want = pipe(generator=torch.Generator("cuda").manual_seed(0), **kw).images
            got = apipe(generator=torch.Generator("cuda").manual_seed(0), **kw).images
            torch.testing.assert_close(got, want, atol=1e-3 * float(want.abs().max()), rtol=0)
        assert sum(s.num_cached_graphs for s in apipe._samplers.values()) == 1


# ---- SD3 and Flux: transformers on flow-matching schedulers -----------------------------
def tiny_flow_vae():
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
        shift_factor=0.0609, scaling_factor=1.5035)


def tiny_sd3(scheduler):
    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=tiny_flow_vae(), text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux(guidance_embeds=True):
    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                          base_image_seq_len=256, max_image_seq_len=4096)
    pipe = diffusers.FluxPipeline(transformer=transformer, scheduler=scheduler, vae=tiny_flow_vae(), text_encoder=None,
                                  tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("scheduler", [diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3's
                                       diffusers.FlowMatchHeunDiscreteScheduler(shift=3.0)],
                         ids=["euler", "heun"])
def test_sd3_pipeline(scheduler):
    pipe = tiny_sd3(scheduler)
    apipe = accelerate(pipe)
    kw = dict(num_inference_steps=4, **sdxl_embeddings(2, 11))
    for w in (5.0, 1.0):  # CFG; none
        assert_same_latents(pipe, apipe, guidance_scale=w, **kw)
    want = pipe(generator=torch.Generator().manual_seed(3), output_type="np", **kw).images
    np.testing.assert_allclose(apipe(generator=torch.Generator().manual_seed(3), output_type="np", **kw).images,
                               want, atol=1e-4)
    with pytest.raises(NotImplementedError, match="skip_guidance_layers"):
        apipe(skip_guidance_layers=[0], **kw)


def test_flux_pipeline_guidance_embedding_packed_latents_and_true_cfg():
    pipe = tiny_flux()
    apipe = accelerate(pipe)
    g = torch.Generator().manual_seed(12)
    embeds, pooled = torch.randn(2, 5, 16, generator=g), torch.randn(2, 8, generator=g)
    kw = dict(height=16, width=16, num_inference_steps=4, prompt_embeds=embeds, pooled_prompt_embeds=pooled)
    plain = assert_same_latents(pipe, apipe, guidance_scale=3.5, **kw)  # the guidance embedding, no CFG
    assert plain.shape == (2, 16, 16)  # packed: (16 / 2 / 2)^2 tokens of 4 x 2 x 2 channels
    assert not torch.allclose(plain, assert_same_latents(pipe, apipe, guidance_scale=1.5, **kw))
    assert_same_latents(pipe, apipe, guidance_scale=3.5, true_cfg_scale=4.0, negative_prompt_embeds=embeds.flip(0),
                        negative_pooled_prompt_embeds=pooled.flip(0), **kw)  # true CFG: one batched call
    want = pipe(generator=torch.Generator().manual_seed(3), output_type="np", **kw).images
    np.testing.assert_allclose(apipe(generator=torch.Generator().manual_seed(3), output_type="np", **kw).images,
                               want, atol=1e-4)
    schnell = tiny_flux(guidance_embeds=False)  # no guidance embedding: guidance=None passes through
    assert_same_latents(schnell, accelerate(schnell), **kw)


@pytest.mark.cuda
def test_sd3_and_flux_graphs_on_cuda():
    """One captured graph each; the second call replays it with new embeddings and scales."""
    sd3, flux = tiny_sd3(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)).to("cuda"), tiny_flux().to("cuda")
    e = [{k: v.cuda() for k, v in sdxl_embeddings(2, s).items()} for s in (0, 1)]
    cases = [(sd3, [dict(guidance_scale=5.0, **e[0]), dict(guidance_scale=3.0, **e[1])]),
             (flux, [dict(height=16, width=16, guidance_scale=w, true_cfg_scale=2.0, **x) for w, x in ((3.5, e[0]),
                                                                                                        (2.0, e[1]))])]
    for pipe, calls in cases:
        apipe = accelerate(pipe, graph=True)
        for kw in calls:
            kw = dict(kw, num_inference_steps=4, output_type="latent")
            want = pipe(generator=torch.Generator("cuda").manual_seed(0), **kw).images
            got = apipe(generator=torch.Generator("cuda").manual_seed(0), **kw).images
            torch.testing.assert_close(got, want, atol=1e-3 * float(want.abs().max()), rtol=0)
        assert sum(s.num_cached_graphs for s in apipe._samplers.values()) == 1
