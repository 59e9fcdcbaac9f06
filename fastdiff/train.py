"""`fastdiff train`: a class-conditional U-Net on scikit-learn's digits, in minutes on a CPU.

The epsilon loss of DDPM (Ho et al. 2020, Alg. 1) with the library's own forward noising,
label dropout to the null class for classifier-free guidance (Ho & Salimans 2022), an EMA
of the weights (what ships), AdamW with linear warmup then cosine decay. Writes the EMA
model (safetensors + JSON), the online weights beside it (online.safetensors: what the EMA
is measured against at equal training time), loss.csv and loss.png into --out.
"""
from __future__ import annotations

import argparse
import csv
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .models.digits import DATA_RANGE, NUM_CLASSES, load_digits
from .models.io import load_model, save_model
from .models.unet import UNet, UNetConfig
from .noising import add_noise
from .schedules import Schedule


@dataclass
class TrainConfig:
    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    label_dropout: float = 0.1  # probability a label becomes the null class
    image_size: int = 16
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (8,)
    schedule: str = "linear"
    num_train_timesteps: int = 1000
    seed: int = 0
    max_minutes: float | None = 25.0  # stop early (and save) then: `fastdiff train` stays under 30 min
    save_every: int = 250  # also save the EMA this often, so an interrupted run leaves weights
    init: str | None = None  # continue from a saved model (its architecture wins over the fields above)


@dataclass
class TrainResult:
    model: UNet  # the EMA model, eval mode
    schedule: Schedule
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    metadata: dict = field(default_factory=dict)


def schedule_spec(cfg: TrainConfig) -> dict:
    """How to rebuild the schedule: stored in the model's JSON metadata."""
    if cfg.schedule not in ("linear", "cosine"):
        raise ValueError(f"schedule must be one of linear, cosine; got {cfg.schedule!r}")
    spec = {"name": cfg.schedule, "num_train_timesteps": cfg.num_train_timesteps}
    if cfg.schedule == "linear":
        spec.update(beta_start=1e-4, beta_end=0.02)
    return spec


def build_schedule(spec: dict) -> Schedule:
    kw = {k: v for k, v in spec.items() if k != "name"}
    return Schedule.named(spec["name"], **kw)


