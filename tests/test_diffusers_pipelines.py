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
from fastdiff.integrations.diffusers import accelerate, seeds_from_generator  # noqa: E402
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


def tiny_sd(scheduler, tmp_path, device="cpu"):
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
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


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
    pipe.scheduler = diffusers.PNDMScheduler(**SD_SCHEDULE)  # PRK warm-up steps: not a fastdiff table
    with pytest.raises(NotImplementedError, match="PNDMScheduler with skip_prk_steps=False"):
        apipe("a cat", num_inference_steps=4)
    with pytest.raises(NotImplementedError, match="skip_prk_steps"):
        accelerate(pipe)
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
