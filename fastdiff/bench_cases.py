"""The cases fastdiff's benchmarks time (benchmarks/ and `fastdiff bench` build from here).

    step   everything between two model calls. fastdiff: one executor row (torch ops; the
           fused Triton kernel launched eagerly, or replayed from a CUDA graph). diffusers:
           its pipelines' CFG combine (chunk, u + w(c - u)), scheduler.step, then the next
           model input (torch.cat for CFG, scale_model_input).
    loop   a whole sampling loop over one model: fastdiff.Sampler (eager, graph, graph +
           compile), a diffusers-style eager loop, and the model alone (eager; replayed in
           one CUDA graph: the limit, since a sampler cannot beat its own model calls).

Bytes moved (for GB/s) are what the step must move, each in its implementation's dtypes:
read x, the model output (both halves with CFG) and the history read; write x, the
history push and the next model input (both halves with CFG). Noise is not counted: the
fused kernel draws it in registers.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .runners import capture_graph

STEP_SHAPES = ((1, 4, 64, 64), (16, 4, 64, 64), (8, 4, 128, 128), (64, 3, 32, 32))
BANDWIDTH_SHAPE = (256, 4, 128, 128)  # 64 MiB per float32 tensor: the copy-bandwidth target's size
SCHEDULERS = {  # fastdiff solver -> the diffusers scheduler that computes the same step
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
}
CLIPS = ("ddpm", "ddim")  # diffusers' DDPM/DDIM default to clip_sample=True; ours match
STEP_GRID = 50  # per-step cases time a middle row of a 50-step table
STEP_CFG_SCALE = 7.5
GRAPH_STEPS = 20  # fused steps per captured graph in the per-step case (amortizes replay launch)


# ---- per-step cases -------------------------------------------------------------------
@dataclass
class StepCase:
    run: Callable[[], object]  # one call = steps_per_call steps
    bytes_moved: int  # per step
    steps_per_call: int = 1
    keep: list = field(default_factory=list)  # buffers and graphs that must outlive run


def _step_table(solver: str, device, model_dtype, backend: str = "torch"):
    from .sampler import Sampler
    from .schedules import Schedule

    sampler = Sampler(lambda x, t: x, Schedule.linear(), solver=solver, steps=STEP_GRID,
                      clip_sample=solver in CLIPS, backend=backend, device=device, dtype=model_dtype)
    return sampler.table, sampler.threshold


def step_bytes(table, row: int, numel: int, cfg: bool, state_size: int, model_size: int) -> int:
    """Bytes one row must move for numel = B * prod(S) elements (see the module docstring)."""
    from .solvers.table import history_slots

    slots, dest = history_slots(table)[row]
    G = 2 if cfg else 1
    state_rw = 2 + (2 if table.separate_point else 0) + len(slots) + (dest is not None)
    model_rw = G + (G if row + 1 < table.rows else 0)
    return numel * (state_rw * state_size + model_rw * model_size)


def fastdiff_step(solver: str, shape, cfg: bool, device, model_dtype, backend: str = "torch",
                  graph: bool = False) -> StepCase:
    """One middle row of `solver`'s table on static buffers; graph=True replays GRAPH_STEPS
    launches of it from one CUDA graph (the kernel's own time, as inside the sampling loop)."""
    from .executors import EXECUTORS
    from .loop import LoopBuffers

    device = torch.device(device)
    table, threshold = _step_table(solver, device, model_dtype, backend)
    B, S = shape[0], tuple(shape[1:])
    row = table.rows // 2
    bufs = LoopBuffers(table, B, S, model_dtype, device, cfg)
    for h in bufs.history:
        h.normal_()
    cfg_w = torch.full((table.rows, B), STEP_CFG_SCALE, device=device) if cfg else None
    bufs.load(torch.randn(shape, device=device), torch.arange(B, device=device), cfg_w, {}, float(table.c_in[0]))
    executor = EXECUTORS[backend](table, bufs, threshold, 0.0)
    out = torch.randn(((2 if cfg else 1) * B, *S), device=device).to(model_dtype)  # [G*B, *S]
    nbytes = step_bytes(table, row, math.prod(shape), cfg, 4, out.element_size())
    if not graph:
        return StepCase(lambda: executor.step(row, out), nbytes, keep=[bufs, out])
    def steps(n):
        for _ in range(n):
            executor.step(row, out)

    g, _ = capture_graph(lambda: steps(GRAPH_STEPS), warmup=lambda: steps(3))  # compile, autotune first
    return StepCase(g.replay, nbytes, GRAPH_STEPS, keep=[bufs, out, executor, g])  # executor.coef: read by g


def diffusers_scheduler(solver: str, **config):
    import diffusers

    name = config.pop("_class_name", SCHEDULERS[solver])  # a case may name its scheduler (flow matching)
    if solver in ("ddim", "dpmpp_2m") and name == SCHEDULERS[solver]:
        config.setdefault("timestep_spacing", "trailing")
    if solver == "dpmpp_2m":
        config.setdefault("algorithm_type", "dpmsolver++")
    return getattr(diffusers, name)(**config)


def diffusers_step(solver: str, shape, cfg: bool, device, dtype) -> StepCase:
    """diffusers' update between two model calls, as its pipelines write it (module docstring);
    latents in the model's dtype, as the pipelines keep them."""
    device = torch.device(device)
    sch = diffusers_scheduler(solver)
    sch.set_timesteps(STEP_GRID, device=device)
    i = len(sch.timesteps) // 2
    t, t_next = sch.timesteps[i], sch.timesteps[i + 1]
    B = shape[0]
    x = torch.randn(shape, device=device).to(dtype)
    out = torch.randn(((2 if cfg else 1) * B, *shape[1:]), device=device).to(dtype)
    stateful = hasattr(sch, "_step_index")  # Euler/DPM keep a step counter; pin it to row i
    if stateful:
        sch._step_index = i
    sch.scale_model_input(x, t)  # as a pipeline does before its first step (Euler checks)

    def run():
        noise_pred = out
        if cfg:
            u, c = noise_pred.chunk(2)
            noise_pred = u + STEP_CFG_SCALE * (c - u)
        if stateful:
            sch._step_index = i
        latents = sch.step(noise_pred, t, x, return_dict=False)[0]
        model_in = torch.cat([latents] * 2) if cfg else latents
        return sch.scale_model_input(model_in, t_next)

    table, _ = _step_table(solver, "cpu", dtype)
    nbytes = step_bytes(table, table.rows // 2, math.prod(shape), cfg, x.element_size(), x.element_size())
    return StepCase(run, nbytes, keep=[sch, x, out])


# ---- whole-loop cases ---------------------------------------------------------------------
@dataclass
class LoopModel:
    """A model with everything both loops need; `model(x, t, **cond)` is what fastdiff samples."""

    name: str  # e.g. "cifar10-b1-fp32"
    model: torch.nn.Module
    diffusers_call: Callable  # (x, t as the scheduler lists it) -> output, as a pipeline calls it
    schedule: object  # fastdiff.Schedule
    scheduler_config: dict  # the diffusers scheduler computing the same solver
    solver: str
    steps: int
    batch: int
    sample_shape: tuple
    dtype: torch.dtype
    cond: dict | None = None
    uncond: dict | None = None
    guidance_scale: float | None = None
    sampler_options: dict = field(default_factory=dict)
    note: str = ""

    @property
    def cfg(self) -> bool:
        return self.uncond is not None

    @property
    def model_batch(self) -> int:
        return self.batch * (2 if self.cfg else 1)

    def model_kwargs(self) -> dict:
        if not self.cfg:
            return dict(self.cond or {})
        return {k: torch.cat([self.uncond[k], v]) for k, v in self.cond.items()}

    def info(self) -> dict:
        return {"case": self.name, "model": self.name.split("-b")[0], "batch": self.batch, "steps": self.steps,
                "dtype": str(self.dtype).replace("torch.", ""), "cfg": self.cfg, "solver": self.solver,
                "scheduler": self.scheduler_config.get("_class_name", SCHEDULERS[self.solver]),
                "sample_shape": list(self.sample_shape), "note": self.note}


def digits_model(device, batch: int = 8, steps: int = 20, guidance: float = 3.0) -> LoopModel:
    """The embedded digits model, class-conditional with CFG as `fastdiff sample`."""
    from .models.pretrained import load_pretrained

    device = torch.device(device)
    loaded = load_pretrained("digits", device=device)
    model, schedule, meta, note = loaded.model, loaded.schedule, loaded.metadata, "pretrained weights"
    spec = meta.get("schedule", {})
    betas = ({"beta_schedule": "squaredcos_cap_v2"} if spec.get("name") == "cosine" else
             {"beta_schedule": "linear", "beta_start": spec.get("beta_start", 1e-4),
              "beta_end": spec.get("beta_end", 0.02)})
    labels = torch.arange(batch, device=device) % meta["num_classes"]
    null = torch.full_like(labels, meta.get("null_class", meta["num_classes"]))
    both = torch.cat([null, labels])

    def call(x, t):  # diffusers' class-conditional pipelines expand t to the batch
        return model(x, t.expand(x.shape[0]).float(), class_labels=both)

    return LoopModel(f"digits-b{batch}-fp32", model, call, schedule,
                     {**betas, "num_train_timesteps": schedule.num_train_timesteps}, "dpmpp_2m", steps, batch,
                     tuple(meta["image_shape"]), torch.float32, {"class_labels": labels}, {"class_labels": null},
                     guidance, note=note)


CIFAR10_UNET = {  # google/ddpm-cifar10-32
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "block_out_channels": (128, 256, 256, 256),
    "layers_per_block": 2, "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "norm_eps": 1e-6}
SD15_UNET = {  # Stable Diffusion 1.5's UNet2DConditionModel (its block types are diffusers' defaults)
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2, "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")}


def _diffusers_unet(cls_name: str, config: dict, device, dtype):
    import diffusers

    from .models.adapters import adapt

    with torch.device(device):  # initialise on the device: random weights, timing only
        unet = getattr(diffusers, cls_name)(**config)
    return adapt(unet.to(dtype).eval().requires_grad_(False)), unet


def cifar10_model(device, batch: int = 1, dtype=torch.float32, steps: int = 50) -> LoopModel:
    """The DDPM-CIFAR10-shaped UNet2DModel (35.7M), random weights; DDPM as DDPMPipeline."""
    from .schedules import Schedule

    model, unet = _diffusers_unet("UNet2DModel", CIFAR10_UNET, device, dtype)
    def call(x, t):  # as DDPMPipeline calls it
        return unet(x, t, return_dict=False)[0]

    name = f"cifar10-b{batch}-{str(dtype).replace('torch.float', 'fp')}"
    return LoopModel(name, model, call, Schedule.linear(), {"timestep_spacing": "leading"}, "ddpm", steps, batch,
                     (3, 32, 32), dtype, sampler_options={"clip_sample": True, "spacing": "leading"},
                     note="UNet2DModel, google/ddpm-cifar10-32 config, random weights")


def sd15_model(device, batch: int = 1, dtype=torch.float16, steps: int = 25, guidance: float = 7.5) -> LoopModel:
    """The SD1.5-shaped UNet2DConditionModel (860M), random weights and text embeddings, CFG."""
    from .schedules import Schedule

    model, unet = _diffusers_unet("UNet2DConditionModel", SD15_UNET, device, dtype)
    cond = {"encoder_hidden_states": torch.randn(batch, 77, 768, device=device).to(dtype)}
    uncond = {"encoder_hidden_states": torch.randn(batch, 77, 768, device=device).to(dtype)}
    both = torch.cat([uncond["encoder_hidden_states"], cond["encoder_hidden_states"]])
    def call(x, t):  # as StableDiffusionPipeline calls it, prompt embeddings [uncond; cond]
        return unet(x, t, encoder_hidden_states=both, return_dict=False)[0]

    name = f"sd15-b{batch}-{str(dtype).replace('torch.float', 'fp')}"
    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    return LoopModel(name, model, call, Schedule.scaled_linear(), config, "dpmpp_2m", steps, batch, (4, 64, 64),
                     dtype, cond, uncond, guidance, note="UNet2DConditionModel, SD1.5 config, random weights")


class NoopDenoiser(torch.nn.Module):
    """Returns (a copy of) its input: what is left of a loop is the sampler's own work."""

    def forward(self, x, t, **cond):
        return x.clone()


def flow_model(device, batch: int = 8, steps: int = 28, sample_shape=(16, 32, 32)) -> LoopModel:
    """A flow-matching loop over a no-op velocity model: euler on Schedule.flow_matching(shift=3)
    against FlowMatchEulerDiscreteScheduler (SD3's scheduler and step count), so what is timed is
    each sampler's own work."""
    from .schedules import Schedule

    return LoopModel(f"flow-noop-b{batch}-fp32", NoopDenoiser(), lambda x, t: x.clone(),
                     Schedule.flow_matching(shift=3.0),
                     {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0},
                     "euler", steps, batch, tuple(sample_shape), torch.float32,
                     sampler_options={"prediction": "flow", "dtype": torch.float32},
                     note="no-op velocity model: the samplers' own work")


def without_model(lm: LoopModel) -> LoopModel:
    """The same loop with the model replaced by a no-op: times the sampler's own overhead
    directly, which a shared machine's noise hides when it is a percent of the model's time."""
    return dataclasses.replace(lm, name=f"{lm.name}-noop", model=NoopDenoiser(),
                               diffusers_call=lambda x, t: x.clone(),
                               sampler_options={**lm.sampler_options, "dtype": lm.dtype})


def with_compiled_model_in_diffusers_loop(lm: LoopModel) -> LoopModel:
    """The case whose diffusers-style loop calls compile_model(model) the way fastdiff calls a
    model (x, t [B] float, **kwargs): against Sampler(compile=True), the two loops then differ
    only in the sampler."""
    from .runners import compile_model

    compiled, kwargs = compile_model(lm.model), lm.model_kwargs()
    return dataclasses.replace(lm, diffusers_call=lambda x, t: compiled(x, t.expand(x.shape[0]).float(), **kwargs))


def fastdiff_loop(lm: LoopModel, device, **options):
    """(sampler, run): run() is one `sampler.sample(...)`, exactly as a user calls it."""
    from .sampler import Sampler

    sampler = Sampler(lm.model, lm.schedule, solver=lm.solver, steps=lm.steps, device=device,
                      **{**lm.sampler_options, **options})
    shape = (lm.batch, *lm.sample_shape)
    seeds = list(range(lm.batch))

    def run():
        return sampler.sample(shape=shape, seeds=seeds, cond=lm.cond, uncond=lm.uncond,
                              guidance_scale=lm.guidance_scale if lm.cfg else None,
                              progress=False)  # a terminal's bar is not the sampler's cost

    return sampler, run


def diffusers_loop(lm: LoopModel, device) -> Callable[[], torch.Tensor]:
    """The loop diffusers pipelines run: set_timesteps, then per step torch.cat for CFG,
    scale_model_input, the model, the CFG combine and scheduler.step; eager."""
    sch = diffusers_scheduler(lm.solver, **lm.scheduler_config)
    shape = (lm.batch, *lm.sample_shape)
    scale = getattr(sch, "scale_model_input", lambda x, t: x)  # FlowMatch schedulers have none

    @torch.no_grad()
    def run():
        sch.set_timesteps(lm.steps, device=device)
        latents = torch.randn(shape, device=device, dtype=lm.dtype) * getattr(sch, "init_noise_sigma", 1.0)
        for t in sch.timesteps:
            model_in = torch.cat([latents] * 2) if lm.cfg else latents
            model_in = scale(model_in, t)
            noise_pred = lm.diffusers_call(model_in, t)
            if lm.cfg:
                u, c = noise_pred.chunk(2)
                noise_pred = u + lm.guidance_scale * (c - u)
            latents = sch.step(noise_pred, t, latents, return_dict=False)[0]
        return latents

    return run


def model_alone(lm: LoopModel, device, graph: bool = False,
                compile: bool = False) -> tuple[Callable[[], object], int]:
    """(run, model calls per run): one eager call on the loop's batch; or, with graph=True,
    all `steps` calls replayed from one CUDA graph (the limit for a whole loop). compile=True
    calls the model as Sampler(compile=True) does (fastdiff.runners.compile_model): the limit of
    a compiled loop; the first call (on CUDA the warm-up before capture) compiles."""
    device = torch.device(device)
    x = torch.randn((lm.model_batch, *lm.sample_shape), device=device).to(lm.dtype)
    t = torch.full((lm.model_batch,), 500.0, device=device)
    kwargs = lm.model_kwargs()
    model = lm.model
    if compile:
        from .runners import compile_model

        model = compile_model(model)
    if not graph:
        return torch.no_grad()(lambda: model(x, t, **kwargs)), 1
    @torch.no_grad()
    def calls(n):
        for _ in range(n):
            model(x, t, **kwargs)

    g, _ = capture_graph(lambda: calls(lm.steps), warmup=lambda: calls(3))

    def run():  # holds x, t, kwargs and g: the captured buffers must outlive the graph
        g.replay()
        return x, t, kwargs

    return run, lm.steps


# ---- pipelines: a diffusers pipeline and accelerate(pipeline), end to end -----------------
@dataclass
class PipelineCase:
    """A tiny random-weight pipeline and the keywords of one call (embeddings, no tokenizer)."""
    name: str
    pipe: object
    call: dict
    info: dict = field(default_factory=dict)


def tiny_sdxl_pipeline(device, batch: int = 2, steps: int = 10, size: int = 16) -> PipelineCase:
    """StableDiffusionXLPipeline with its default EulerDiscreteScheduler: a 2-block U-Net with SDXL's
    text-time conditioning, a 2-block VAE, CFG 5 over random prompt/pooled embeddings; latents size^2."""
    import diffusers

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=2 * size)
    scheduler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                 timestep_spacing="leading", steps_offset=1)
    pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                               tokenizer_2=None, unet=unet, scheduler=scheduler,
                                               add_watermarker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    r = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    call = dict(prompt_embeds=r(batch, 8, 32), pooled_prompt_embeds=r(batch, 16),
                negative_prompt_embeds=r(batch, 8, 32), negative_pooled_prompt_embeds=r(batch, 16),
                guidance_scale=5.0, num_inference_steps=steps, output_type="np")
    info = dict(case=f"tiny-sdxl-b{batch}", pipeline="StableDiffusionXLPipeline", scheduler="EulerDiscreteScheduler",
                steps=steps, batch=batch, cfg=True, latent=[4, size, size])
    return PipelineCase("sdxl", pipe, call, info)