def learning_rate(cfg: TrainConfig, step: int, seconds: float = 0.0) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak. Progress is the larger of the
    step fraction and the time fraction of max_minutes, so a slow (shared) CPU still anneals."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.max_minutes:
        progress = max(progress, seconds / (60.0 * cfg.max_minutes))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def ema_update(ema: UNet, model: UNet, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def check_finite_weights(model: torch.nn.Module, step: int, lr: float) -> None:
    """Never save (or return) a model whose weights overflowed."""
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise FloatingPointError(f"train: the weights became non-finite by step {step} ({bad[0]} and "
                                 f"{len(bad) - 1} more; lr {lr:.3g}): lower --lr")


def model_metadata(cfg: TrainConfig, extra: dict) -> dict:
    return {
        "dataset": "sklearn digits (8x8, upsampled bilinearly)",
        "image_shape": [1, cfg.image_size, cfg.image_size],
        "num_classes": NUM_CLASSES,
        "null_class": NUM_CLASSES,
        "data_range": list(DATA_RANGE),
        "prediction": "epsilon",
        "schedule": schedule_spec(cfg),
        "training": {**asdict(cfg), **extra},
    }


def write_loss_curve(losses: list[float], lrs: list[float], times: list[float], out_dir: Path) -> None:
    """loss.csv always; loss.png when matplotlib is installed."""
    with open(out_dir / "loss.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "lr", "seconds"])
        for i, (loss, lr, s) in enumerate(zip(losses, lrs, times)):
            w.writerow([i, f"{loss:.6f}", f"{lr:.3e}", f"{s:.2f}"])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    window = 25  # the per-batch loss is noisy: also plot its trailing mean
    total = [0.0]
    for loss in losses:
        total.append(total[-1] + loss)
    smooth = [(total[i + 1] - total[max(0, i + 1 - window)]) / min(i + 1, window) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(losses, alpha=0.3, lw=0.8, label="per batch")
    ax.plot(smooth, lw=1.5, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("epsilon MSE")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("fastdiff train: digits")
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=100)
    plt.close(fig)


def unet_for(cfg: TrainConfig) -> UNet:
    """A new class-conditional U-Net with cfg's architecture."""
    return UNet(UNetConfig(
        image_size=cfg.image_size, base_channels=cfg.base_channels, channel_mults=cfg.channel_mults,
        num_res_blocks=cfg.num_res_blocks, attention_resolutions=cfg.attention_resolutions,
        num_groups=math.gcd(32, cfg.base_channels), num_classes=NUM_CLASSES,  # GroupNorm must divide
    ))


def train(cfg: TrainConfig, out_dir: str | Path | None = None, progress: bool = True) -> TrainResult:
    """Train; when out_dir is given, write digits.safetensors/.json and the loss curve there."""
    from tqdm.auto import tqdm

    for name in ("steps", "batch_size", "warmup"):
        if getattr(cfg, name) < (0 if name == "warmup" else 1):
            raise ValueError(f"{name} must be positive, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.label_dropout < 1.0:
        raise ValueError(f"label_dropout must be in [0, 1), got {cfg.label_dropout}")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {cfg.ema_decay}")
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)

    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # the model's initial weights
    images, labels = load_digits(cfg.image_size)  # [N, 1, S, S], [N]
    spec = schedule_spec(cfg)
    schedule = build_schedule(spec)
    previous = None
    if cfg.init is not None:  # continue training: the weights (the EMA's) seed both copies
        previous = load_model(cfg.init)
        model = previous.model.train().requires_grad_(True)
        if previous.metadata.get("image_shape", [None, None, cfg.image_size])[-1] != cfg.image_size:
            raise ValueError(f"init model {cfg.init!r} was trained at another image_size than {cfg.image_size}")
    else:
        model = unet_for(cfg)
    ema = UNet(model.config)
    ema.load_state_dict(model.state_dict())
    ema.eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    losses, lrs, times = [], [], []
    start = time.perf_counter()
    history = {"previous_training": previous.metadata.get("training")} if previous is not None else {}
    save = None
    if out_dir is not None:
        def save(extra: dict) -> None:
            check_finite_weights(ema, extra["steps_done"], cfg.lr)
            meta = model_metadata(cfg, {**extra, **history})
            save_model(ema, out_dir / "digits.safetensors", meta)
            # the online weights of the same run, to measure what the EMA buys at equal training time
            save_model(model, out_dir / "online.safetensors", {**meta, "weights": "online (not the EMA)"})

    bar = tqdm(range(cfg.steps), desc="train", disable=not progress, dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, images.shape[0], (cfg.batch_size,), generator=gen)
        x0, y = images[idx], labels[idx].clone()  # [B, 1, S, S], [B]
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.label_dropout
        y[drop] = NUM_CLASSES  # the null class, so the same model is the unconditional one
        t = torch.randint(0, cfg.num_train_timesteps, (cfg.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = add_noise(x0, t, schedule, noise=noise, backend="torch")

        lr = learning_rate(cfg, step, time.perf_counter() - start)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = F.mse_loss(model(x_t, t.float(), class_labels=y), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # EMA warmup: average over fewer steps early on so the EMA is not stuck at init.
        ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))

        elapsed = time.perf_counter() - start
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"train: the loss became {losses[-1]} at step {step + 1} (lr {lr:.3g}); "
                                     "nothing was saved from this step on: lower --lr")
        lrs.append(lr)
        times.append(elapsed)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.1e}")
        if save is not None and cfg.save_every and (step + 1) % cfg.save_every == 0:
            save({"steps_done": step + 1, "seconds": round(elapsed, 1)})
            write_loss_curve(losses, lrs, times, out_dir)
        if cfg.max_minutes is not None and elapsed > 60 * cfg.max_minutes:
            bar.write(f"fastdiff train: stopping at step {step + 1}: max_minutes={cfg.max_minutes} reached")
            break
    bar.close()

    seconds = time.perf_counter() - start
    tail = losses[-min(100, len(losses)):]
    extra = {"steps_done": len(losses), "seconds": round(seconds, 1),
             "final_loss_mean_last_100": round(sum(tail) / len(tail), 5)}
    metadata = model_metadata(cfg, {**extra, **history})
    check_finite_weights(ema, len(losses), cfg.lr)
    if save is not None:
        save(extra)
        write_loss_curve(losses, lrs, times, out_dir)
    return TrainResult(ema, schedule, losses, seconds, metadata)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .command_options import add_progress_arguments

    d = TrainConfig()
    a = parser.add_argument
    a("--out", default="runs/digits", help="output folder for digits.safetensors/.json, loss.csv, loss.png "
      "(default: %(default)s)")
    a("--steps", type=int, default=d.steps, help="optimizer steps (default: %(default)s)")
    a("--batch-size", type=int, default=d.batch_size, help="images per step (default: %(default)s)")
    a("--lr", type=float, default=d.lr, help="peak AdamW learning rate (default: %(default)s)")
    a("--warmup", type=int, default=d.warmup, help="steps of linear LR warmup (default: %(default)s)")
    a("--ema-decay", type=float, default=d.ema_decay,
      help="decay of the weights' exponential moving average, in [0, 1); the EMA is what is saved "
           "(default: %(default)s)")
    a("--label-dropout", type=float, default=d.label_dropout,
      help="probability a label becomes the null class, for classifier-free guidance, in [0, 1) "
           "(default: %(default)s)")
    a("--image-size", type=int, default=d.image_size,
      help="the 8x8 digits are upsampled to this power of two (default: %(default)s)")
    a("--base-channels", type=int, default=None,
      help=f"U-Net channels at full resolution, an even number (default: {d.base_channels}; from the model with "
           "--init)")
    a("--channel-mults", default=None,
      help=f"comma-separated channel multipliers, one per resolution (default: "
           f"{','.join(map(str, d.channel_mults))}; from the model with --init)")
    a("--num-res-blocks", type=int, default=None,
      help=f"residual blocks per resolution (default: {d.num_res_blocks}; from the model with --init)")
    a("--attention-resolutions", default=None,
      help=f"comma-separated feature-map sizes with self-attention, e.g. 8 or 8,4; empty for none (default: "
           f"{','.join(map(str, d.attention_resolutions))}; from the model with --init)")
    a("--schedule", default=d.schedule, choices=["linear", "cosine"], help="noise schedule (default: %(default)s)")
    a("--seed", type=int, default=d.seed, help="seed of the initial weights and the batches (default: %(default)s)")
    a("--max-minutes", type=float, default=d.max_minutes,
      help="stop (and save) after this many minutes; the LR anneals to fit (default: %(default)s)")
    a("--init", default=None, help="continue from this saved model (.safetensors); its architecture is kept, so "
      "the architecture flags cannot be given with it (default: a new model)")
    a("--threads", type=int, default=None, help="torch CPU threads, >= 1 (default: torch's choice)")
    add_progress_arguments(parser)


ARCHITECTURE_FLAGS = {"base_channels": "--base-channels", "channel_mults": "--channel-mults",
                      "num_res_blocks": "--num-res-blocks", "attention_resolutions": "--attention-resolutions"}


def _int_tuple(name: str, text: str, allow_empty: bool) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values and not allow_empty:
        raise ValueError(f"{name} must list at least one integer, e.g. 1,2,2; got {text!r}")
    return values


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the flags describe; every value checked, naming its flag."""
    d = TrainConfig()
    given = [flag for name, flag in ARCHITECTURE_FLAGS.items() if getattr(args, name) is not None]
    if args.init is not None and given:
        raise ValueError(f"{', '.join(given)} cannot be combined with --init: the model's own architecture is "
                         "continued")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if not 0.0 <= args.label_dropout < 1.0:
        raise ValueError(f"--label-dropout must be in [0, 1), got {args.label_dropout}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    if args.max_minutes is not None and not args.max_minutes > 0:
        raise ValueError(f"--max-minutes must be positive, got {args.max_minutes}")
    for name in ("steps", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    size = args.image_size
    if size < 8 or size & (size - 1):
        raise ValueError(f"--image-size must be a power of two >= 8, got {size}")
    base = d.base_channels if args.base_channels is None else args.base_channels
    mults = d.channel_mults if args.channel_mults is None else _int_tuple("--channel-mults", args.channel_mults, False)
    blocks = d.num_res_blocks if args.num_res_blocks is None else args.num_res_blocks
    attn = d.attention_resolutions if args.attention_resolutions is None else \
        _int_tuple("--attention-resolutions", args.attention_resolutions, True)
    if base < 2 or base % 2:
        raise ValueError(f"--base-channels must be a positive even number (the sinusoidal timestep embedding), "
                         f"got {base}")
    if any(m < 1 for m in mults):
        raise ValueError(f"--channel-mults must be positive, got {args.channel_mults!r}")
    if size % 2 ** (len(mults) - 1):
        raise ValueError(f"--channel-mults: {len(mults)} resolutions halve --image-size {size} too often")
    if blocks < 1:
        raise ValueError(f"--num-res-blocks must be >= 1, got {blocks}")
    sizes = [size // 2 ** i for i in range(len(mults))]
    bad = [r for r in attn if r not in sizes]
    if bad:
        raise ValueError(f"--attention-resolutions: {bad} is not a feature-map size of this U-Net; allowed: "
                         f"{', '.join(map(str, sizes))} (or empty for none)")
    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, ema_decay=args.ema_decay,
        label_dropout=args.label_dropout, image_size=size, base_channels=base, channel_mults=mults,
        num_res_blocks=blocks, attention_resolutions=attn, schedule=args.schedule, seed=args.seed,
        max_minutes=args.max_minutes, init=args.init,
    )
    if cfg.init is None:
        try:  # one tiny forward pass: whatever else the architecture cannot do shows here, named
            with torch.no_grad():
                x, t, y = torch.zeros(1, 1, size, size), torch.zeros(1), torch.zeros(1, dtype=torch.long)
                unet_for(cfg)(x, t, class_labels=y)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"--base-channels {base} --channel-mults {','.join(map(str, mults))}: not a U-Net "
                             f"that runs: {str(e).splitlines()[0]}") from None
    return cfg


def main(args: argparse.Namespace) -> int:
    from .command_options import show_progress

    cfg = config_from_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = train(cfg, args.out, progress=show_progress(args))
    out = Path(args.out)
    print(f"fastdiff train: {len(result.losses)} steps in {result.seconds / 60:.1f} min, "
          f"final loss (mean of last 100) {result.metadata['training']['final_loss_mean_last_100']:.4f}")
    print(f"wrote {out / 'digits.safetensors'} (+ .json), {out / 'loss.csv'}, {out / 'loss.png'}")
    return 0
