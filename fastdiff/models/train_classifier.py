"""Train the digits classifier once and ship it with the real digits' feature statistics.

    python -m fastdiff.models.train_classifier [--out fastdiff/models/weights/digits_classifier.safetensors]

An 80/20 split stratified by class (fixed seed); the shipped classifier is the one trained
on the 80%, and its accuracy on the held-out 20% is recorded in the JSON. Random shifts of
up to one pixel make it less sensitive to the small misalignments of generated digits.
The reference statistics (mean and covariance of the penultimate features over all 1797
real digits, float64) are stored in the same safetensors file as extra.feature_mean/_cov.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from .classifier import DigitsClassifier, DigitsClassifierConfig
from .digits import DATA_RANGE, load_digits
from .io import save_model
from .pretrained import weights_path


def stratified_split(labels: torch.Tensor, holdout: float, gen: torch.Generator):
    """Indices (train, test) with a `holdout` fraction of every class in test."""
    train, test = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_test = round(holdout * idx.numel())
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train), torch.cat(test)


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate each image by up to max_shift pixels, filling with the background (-1)."""
    B, _, H, W = x.shape
    pad = F.pad(x, [max_shift] * 4, value=DATA_RANGE[0])  # [B, C, H+2m, W+2m]
    dy = torch.randint(0, 2 * max_shift + 1, (B,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (B,), generator=gen)
    return torch.stack([pad[i, :, dy[i]:dy[i] + H, dx[i]:dx[i] + W] for i in range(B)])


@torch.no_grad()
def feature_statistics(model: DigitsClassifier, images: torch.Tensor, batch: int = 512):
    """Mean [F] and covariance [F, F] (float64) of the penultimate features."""
    feats = torch.cat([model.features(images[i:i + batch]) for i in range(0, len(images), batch)]).double()
    return feats.mean(0), torch.cov(feats.T)


@torch.no_grad()
def accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (model(images).argmax(1) == labels).float().mean().item()


def train_classifier(epochs: int = 40, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                     image_size: int = 16, holdout: float = 0.2):
    """(model in eval mode, held-out accuracy, feature mean, feature covariance, held-out size)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    images, labels = load_digits(image_size)  # [N, 1, S, S], [N]
    train_idx, test_idx = stratified_split(labels, holdout, gen)
    model = DigitsClassifier(DigitsClassifierConfig(image_size=image_size))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = (len(train_idx) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps_per_epoch)
    for epoch in range(epochs):
        model.train()
        order = train_idx[torch.randperm(len(train_idx), generator=gen)]
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(model(random_shift(images[idx], gen)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    acc = accuracy(model, images[test_idx], labels[test_idx])
    mean, cov = feature_statistics(model, images)
    return model, acc, mean, cov, len(test_idx)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(weights_path("digits_classifier")))
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    model, acc, mean, cov, n_test = train_classifier(epochs=args.epochs, seed=args.seed)
    seconds = time.perf_counter() - start
    metadata = {
        "dataset": "sklearn digits (8x8, upsampled bilinearly)",
        "image_shape": [1, model.config.image_size, model.config.image_size],
        "num_classes": model.config.num_classes,
        "data_range": list(DATA_RANGE),
        "heldout_accuracy": round(acc, 4),
        "heldout_size": n_test,
        "reference_statistics": "extra.feature_mean / extra.feature_cov over all 1797 real digits",
        "training": {"epochs": args.epochs, "seed": args.seed, "seconds": round(seconds, 1)},
    }
    path = save_model(model, args.out, metadata, extra={"feature_mean": mean, "feature_cov": cov})
    print(f"held-out accuracy {acc:.4f} on {n_test} digits; {seconds:.0f} s; wrote {path}")
    return 0 if acc >= 0.98 else 1


if __name__ == "__main__":
    raise SystemExit(main())