def tiny_flux_pipeline(device, batch: int = 2, steps: int = 10, size: int = 16) -> PipelineCase:
    """FluxPipeline with its dynamically shifted FlowMatchEulerDiscreteScheduler: a one double-, one
    single-stream-block transformer with the guidance embedding (3.5), a 2-block VAE, random
    prompt/pooled embeddings; latents size^2, packed into (size / 2)^2 tokens."""
    import diffusers

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
        axes_dims_rope=(4, 4, 8))
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=2 * size,
        shift_factor=0.0609, scaling_factor=1.5035)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                          base_image_seq_len=256, max_image_seq_len=4096)
    pipe = diffusers.FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=None,
                                  tokenizer=None, text_encoder_2=None, tokenizer_2=None).to(device)
    pipe.set_progress_bar_config(disable=True)
    r = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    call = dict(prompt_embeds=r(batch, 8, 32), pooled_prompt_embeds=r(batch, 16), guidance_scale=3.5,
                height=2 * size, width=2 * size, num_inference_steps=steps, output_type="np")
    info = dict(case=f"tiny-flux-b{batch}", pipeline="FluxPipeline", scheduler="FlowMatchEulerDiscreteScheduler",
                steps=steps, batch=batch, cfg=False, latent=[4, size, size])
    return PipelineCase("flux", pipe, call, info)


PIPELINE_CASES = {"sdxl": tiny_sdxl_pipeline, "flux": tiny_flux_pipeline}
